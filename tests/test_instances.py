"""Several instances of one model: the batcher feeds every instance, and each is labelled in metrics.

On a GPU host each instance of a ``KIND_GPU`` group runs on the GPU Triton assigns it
(``resolve_device``, unit-tested in test_schema.py); here, on CPU, two ``KIND_CPU`` instances
show that a second request goes to the idle instance while the first is still denoising.
"""

import re
import threading

from client import DiffusionClient, GenerationRequest
from testing import harness
from triton_diffusion import model_config

from .conftest import start_server, wait_until_denoising

MODEL = "two_instances"


def calls_per_instance(server) -> dict[str, float]:
    calls = {}
    for line in harness.metrics_text(server).splitlines():
        match = re.match(r'diffusion_pipeline_calls_total\{([^}]*)\} (\S+)', line)
        if match and f'model="{MODEL}"' in match.group(1) and 'result="ok"' in match.group(1):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            calls[f"{labels['instance']}@{labels['device']}"] = float(match.group(2))
    return calls


def test_a_request_arriving_while_one_instance_is_busy_runs_on_the_other(tmp_path):
    config = model_config.variant(MODEL, {"default_steps": "30"}, max_batch_size=1)
    config.instance_group[0].count = 2
    model_config.write_model(tmp_path / "repo", config)
    server = start_server(tmp_path, [MODEL], repository=tmp_path / "repo", require_ready=True)
    try:
        with DiffusionClient(f"grpc://{server.grpc_url}", MODEL, timeout_s=300) as client:
            results = {}
            first = threading.Thread(target=lambda: results.update(first=client.generate(GenerationRequest("slow one", seed=1))))
            first.start()
            wait_until_denoising(server, 0, MODEL)  # the first request holds one instance
            results["second"] = client.generate(GenerationRequest("second", seed=2, steps=2))
            first.join()
        calls = harness.wait_until(lambda: (c := calls_per_instance(server)) and sum(c.values()) == 2 and c, "two calls counted")
        assert sorted(calls) == [f"{MODEL}_0_0@cpu", f"{MODEL}_0_1@cpu"], calls
        assert list(calls.values()) == [1.0, 1.0]  # one call each: the second did not queue behind the first
        assert results["first"].seed == 1 and results["second"].seed == 2
    finally:
        server.stop()
