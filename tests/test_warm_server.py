"""A compiled model in the real server: warmed before READY, calls padded to buckets, compilations counted.

torch.compile runs with its ``eager`` backend (dynamo's tracing, guards and graph counting, with no
inductor build): the served code path is the GPU one, at CPU test speed.
"""

from __future__ import annotations

import pytest

from client import DiffusionClient, GenerationRequest
from testing import harness
from triton_diffusion import model_config

from .conftest import assert_same_image, batch_histogram, metric

MODEL = "tiny_compiled"
COMPILED = {
    "compile": "full", "compile_backend": "eager", "compile_dynamic": "false", "speed_devices": "cpu",
    "batch_buckets": "1,4", "max_images_per_call": "4",
}


@pytest.fixture
def compiled_server(delayed_server, tmp_path):
    model_config.write_model(tmp_path / "repo", model_config.variant(MODEL, COMPILED, max_batch_size=4))
    return delayed_server(3, models=(MODEL,), repository=tmp_path / "repo")


def test_warm_up_runs_before_ready_and_a_padded_batch_compiles_nothing(compiled_server):
    server = compiled_server
    # READY already: the warm-up (buckets 1 and 4 at the default size) ran inside initialize().
    assert metric(server, "diffusion_warmup_seconds", MODEL) > 0
    requests = [GenerationRequest(f"a harbour at night, boat {i}", seed=40 + i) for i in range(3)]
    with DiffusionClient(f"grpc://{server.grpc_url}", MODEL, timeout_s=120) as client:
        results = client.generate_many(requests, concurrency=3)
        assert batch_histogram(server, MODEL) == {3: 1}
        assert metric(server, "diffusion_padding_rows_total", MODEL) == 1  # 3 rows ran as the bucket of 4
        assert metric(server, "diffusion_compilations_while_serving_total", MODEL) == 0
        # exported, at 0 (no CUDA graphs on a CPU): what dashboards and the alert read
        assert any(line.startswith("diffusion_cuda_graph_recordings_while_serving_total{") and f'model="{MODEL}"' in line
                   for line in harness.metrics_text(server).splitlines())
        assert metric(server, "diffusion_cuda_graph_recordings_while_serving_total", MODEL) == 0
        for request, result in zip(requests, results):
            assert_same_image(result.array, client.generate(request).array)  # alone: the bucket of 1

        # A size the warm-up did not cover compiles while serving, and the metric says so.
        client.generate(GenerationRequest("a harbour at night", seed=1, height=64, width=64))
        harness.wait_for_metric(server, "diffusion_compilations_while_serving_total", MODEL, 1)
