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
from testing import harness
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
        # Each got an error: the restart's (its stream ended: UNAVAILABLE) or, where a progress
        # message was in flight as the stub died, Triton's own ("Stub process ... is not healthy").
        for name, (when, outcome) in outcomes.items():
            assert when - killed < ERROR_BOUND_S, f"{name} waited {when - killed:.1f}s"
            if name == "gateway":
                status, body = outcome
                assert status in (500, 503) and body["error"]["type"] == "server_error" and body["error"]["message"], outcome
            elif name == "plain":
                assert isinstance(outcome, Exception) and "UNAVAILABLE" in str(outcome.status()), outcome
            else:
                assert isinstance(outcome, ServerError), outcome
                assert outcome.status == "StatusCode.UNAVAILABLE" or "is not healthy" in str(outcome), outcome

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

        async def many():  # the asyncio client, as the gateway uses it
            async with AsyncDiffusionClient(f"grpc://{server.grpc_url}", CONTINUOUS, retry=NO_RETRY) as client:
                return await asyncio.gather(*(client.generate("y", seed=s, steps=20, height=64, width=64)
                                              for s in range(100, 116)), return_exceptions=True)

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(one, range(16)))
        outcomes += asyncio.run(many())
        refused = [o for o in outcomes if isinstance(o, ServerError)]
        assert refused and len(refused) < 32
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


def test_progress_reaches_both_clients_and_an_http_stream_disconnect_cancels_the_row(server_for_codes):
    url = f"grpc://{server_for_codes.grpc_url}"
    seen = []
    result = DiffusionClient(url, CONTINUOUS).generate("p", seed=1, steps=20, height=256, width=256, on_progress=seen.append)
    assert result.array.shape == (256, 256, 3)
    total = seen[0][0][1]
    assert seen[0].tolist() == [[0, total]] and total >= 20  # accepted: 0 steps done (PNDM adds a step)
    assert [int(message[0][0]) for message in seen] == sorted(int(message[0][0]) for message in seen)

    async def run():
        heard = []
        async with AsyncDiffusionClient(url, CONTINUOUS) as client:
            await client.generate("q", seed=2, steps=4, height=64, width=64, on_progress=heard.append)
        return heard

    assert asyncio.run(run())[0].tolist()[0][0] == 0

    # Triton 2.51's HTTP server notices a closed connection only when it writes: over
    # generate_stream with progress, the next progress event reveals it and Triton cancels the row.
    import socket

    cancelled = harness.metric(server_for_codes, "diffusion_requests_cancelled_total", CONTINUOUS)
    body = json.dumps({"PROMPT": "z", "NUM_INFERENCE_STEPS": 50, "HEIGHT": 512, "WIDTH": 512,
                       "parameters": {"progress": True}}).encode()
    host, port = server_for_codes.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=120) as caller:
        caller.sendall(f"POST /v2/models/{CONTINUOUS}/generate_stream HTTP/1.1\r\nHost: x\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        events = b""
        while b'"PROGRESS"' not in events:
            events += caller.recv(4096)
    assert b"data: {" in events
    harness.wait_for_metric(server_for_codes, "diffusion_requests_cancelled_total", CONTINUOUS, cancelled + 1)


SILENT_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    '''Accepts a request, says so once (PROGRESS), then never answers: a hung model whose process
    Triton still finds healthy. Unloading answers what it holds.'''

    def initialize(self, args):
        self.held = []

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("PROGRESS", np.array([[0, 10]], np.int32))]))
            self.held.append(sender)
        return None

    def finalize(self):
        for sender in self.held:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("unloaded")),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
"""


def test_a_stream_that_goes_silent_after_acceptance_fails_within_the_progress_timeout(tmp_path):
    model = tmp_path / "repo" / "silent"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(SILENT_MODEL)
    (model / "config.pbtxt").write_text("""name: "silent"
backend: "python"
max_batch_size: 8
input [ { name: "PROMPT", data_type: TYPE_STRING, dims: [ 1 ] } ]
output [ { name: "IMAGE", data_type: TYPE_UINT8, dims: [ -1, -1, 3 ] }, { name: "SEED", data_type: TYPE_INT64, dims: [ 1 ] },
         { name: "PROGRESS", data_type: TYPE_INT32, dims: [ 2 ] } ]
model_transaction_policy { decoupled: true }
instance_group [ { kind: KIND_CPU, count: 1 } ]
""")
    server = start_server(tmp_path, ["silent"], repository=tmp_path / "repo", require_ready=True)
    try:
        heard = []
        client = DiffusionClient(f"grpc://{server.grpc_url}", "silent", retry=NO_RETRY, progress_timeout_s=2)
        started = time.monotonic()
        with pytest.raises(ServerError, match="went silent") as raised:
            client.generate("x", on_progress=heard.append)
        assert raised.value.status == "StatusCode.UNAVAILABLE" and raised.value.retryable
        assert len(heard) == 1 and time.monotonic() - started < 60

        async def run():
            async with AsyncDiffusionClient(f"grpc://{server.grpc_url}", "silent", retry=NO_RETRY,
                                            progress_timeout_s=2) as aio:
                await aio.generate("y")

        with pytest.raises(ServerError, match="went silent"):
            asyncio.run(run())
    finally:
        server.stop()
