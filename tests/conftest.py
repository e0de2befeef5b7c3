"""Fixtures that start the real tritonserver (free ports, logs under pytest's tmp dir)."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from client import DiffusionClient
from triton_diffusion.launcher import (
    DEFAULT_MODEL_REPOSITORY, ServerConfig, TritonServer, batch_executions, free_port, model_statistics,
)
from triton_diffusion.tiny import ensure_tiny_model

TINY = "stable_diffusion_tiny"
# No model hub in tests: the real-checkpoint entry must fail fast and cleanly.
OFFLINE = {"HF_HUB_OFFLINE": "1"}


def start_server(log_dir: Path, models, env=None, name="server", repository: Path = DEFAULT_MODEL_REPOSITORY) -> TritonServer:
    ensure_tiny_model()
    config = ServerConfig(
        model_repository=repository, models=models, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        env={**OFFLINE, **(env or {})},
    )
    server = TritonServer(config, log_path=log_dir / f"{name}.log").start()
    try:
        server.wait_ready(timeout=240)
    except Exception:
        server.stop()
        raise
    return server


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
    """Factory: a fresh server whose batcher waits until N requests are queued (deterministic batches)."""
    servers = []

    def make(count: int) -> TritonServer:
        server = start_server(
            tmp_path_factory.mktemp("triton-delayed"), [TINY], {"TRITONSERVER_DELAY_SCHEDULER": str(count)},
            name=f"delayed-{count}",
        )
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def model_stats(server: TritonServer, model: str = TINY) -> dict:
    return model_statistics(server.http_url, model)


def batch_histogram(server: TritonServer, model: str = TINY) -> dict[int, int]:
    """{batch size: executions} from Triton's statistics API."""
    return batch_executions(server.http_url, model)


def metric(server: TritonServer, name: str, model: str = TINY) -> float:
    """Sum of a Prometheus series for the model (custom metrics included)."""
    with urllib.request.urlopen(server.metrics_url) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf'{re.escape(name)}{{([^}}]*)}} (\S+)', line)
        if match and f'model="{model}"' in match.group(1):
            total += float(match.group(2))
    return total


def assert_same_image(batched: np.ndarray, alone: np.ndarray) -> None:
    """Batched vs alone on CPU float32: equal up to float rounding of batched kernels.

    Measured: float outputs differ by at most ~2e-6, which flips at most 1 uint8 level in well
    under 0.1% of pixels. A permutation or a different seed changes ~99% of pixels.
    """
    assert batched.shape == alone.shape
    diff = np.abs(batched.astype(np.int16) - alone.astype(np.int16))
    assert diff.max() <= 1, f"max difference {diff.max()} levels"
    assert (diff > 0).mean() < 0.001, f"{(diff > 0).mean():.4%} of values differ"
