"""What tests and benchmarks share: serve a repository on free ports, read and diff Triton's
statistics and metrics, and wait on server state (never on sleeps).

    with serve([model], repository, log_path=...) as server:
        before = Stats.read(server, model)
        ...  # send requests
        delta = Stats.read(server, model) - before   # executions, realized batches, times
"""

from __future__ import annotations

import re
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

from triton_diffusion.launcher import DEFAULT_MODEL_REPOSITORY, ServerConfig, ServerError, TritonServer, free_port, model_statistics

T = TypeVar("T")


def serve(
    models: Sequence[str],
    repository: Path = DEFAULT_MODEL_REPOSITORY,
    log_path: Optional[Path] = None,
    env: Optional[dict] = None,
    extra_args: Sequence[str] = (),
    ready_timeout: float = 300,
    require_ready: bool = True,
) -> TritonServer:
    """A started tritonserver on free ports whose ``models`` have finished loading.

    With ``require_ready`` every model must be READY (else the server is stopped and the error
    names the model, its reason and the log). Use it as a context manager to stop it.
    """
    config = ServerConfig(
        model_repository=Path(repository), models=list(models), http_port=free_port(), grpc_port=free_port(),
        metrics_port=free_port(), env=dict(env or {}), extra_args=tuple(extra_args),
    )
    server = TritonServer(config, log_path=log_path).start()
    try:
        states = server.wait_ready(ready_timeout)
        if require_ready:
            broken = {m: states.get(m, {}).get("reason", "") for m in models if states.get(m, {}).get("state") != "READY"}
            if broken:
                raise ServerError(f"models not READY: {broken} (log: {log_path})")
        # Triton opens the metrics port just after HTTP and gRPC: tests read it at once.
        wait_until(lambda: _answers(server.metrics_url), "the metrics endpoint", timeout=60)
    except BaseException:
        server.stop()
        raise
    return server


@dataclass(frozen=True)
class BatchStats:
    executions: int = 0
    compute_ns: int = 0  # Triton's compute_infer time summed over those executions

    @property
    def seconds_per_execution(self) -> float:
        return self.compute_ns / self.executions / 1e9 if self.executions else 0.0


@dataclass(frozen=True)
class Stats:
    """A model's counters from Triton's statistics API; subtract two to get what happened between."""

    inferences: int = 0  # requests' batch rows served (Triton's inference_count)
    executions: int = 0  # model executions (Triton's execution_count)
    successes: int = 0
    failures: int = 0
    queue_ns: int = 0
    batches: dict[int, BatchStats] = field(default_factory=dict)

    @classmethod
    def read(cls, server: "TritonServer | str", model: str) -> "Stats":
        """From a ``TritonServer`` or a running server's HTTP address (``host:port``)."""
        data = model_statistics(server if isinstance(server, str) else server.http_url, model)
        stats = data["inference_stats"]
        return cls(
            inferences=int(data["inference_count"]),
            executions=int(data["execution_count"]),
            successes=int(stats["success"]["count"]),
            failures=int(stats["fail"]["count"]),
            queue_ns=int(stats["queue"]["ns"]),
            batches={
                int(b["batch_size"]): BatchStats(int(b["compute_infer"]["count"]), int(b["compute_infer"]["ns"]))
                for b in data["batch_stats"]
            },
        )

    def __sub__(self, earlier: "Stats") -> "Stats":
        batches = {}
        for size, now in self.batches.items():
            before = earlier.batches.get(size, BatchStats())
            if now.executions > before.executions:
                batches[size] = BatchStats(now.executions - before.executions, now.compute_ns - before.compute_ns)
        return Stats(
            self.inferences - earlier.inferences, self.executions - earlier.executions, self.successes - earlier.successes,
            self.failures - earlier.failures, self.queue_ns - earlier.queue_ns, batches,
        )

    @property
    def histogram(self) -> dict[int, int]:
        """``{batch size: executions}``: the batches Triton's dynamic batcher really formed."""
        return {size: batch.executions for size, batch in sorted(self.batches.items())}

    @property
    def mean_batch(self) -> float:
        executions = sum(self.histogram.values())
        return sum(size * count for size, count in self.histogram.items()) / executions if executions else 0.0


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


def metrics_text(server: TritonServer) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=30) as response:
        return response.read().decode()


def metric(server: TritonServer, name: str, model: str, **labels: str) -> float:
    """Sum of a Prometheus series (custom ``diffusion_*`` ones included) over the model's labels;
    ``labels`` (e.g. ``when="mid_flight"``) keep only the series that carry those values too."""
    return metric_in(metrics_text(server), name, model, **labels)


def metric_in(text: str, name: str, model: str, **labels: str) -> float:
    """``metric`` read from one scrape (``metrics_text``), for several series of one moment."""
    wanted = [f'{key}="{value}"' for key, value in {"model": model, **labels}.items()]
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{re.escape(name)}{{([^}}]*)}} (\S+)", line)
        if match and all(label in match.group(1) for label in wanted):
            total += float(match.group(2))
    return total


def wait_until(check: Callable[[], T], what: str, timeout: float = 120.0, interval: float = 0.05) -> T:
    """Poll server state until ``check()`` is truthy and return it; fail naming ``what`` after ``timeout``.

    This waits for a state, not for a time: on a busy machine it just polls longer.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f}s for {what}")
        time.sleep(interval)


def wait_for_metric(server: TritonServer, name: str, model: str, at_least: float, timeout: float = 120.0) -> float:
    """Wait until a metric reaches ``at_least``; returns its value."""
    return wait_until(lambda: (value := metric(server, name, model)) >= at_least and value, f"{name} >= {at_least}", timeout)


def wait_for_executions(server: TritonServer, model: str, at_least: int, timeout: float = 120.0) -> Stats:
    """Triton updates its statistics after the responses are sent: wait until they are counted."""
    return wait_until(lambda: (stats := Stats.read(server, model)).executions >= at_least and stats,
                      f"{model} executions >= {at_least}", timeout)
