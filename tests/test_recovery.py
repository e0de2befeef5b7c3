"""No client waits forever, and a dead stub leaves nothing behind.

Triton 2.51 never answers (nor releases) the requests a dead stub held: a continuous model's
streams would wait forever and the model version would never unload. ``triton-diffusion serve``
(run here as users run it) recovers the model and frees that version by restarting tritonserver,
which ends every such stream with an error. Also: a continuous model that refused requests
(queue full) unloads and loads again, and the streaming path keeps Triton's status codes.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient

from client import AsyncDiffusionClient, DiffusionClient, RetryPolicy, ServerError
from triton_diffusion import harness
from triton_diffusion.launcher import DEFAULT_MODEL_REPOSITORY, SHM_ROOT, free_port
from triton_diffusion.overrides import BatchingOverrides, derived_repository

from .conftest import OFFLINE, start_server

CONTINUOUS = "stable_diffusion_tiny_continuous"
ERROR_BOUND_S = 30  # the stated bound: every held request gets an error within this after the kill
NO_RETRY = RetryPolicy(attempts=1)


class Serve:
    """``triton-diffusion serve`` (with its watchdog) in a subprocess, on free ports."""

    def __init__(self, tmp_path: Path, models: list[str]):
        self.http, self.grpc, self.metrics = (free_port() for _ in range(3))
        self.log = tmp_path / "serve.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "triton_diffusion.cli", "serve", "--models", ",".join(models),
             "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics)],
            env={**os.environ, **OFFLINE}, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        harness.wait_until(lambda: self.process.poll() is not None or "listening:" in self.log.read_text(),
                           "the server to be ready", timeout=300)
        assert self.process.poll() is None, self.log.read_text()

    def stubs(self, model: str) -> list[psutil.Process]:
        found = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                command = child.cmdline()
            except psutil.Error:
                continue
            if command and command[0].endswith("triton_python_backend_stub") and f"/{model}/" in command[1]:
                found.append(child)
        return found

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=30) as response:
            text = response.read().decode()
        return sum(float(value) for value in re.findall(rf"^{name}{{[^}}]*}} (\S+)", text, re.M))

    def state(self, model: str) -> str:
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{self.http}/v2/repository/index",
                                                           method="POST"), timeout=30) as response:
            return {e["name"]: e.get("state") for e in json.load(response)}.get(model)


def test_a_continuous_stub_killed_with_four_streams_in_flight_answers_all_four_and_leaves_nothing(tmp_path):
    served = Serve(tmp_path, [CONTINUOUS])
    gateway_port = free_port()
    gateway = subprocess.Popen([sys.executable, "-m", "triton_diffusion.cli", "gateway", "--triton",
                                f"grpc://127.0.0.1:{served.grpc}", "--model", CONTINUOUS, "--port", str(gateway_port)],
                               stdout=open(tmp_path / "gateway.log", "w"), stderr=subprocess.STDOUT)
    try:
        harness.wait_until(lambda: harness._answers(f"http://127.0.0.1:{gateway_port}/health"), "the gateway", timeout=120)
        (stub,) = served.stubs(CONTINUOUS)
        region = stub.cmdline()[2]  # the stub's shared-memory region
        assert (SHM_ROOT / region).exists()
        long = dict(steps=50, height=512, width=512)
        outcomes: dict[str, tuple[float, object]] = {}

        def record(name, work):
            try:
                outcome = work()
            except Exception as exc:  # noqa: BLE001 - what each client gets is the point
                outcome = exc
            outcomes[name] = (time.monotonic(), outcome)

        def project_sync():
            return DiffusionClient(f"grpc://127.0.0.1:{served.grpc}", CONTINUOUS, retry=NO_RETRY).generate("a", seed=1, **long)

        def project_asyncio():
            async def run():
                async with AsyncDiffusionClient(f"grpc://127.0.0.1:{served.grpc}", CONTINUOUS, retry=NO_RETRY) as c:
                    return await c.generate("b", seed=2, **long)
            return asyncio.run(run())

        def plain_tritonclient_stream():
            client, answers = grpcclient.InferenceServerClient(f"127.0.0.1:{served.grpc}"), queue.Queue()
            client.start_stream(lambda result, error: answers.put((result, error)))
            inputs = []
            for name, value, kind in [("PROMPT", np.array([[b"c"]], dtype=object), "BYTES"),
                                      ("NUM_INFERENCE_STEPS", np.array([[50]], np.int32), "INT32"),
                                      ("HEIGHT", np.array([[512]], np.int32), "INT32"), ("WIDTH", np.array([[512]], np.int32), "INT32")]:
                inputs.append(grpcclient.InferInput(name, list(value.shape), kind))
                inputs[-1].set_data_from_numpy(value)
            client.async_stream_infer(CONTINUOUS, inputs)
            result, error = answers.get(timeout=300)  # a bound of the test's own, far beyond ERROR_BOUND_S
            return error if error is not None else result

        def through_the_gateway():
            body = json.dumps({"prompt": "d", "seed": 4, "steps": 50, "size": "512x512"}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{gateway_port}/v1/images/generations", data=body,
                                             headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=300) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        clients = {"sync": project_sync, "asyncio": project_asyncio, "plain": plain_tritonclient_stream,
                   "gateway": through_the_gateway}
        threads = [threading.Thread(target=record, args=item, daemon=True) for item in clients.items()]
        for thread in threads:
            thread.start()
        harness.wait_until(lambda: served.metric("diffusion_continuous_admissions_total") >= 4, "4 rows admitted", 240)
        steps = served.metric("diffusion_denoising_steps_total")
        harness.wait_until(lambda: served.metric("diffusion_denoising_steps_total") > steps, "a step of all 4", 240)
        stub.kill()
        killed = time.monotonic()
        for thread in threads:
            thread.join(timeout=300)

        assert set(outcomes) == set(clients), f"clients still waiting: {set(clients) - set(outcomes)}"
        for name, (when, outcome) in outcomes.items():
            assert when - killed < ERROR_BOUND_S, f"{name} waited {when - killed:.1f}s"
            if name == "gateway":
                status, body = outcome
                assert status == 503 and body["error"]["type"] == "server_error" and body["error"]["message"], outcome
            elif name == "plain":
                assert isinstance(outcome, Exception) and "UNAVAILABLE" in str(outcome.status()), outcome
            else:
                assert isinstance(outcome, ServerError) and outcome.status == "StatusCode.UNAVAILABLE", outcome
                assert outcome.retryable

        # The model serves again, from one live stub; the dead one is gone (no zombie), its region
        # unlinked, and the version that could never unload went with the old tritonserver.
        harness.wait_until(lambda: "tritonserver restarted" in served.log.read_text(), "the watchdog's restart", 300)
        assert served.state(CONTINUOUS) == "READY"
        back = DiffusionClient(f"grpc://127.0.0.1:{served.grpc}", CONTINUOUS).generate("back", seed=5, steps=2, height=64, width=64)
        assert back.array.shape == (64, 64, 3)
        (new_stub,) = served.stubs(CONTINUOUS)
        assert new_stub.pid != stub.pid and not psutil.pid_exists(stub.pid)
        assert not (SHM_ROOT / region).exists()
    finally:
        gateway.terminate()
        gateway.wait(60)
        served.process.terminate()
        code = served.process.wait(120)
    log = served.log.read_text()
    assert code == 0 and "Exit timeout expired" not in log, log[-2000:]
    assert not [path for path in SHM_ROOT.glob("tdiff_*") if path.name.startswith(region[:18])]


def test_a_continuous_model_that_refused_requests_unloads_and_loads_again_with_one_stub(tmp_path):
    repository = derived_repository(DEFAULT_MODEL_REPOSITORY, [CONTINUOUS], BatchingOverrides(max_queue_size=1))
    server = start_server(tmp_path, [CONTINUOUS], repository=repository, require_ready=True)
    try:
        def one(seed):
            try:
                return DiffusionClient(f"grpc://{server.grpc_url}", CONTINUOUS, retry=NO_RETRY).generate(
                    "x", seed=seed, steps=20, height=64, width=64)
            except ServerError as exc:
                return exc

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(one, range(16)))
        refused = [o for o in outcomes if isinstance(o, ServerError)]
        assert refused and len(refused) < 16
        for exc in refused:  # queue full: retryable UNAVAILABLE on the stream, as on a unary call
            assert exc.status == "StatusCode.UNAVAILABLE" and exc.retryable and "queue" in str(exc), exc

        stub_before = {p.pid for p in psutil.Process(server.process.pid).children(recursive=True)}
        server._get(f"/v2/repository/models/{CONTINUOUS}/unload", method="POST", timeout=120)
        harness.wait_until(lambda: server.model_states()[CONTINUOUS].get("state") == "UNAVAILABLE", "the unload", 120)
        harness.wait_until(lambda: not psutil.Process(server.process.pid).children(recursive=True), "the stub to exit", 60)
        server.load_model(CONTINUOUS)
        assert server.model_states()[CONTINUOUS]["state"] == "READY"
        stubs = psutil.Process(server.process.pid).children(recursive=True)
        assert len(stubs) == 1 and stubs[0].pid not in stub_before
        assert one(99).array.shape == (64, 64, 3)
    finally:
        started = time.monotonic()
        code = server.stop(timeout=60)
        stopped_in = time.monotonic() - started
        import shutil

        shutil.rmtree(repository, ignore_errors=True)
    assert code == 0 and stopped_in < 25, (code, stopped_in)


@pytest.mark.parametrize("model", [CONTINUOUS, "stable_diffusion_tiny"])
def test_a_bad_request_is_invalid_argument_on_both_paths_for_both_clients(server_for_codes, model):
    url = f"grpc://{server_for_codes.grpc_url}"
    with pytest.raises(ServerError, match="NUM_INFERENCE_STEPS=0 is outside") as sync_error:
        DiffusionClient(url, model, retry=NO_RETRY).generate("x", steps=0)
    assert sync_error.value.status == "StatusCode.INVALID_ARGUMENT" and not sync_error.value.retryable

    async def run():
        async with AsyncDiffusionClient(url, model, retry=NO_RETRY) as client:
            await client.generate("x", steps=0)

    with pytest.raises(ServerError, match="NUM_INFERENCE_STEPS=0 is outside") as async_error:
        asyncio.run(run())
    assert async_error.value.status == "StatusCode.INVALID_ARGUMENT"


@pytest.fixture(scope="module")
def server_for_codes(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("codes"), [CONTINUOUS, "stable_diffusion_tiny"], require_ready=True)
    yield server
    server.stop()
