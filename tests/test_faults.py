"""Faults: the Python-backend stub killed mid-request; a model whose weights are missing."""

import os
import threading

import psutil
import pytest
import tritonclient.http as httpclient

from client import DiffusionClient, ServerError
from testing import harness
from triton_diffusion import model_config
from triton_diffusion.families import sdxl
from triton_diffusion.launcher import SHM_ROOT, StubWatchdog

from .conftest import STEPS, TINY, metric, start_server, wait_until_denoising


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

    steps_before = metric(server, STEPS)
    thread = threading.Thread(target=long_request)
    thread.start()
    wait_until_denoising(server, steps_before)
    psutil.Process(stub).kill()
    thread.join(timeout=60)
    return outcome["result"], stub


def test_killed_stub_fails_its_request_and_triton_alone_does_not_recover(fault_server):
    result, stub = kill_stub_during_a_long_request(fault_server)
    assert isinstance(result, ServerError) and "is not healthy" in str(result)
    # Triton 2.51's own behaviour: the model still reports READY, yet every request fails, and the
    # version the dead stub held requests of can never unload.
    assert httpclient.InferenceServerClient(fault_server.http_url).is_model_ready(TINY)
    with pytest.raises(ServerError, match="is not healthy"):
        DiffusionClient(f"grpc://{fault_server.grpc_url}", TINY).generate("after", seed=2, height=64, width=64)
    assert not fault_server.unload_within(TINY, timeout=10)
    assert fault_server.model_states()[TINY]["state"] == "UNLOADING"
    assert psutil.Process(stub).status() == psutil.STATUS_ZOMBIE
    region = SHM_ROOT / next(n for n in os.listdir(SHM_ROOT) if n.startswith(fault_server.shm_prefix))
    fault_server.restart(stuck=[TINY])  # what the watchdog does then
    assert not psutil.pid_exists(stub) and not region.exists()
    back = DiffusionClient(f"grpc://{fault_server.grpc_url}", TINY).generate("back", seed=3, height=64, width=64)
    assert back.array.shape == (64, 64, 3) and back.seed == 3


def test_watchdog_restarts_the_server_when_a_stub_dies_holding_a_request(fault_server):
    watchdog = StubWatchdog(fault_server, [TINY], interval=0.5).start()
    try:
        result, old_stub = kill_stub_during_a_long_request(fault_server)
        assert isinstance(result, ServerError)
        harness.wait_until(lambda: watchdog.restarts, "the watchdog to restart the server", timeout=240)
        assert fault_server.model_states()[TINY]["state"] == "READY"
        back = DiffusionClient(f"grpc://{fault_server.grpc_url}", TINY).generate("back", seed=4, height=64, width=64)
        assert back.array.shape == (64, 64, 3)
        assert watchdog.restarts == [TINY] and watchdog.reloads == []
        assert not psutil.pid_exists(old_stub)  # reaped with the old tritonserver: no zombie
    finally:
        watchdog.stop()


class RequestLoop:
    """Small requests one after another in a thread, until stopped; counts successes and failures."""

    def __init__(self, server):
        self.server, self.ok, self.failures = server, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with DiffusionClient(f"grpc://{self.server.grpc_url}", TINY, timeout_s=120) as client:
            while not self._stop.is_set():
                try:
                    client.generate("a lighthouse", seed=self.ok, height=64, width=64, steps=2)
                    self.ok += 1
                except ServerError as exc:
                    self.failures.append(str(exc))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=120)

    def wait_for_successes(self, more: int):
        target = self.ok + more
        harness.wait_until(lambda: self.ok >= target or self.failures, f"{more} more successful requests", timeout=240)


def test_a_config_loaded_through_the_api_is_a_reload_not_a_crash_and_survives_a_later_crash(fault_server):
    """Editing a config through Triton's load API (what Model Analyzer does) swaps the stub: the
    watchdog must neither count that as a crash nor revert the config, and after a real crash it
    reloads with the config being served, not config.pbtxt."""
    watchdog = StubWatchdog(fault_server, [TINY], interval=0.5).start()
    try:
        with RequestLoop(fault_server) as loop:
            loop.wait_for_successes(2)
            config = fault_server.served_config(TINY)
            config["max_batch_size"] = 4
            # Triton fills in preferred_batch_size=[max_batch_size] when config.pbtxt names none
            config["dynamic_batching"].update(preferred_batch_size=[4], max_queue_delay_microseconds=5000)
            (old_stub,) = watchdog.stubs()[TINY]
            fault_server.load_model(TINY, config)
            harness.wait_until(lambda: old_stub not in watchdog.stubs()[TINY], "the old stub to be retired", timeout=120)
            polls = watchdog.polls
            harness.wait_until(lambda: watchdog.polls >= polls + 2, "the watchdog to look at the swap", timeout=120)
            loop.wait_for_successes(2)
        assert loop.failures == [] and watchdog.reloads == []
        assert fault_server.served_config(TINY)["max_batch_size"] == 4

        (stub,) = watchdog.stubs()[TINY]
        psutil.Process(stub).kill()
        # killed idle, the stub held no request: the model unloads, and a reload is enough
        harness.wait_until(lambda: watchdog.reloads, "the watchdog to heal the crash", timeout=240)
        harness.wait_until(lambda: fault_server.model_states()[TINY]["state"] == "READY", "the model to be READY", timeout=240)
        served = fault_server.served_config(TINY)
        assert served["max_batch_size"] == 4 and int(served["dynamic_batching"]["max_queue_delay_microseconds"]) == 5000
        back = DiffusionClient(f"grpc://{fault_server.grpc_url}", TINY).generate("back", seed=5, height=64, width=64)
        assert back.array.shape == (64, 64, 3)
    finally:
        watchdog.stop()


def test_broken_configs_fail_to_load_with_a_message_naming_the_problem_and_others_serve(tmp_path):
    repository = tmp_path / "repo"
    model_config.write_model(repository, model_config.shipped(TINY))
    broken = {
        "missing_weights": ({"pretrained_model": str(tmp_path / "nowhere")}, "does not exist"),
        "unknown_parameter": ({"max_step": "5"}, "'max_step' is not a known parameter (did you mean 'max_steps'?)"),
        "pixels_never_bind": ({"max_pixels": str(768 * 768)}, "max_pixels=589824 can never reject a request"),
        # the fp8 fidelity guard with a bound no quantization meets (fp8 weights: runs on the CPU too)
        "fp8_bound_zero": ({"quantization": "fp8_weight_only", "speed_devices": "cpu", "fp8_max_relative_error": "0"},
                           "failed its fidelity check: the latents of a fixed-seed call differ from the unquantized "
                           "model's by"),
    }
    for name, (parameters, _) in broken.items():
        model_config.write_model(repository, model_config.variant(name, parameters))
    unknown_input = model_config.variant("unknown_input")
    unknown_input.input.add(name="COLOUR", data_type=model_config.model_config_pb2.TYPE_STRING, dims=[1], optional=True)
    model_config.write_model(repository, unknown_input)
    broken["unknown_input"] = ({}, "declares input 'COLOUR', which this backend does not understand")
    # batching: continuous makes a model decoupled (auto_complete_config); the converse is refused
    decoupled_dynamic = model_config.variant("decoupled_dynamic")
    decoupled_dynamic.model_transaction_policy.decoupled = True
    model_config.write_model(repository, decoupled_dynamic)
    broken["decoupled_dynamic"] = ({}, "model_transaction_policy { decoupled: true } go together")
    no_step_model = model_config.variant("continuous_sdxl", {"batching": "continuous"}, base="sdxl_tiny")
    model_config.write_model(repository, no_step_model, base="sdxl_tiny")
    broken["continuous_sdxl"] = ({}, f"continuous batching has no step model for {sdxl.FAMILY.pipelines[0]}")

    # Triton 2.51 can wait out its whole exit timeout when stopping beside models that failed to load.
    with start_server(tmp_path, [TINY, *broken], repository=repository, extra_args=("--exit-timeout-secs=5",)) as server:
        states = server.model_states()
        for name, (_, message) in broken.items():
            assert states[name]["state"] == "UNAVAILABLE", (name, states[name])
            assert message in states[name]["reason"], (name, states[name]["reason"])
        assert states[TINY]["state"] == "READY"
        result = DiffusionClient(f"grpc://{server.grpc_url}", TINY).generate("ok", seed=1, height=64, width=64)
        assert result.array.shape == (64, 64, 3)
