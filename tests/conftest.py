"""Fixtures that start the real tritonserver (free ports, logs under pytest's tmp dir).

Tests synchronise on server state (``testing.harness``: statistics, metrics), never on
sleeps, so the suite passes on a busy machine too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client import DiffusionClient
from testing import harness
from triton_diffusion.launcher import DEFAULT_MODEL_REPOSITORY, TritonServer
from triton_diffusion.tiny import ensure_tiny_model

TINY = "stable_diffusion_tiny"
# No model hub in tests: the real-checkpoint entry must fail fast and cleanly.
OFFLINE = {"HF_HUB_OFFLINE": "1"}
STEPS = "diffusion_denoising_steps_total"
# The invalid request the transport tests send (unary, stream, HTTP, CLI, the front, a batch): they
# check that the parser's message arrives unchanged; the message itself is checked with the other
# bad inputs in tests/test_requests.py and tests/test_bad_input.py.
BAD_HEIGHT = 100
BAD_HEIGHT_ERROR = f"HEIGHT={BAD_HEIGHT} must be a multiple of 8"


def start_server(log_dir: Path, models, env=None, name="server", repository: Path = DEFAULT_MODEL_REPOSITORY,
                 extra_args=(), require_ready=False) -> TritonServer:
    ensure_tiny_model()
    return harness.serve(models, repository, log_path=log_dir / f"{name}.log", env={**OFFLINE, **(env or {})},
                         extra_args=extra_args, ready_timeout=240, require_ready=require_ready)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The default server: the tiny model, plus the SD-Turbo entry (fails to load: no hub)."""
    server = start_server(tmp_path_factory.mktemp("triton"), [TINY, "sd_turbo"])
    yield server
    server.stop()


@pytest.fixture
def grpc_client(server):
    with DiffusionClient(f"grpc://{server.grpc_url}", TINY) as client:
        yield client


@pytest.fixture
def delayed_server(tmp_path_factory):
    """Factory: a fresh server whose batcher waits until N requests are queued (deterministic batches).

    Triton's TRITONSERVER_DELAY_SCHEDULER holds the first batch until N requests are queued, then
    batches normally; with N larger than a test ever sends, nothing is scheduled at all.
    """
    servers = []

    def make(count: int, models=(TINY,), repository: Path = DEFAULT_MODEL_REPOSITORY) -> TritonServer:
        server = start_server(
            tmp_path_factory.mktemp("triton-delayed"), list(models), {"TRITONSERVER_DELAY_SCHEDULER": str(count)},
            name=f"delayed-{count}", repository=repository,
            # requests still queued when the test ends are not waited for
            extra_args=("--exit-timeout-secs=5",), require_ready=True,
        )
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def model_stats(server: TritonServer, model: str = TINY) -> harness.Stats:
    return harness.Stats.read(server, model)


def batch_histogram(server: TritonServer, model: str = TINY, executions: int = 1) -> dict[int, int]:
    """{batch size: executions} once ``executions`` executions are counted (Triton updates its
    statistics just after sending the responses)."""
    return harness.wait_for_executions(server, model, executions).histogram


def metric(server: TritonServer, name: str, model: str = TINY) -> float:
    return harness.metric(server, name, model)


def wait_until_denoising(server: TritonServer, steps_before: float, model: str = TINY) -> None:
    """Block until the model has run a denoising step since ``steps_before`` was read."""
    harness.wait_for_metric(server, STEPS, model, steps_before + 1)


def pending(server: TritonServer, model: str = TINY) -> float:
    """Requests Triton holds in the model's queue (not yet handed to an execution)."""
    return metric(server, "nv_inference_pending_request_count", model)


def assert_same_image(batched: np.ndarray, alone: np.ndarray, share: float = 0.001) -> None:
    """Batched vs alone on CPU float32: equal up to float rounding of batched kernels.

    Measured: float outputs differ by at most ~2e-6, which flips at most 1 uint8 level in well
    under 0.1% of pixels. A permutation or a different seed changes ~99% of pixels.
    """
    assert batched.shape == alone.shape
    diff = np.abs(batched.astype(np.int16) - alone.astype(np.int16))
    assert diff.max() <= 1, f"max difference {diff.max()} levels"
    assert (diff > 0).mean() < share, f"{(diff > 0).mean():.4%} of values differ"


# The tiny FLUX transformer's float results depend on the batch shape more than SD's UNet: even
# without any cancellation, batched vs solo images differ by one uint8 level on 5-7% of values
# (measured on CPU fp32), never more than one level. A wrong row would differ by far more.
FLUX_ROUNDING_SHARE = 0.15
