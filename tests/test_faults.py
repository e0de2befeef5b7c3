"""Faults: the Python-backend stub killed mid-request; a model whose weights are missing."""

import threading
import time

import psutil
import pytest
import tritonclient.http as httpclient

from client import DiffusionClient, ServerError
from triton_diffusion.launcher import StubWatchdog

from .conftest import TINY, start_server


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("faults"), [TINY], name="faults")
    yield server
    server.stop()


def kill_stub_during_a_long_request(server):
    watchdog = StubWatchdog(server, [TINY])
    (stub,) = watchdog.stubs()[TINY]
    outcome = {}

    def long_request():
        try:
            outcome["result"] = DiffusionClient(f"grpc://{server.grpc_url}", TINY).generate(
                "long", seed=1, height=512, width=512, steps=50)
        except ServerError as exc:
            outcome["result"] = exc

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(2.5)  # denoising now
    psutil.Process(stub).kill()
    thread.join(timeout=60)
    return outcome["result"], stub


def test_killed_stub_fails_its_request_and_triton_alone_does_not_recover(fault_server):
    result, _ = kill_stub_during_a_long_request(fault_server)
    assert isinstance(result, ServerError) and "is not healthy" in str(result)
    # Triton 2.51's own behaviour: the model still reports READY, yet every request fails.
    assert httpclient.InferenceServerClient(fault_server.http_url).is_model_ready(TINY)
    with pytest.raises(ServerError, match="is not healthy"):
        DiffusionClient(f"grpc://{fault_server.grpc_url}", TINY).generate("after", seed=2, height=64, width=64)
    fault_server.reload_model(TINY)  # what the watchdog does
    assert DiffusionClient(f"grpc://{fault_server.grpc_url}", TINY).generate("back", seed=3, height=64, width=64)


def test_watchdog_reloads_the_model_after_its_stub_dies(fault_server):
    watchdog = StubWatchdog(fault_server, [TINY], interval=0.5).start()
    try:
        result, old_stub = kill_stub_during_a_long_request(fault_server)
        assert isinstance(result, ServerError)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                back = DiffusionClient(f"grpc://{fault_server.grpc_url}", TINY).generate("back", seed=4, height=64, width=64)
                break
            except ServerError:
                time.sleep(0.5)
        else:
            raise AssertionError("the model did not come back within 120 s")
        assert back.array.shape == (64, 64, 3)
        assert watchdog.reloads == [TINY]
        assert old_stub not in watchdog.stubs()[TINY]
    finally:
        watchdog.stop()


def test_model_with_missing_weights_fails_to_load_and_others_serve(tmp_path):
    import shutil

    from perf.variants import render_config, write_variant
    from triton_diffusion.launcher import DEFAULT_MODEL_REPOSITORY, ServerConfig, TritonServer, free_port

    repository = tmp_path / "repo"
    shutil.copytree(DEFAULT_MODEL_REPOSITORY / TINY, repository / TINY)
    write_variant(repository, "missing_weights", render_config("missing_weights", {"pretrained_model": str(tmp_path / "nowhere")}, None))
    config = ServerConfig(model_repository=repository, models=[TINY, "missing_weights"], http_port=free_port(),
                          grpc_port=free_port(), metrics_port=free_port(), env={"HF_HUB_OFFLINE": "1"})
    with TritonServer(config, log_path=tmp_path / "server.log") as server:
        states = server.wait_ready(240)
        assert states["missing_weights"]["state"] == "UNAVAILABLE"
        assert "does not exist" in states["missing_weights"]["reason"]
        assert states[TINY]["state"] == "READY"
        assert DiffusionClient(f"grpc://{server.grpc_url}", TINY).generate("ok", seed=1, height=64, width=64)
