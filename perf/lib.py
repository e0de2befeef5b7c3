"""What every benchmark script shares, defined once: the served model's parameters for an
architecture, serving a variant, the closed loop (c clients in flight), GPU memory of the serving
processes, one percentile and one spread statistic, the card's name, and the results writer
(``perf/results/<stem>.json`` and ``.txt``, with the card, date and command), and the generated
tables' place in a document (between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``).

The scripts import it as ``perf.lib`` (the project installs ``perf`` and ``testing`` as packages:
no ``sys.path`` edits).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path
from typing import Optional, Sequence

from client import GenerationRequest
from client.cli import percentile  # the one percentile definition (nearest rank), also the CLI's
from testing import harness
from perf.prompts import prompt_at
from triton_diffusion import families, model_config
from triton_diffusion.metrics import CALL_RESULTS, STAGES

__all__ = ["ProcessMemory", "card_name", "closed_loop", "log", "model_parameters", "percentile", "serve", "spread",
           "stub_pids", "today", "with_table", "write_results"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def today() -> str:
    return date.today().isoformat()


def card_name() -> str:
    """The GPU's name (nvidia-smi), or ``cpu``."""
    try:
        return subprocess.check_output(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                       text=True).splitlines()[0].strip()
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "cpu"


def spread(values: Sequence[float]) -> dict:
    """The statistic every repeated measurement reports: median, min, max and count."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def model_parameters(arch: str, device: str, size: tuple[int, int], steps: int = 0, images_per_call: int = 1,
                     frames: int = 0) -> dict[str, str]:
    """``config.pbtxt`` parameters serving random weights of ``arch`` on ``device`` at ``size`` (height,
    width), in the architecture's published dtype (float32 off the GPU) and guidance, ``steps``
    (0: the architecture's), with calls of up to ``images_per_call`` images (``frames`` each, video)."""
    _, architecture = families.architecture(arch)
    height, width = size
    parameters = {
        "pretrained_model": f"random:{arch}", "device": device,
        "torch_dtype": architecture.dtype if device.startswith("cuda") else "float32",
        "default_height": str(height), "default_width": str(width), "default_steps": str(steps or architecture.steps),
        "default_guidance_scale": str(architecture.guidance), "size_multiple": "16", "min_side": "32",
        "max_side": "2048", "max_steps": "100", "max_images_per_call": str(images_per_call),
        "max_pixels_per_call": str(images_per_call * height * width * max(1, frames)),
    }
    if frames:
        parameters.update(default_num_frames=str(frames), max_num_frames=str(max(frames, 17)))
    return parameters


def serve(configs: Sequence[tuple[model_config.ModelConfig, str]], workdir: Path, ready_timeout: float = 900):
    """Write each ``(config, base model)`` into ``workdir/repo`` and serve them all; returns the
    started server (a context manager that stops it) and logs how long READY took."""
    repository = workdir / "repo"
    for config, base in configs:
        model_config.write_model(repository, config, base=base)
    names = [config.name for config, _ in configs]
    started = time.perf_counter()
    server = harness.serve(names, repository, log_path=workdir / f"{names[0]}.log", ready_timeout=ready_timeout)
    log(f"{', '.join(names)}: READY in {time.perf_counter() - started:.1f}s")
    return server


def stub_pids(server) -> list[int]:
    """The Python-backend stubs (the processes holding the models) of a served tritonserver."""
    import psutil

    return [child.pid for child in psutil.Process(server.process.pid).children(recursive=True)
            if "triton_python_backend_stub" in " ".join(child.cmdline()[:1])]


class ProcessMemory:
    """Peak GPU memory (MiB) of some processes, sampled with nvidia-smi while a phase runs.

    The same measurement for both sides of a comparison: an offline side is this process, the
    served side the Python-backend stub(s) holding the model.
    """

    def __init__(self, pids, interval: float = 0.25):
        self.pids, self.interval, self.peak, self.available = set(pids), interval, 0, True
        self._stop = threading.Event()

    def _sample(self) -> int:
        out = subprocess.check_output(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"], text=True)
        used = 0
        for line in out.strip().splitlines():
            pid, memory = (part.strip() for part in line.split(","))
            if int(pid) in self.pids:
                used += int(memory)
        return used

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._sample())
            except (OSError, subprocess.CalledProcessError, ValueError):
                self.available = False
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> Optional[int]:
        return self.peak if self.available and self.peak else None


def closed_loop(client, server, name: str, concurrency: int, count: int, prompts: Sequence[str], offset: int) -> dict:
    """One round of the closed loop: ``count`` requests (VBench prompts, distinct seeds) with
    ``concurrency`` in flight; throughput, latencies and what the server did (batches formed,
    execution seconds per batch size, steps, cancellation polls, peak GPU memory of the stubs)."""
    requests = [GenerationRequest(prompt_at(prompts, offset + i), seed=offset + i) for i in range(count)]
    before = harness.Stats.read(server, name)
    counters_before = backend_counters(server, name)
    with ProcessMemory(stub_pids(server)) as memory:
        started = time.perf_counter()
        results = client.generate_many(requests, concurrency=concurrency)
        wall = time.perf_counter() - started
    delta = harness.wait_until(lambda: (d := harness.Stats.read(server, name) - before).inferences >= count and d,
                               "all requests counted")
    failures = [r for r in results if isinstance(r, Exception)]
    return {
        "images_per_s": (count - len(failures)) / wall,
        "latencies": [r.seconds for r in results if not isinstance(r, Exception)],
        "failures": len(failures), "histogram": delta.histogram,
        "exec_seconds": {b: s.seconds_per_execution for b, s in delta.batches.items()},
        **_minus(backend_counters(server, name), counters_before),
        "gpu_mem_mib": memory.peak_mib,
    }


def backend_counters(server, name: str) -> dict:
    """The backend's own account of its executions, cumulative, from one scrape: denoising steps,
    seconds asking about cancellation, seconds per stage of ``execute()`` (validate, pipeline,
    respond) and pipeline calls by result (an ``out_of_memory`` call was halved and run again), so
    that a server tax can be traced to where it was paid."""
    text = harness.metrics_text(server)
    return {
        "steps": harness.metric_in(text, "diffusion_denoising_steps_total", name),
        "poll_seconds": harness.metric_in(text, "diffusion_cancellation_poll_seconds_total", name),
        "stage_seconds": {stage: harness.metric_in(text, "diffusion_stage_seconds_sum", name, stage=stage) for stage in STAGES},
        "calls": {result: harness.metric_in(text, "diffusion_pipeline_calls_total", name, result=result)
                  for result in CALL_RESULTS},
    }


def _minus(after: dict, before: dict) -> dict:
    """``after - before`` for counters, nested dicts key by key."""
    return {key: _minus(value, before[key]) if isinstance(value, dict) else value - before[key] for key, value in after.items()}


def write_results(out: Path, stem: str, payload: dict, table: str = "") -> Path:
    """``out/<stem>.json`` (``payload`` with the card, date and command) and, with a table,
    ``out/<stem>.txt``; returns the JSON's path. Docs quote these files, never retyped numbers."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"card": card_name(), "date": today(), "command": " ".join(sys.argv), **payload}
    path = out / f"{stem}.json"  # not with_suffix: architecture names such as "wan2.1-..." have dots
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    if table:
        (out / f"{stem}.txt").write_text(table.rstrip("\n") + "\n")
    return path


def write_tables(docs: Path, tables: dict, check: bool, command: str) -> int:
    """Put each table between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in ``docs``; with
    ``check``, only say whether that would change anything (1: stale, fix with ``command``)."""
    text = original = docs.read_text()
    for name, table in tables.items():
        text = with_table(text, name, table)
    if check:
        if text != original:
            print(f"stale tables in {docs}: {command}", file=sys.stderr)
        return int(text != original)
    docs.write_text(text)
    return 0


def with_table(text: str, name: str, generated: str) -> str:
    """``text`` with what lies between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` replaced by ``generated``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    head, found, rest = text.partition(begin)
    _, closed, tail = rest.partition(end)
    if not found or not closed:
        raise SystemExit(f"no {begin} ... {end} markers")
    return f"{head}{begin}\n{generated}\n{end}{tail}"
