"""Closed by default: what listens where, the admin key, and the guard's bounds.

The server tests run the product as users do (``triton-diffusion serve`` in a subprocess) and
attack it from this host's non-loopback address, so a socket bound to 0.0.0.0 would be caught.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client import DiffusionClient
from testing import harness
from triton_diffusion import guard, model_config, security
from triton_diffusion.launcher import free_port

from .conftest import OFFLINE

MODEL = "tiny_shapes"


# -- the pure rules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1", True), ("127.0.0.5", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.0.2.2", False), ("example.org", False), ("", False)])
def test_what_counts_as_loopback(address, loopback):
    assert security.is_loopback(address) is loopback


def test_keys_come_from_a_value_or_a_file_and_must_be_strong(tmp_path):
    key = secrets.token_urlsafe(24)
    assert security.load_keys(None, None, "k") == ()
    assert security.load_keys(f"{key}, {key}x", None, "k") == (key, key + "x")
    (tmp_path / "keys").write_text(f"# rotated monthly\n{key}\n\n{key}y\n")
    assert security.load_keys(None, tmp_path / "keys", "k") == (key, key + "y")
    for bad, message in [("short", "16 to 512"), ("a" * 20 + ":b=c", "16 to 512"), ("a" * 20 + ",", None)]:
        if message:
            with pytest.raises(security.SecurityError, match=message):
                security.load_keys(bad, None, "k")
    with pytest.raises(security.SecurityError, match="not both"):
        security.load_keys(key, tmp_path / "keys", "k")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(security.SecurityError, match="holds no key"):
        security.load_keys(None, tmp_path / "empty", "k")
    with pytest.raises(security.SecurityError, match="cannot read"):
        security.load_keys(None, tmp_path / "missing", "k")
    with pytest.raises(security.SecurityError, match="one key"):
        security.load_key(f"{key},{key}z", None, "admin key")


def test_exposure_without_a_key_is_refused_and_flags_restrict_the_admin_apis():
    security.check_exposure("127.0.0.1", None, "Triton", "a key")
    with pytest.raises(security.SecurityError, match="beyond loopback"):
        security.check_exposure("0.0.0.0", None, "Triton", "a key")
    security.check_exposure("0.0.0.0", "k" * 16, "Triton", "a key")
    assert security.restriction_flags(None) == []
    http, grpc = security.restriction_flags("k" * 16)
    for flag in (http, grpc):
        assert flag.endswith(":admin-key=" + "k" * 16)
        assert all(api in flag for api in ("model-repository", "shared-memory", "trace", "logging"))
        assert "inference" not in flag and "health" not in flag and "statistics" not in flag
    assert security.admin_headers("k" * 16, "grpc") == {"triton-grpc-protocol-admin-key": "k" * 16}
    assert security.key_matches("k" * 16, ("x" * 16, "k" * 16)) and not security.key_matches("k" * 15, ("k" * 16,))
    assert not security.key_matches(None, ("k" * 16,))
    assert security.redact(["--x=a:admin-key=SECRETSECRETSECRET"], {"key": "SECRETSECRETSECRET"}) == ["--x=a:admin-key=<key>"]


def test_the_guard_admits_the_largest_valid_request_and_nothing_far_beyond():
    config = model_config.as_dict(model_config.shipped(MODEL))
    settings = config["parameters"]
    rows = config["max_batch_size"]
    pixels = int(settings["max_input_image_pixels"]["string_value"])
    largest = guard.largest_request_bytes(config)
    # 16 rows, each two prompts at the byte limit, an adapter's name at its limit, the largest source
    # image and seven scalars
    assert largest == rows * (2 * (4096 + 4) + (256 + 4) + pixels * 3 + 7 * 8)
    limits = guard.limits_for([config, {"name": "a front", "parameters": {}}])
    assert largest < limits.grpc_message_bytes <= largest + guard.MIB + 4 * guard.MIB
    assert limits.http_body_bytes >= 4 * largest  # JSON spends up to 4 characters per uint8
    budget = guard.ByteBudget(10)
    assert budget.take(6) and not budget.take(5) and budget.refused == 1
    budget.give(6)
    assert budget.take(10)


# -- a real server, attacked from this host's non-loopback address -----------------------------------
def outside_address() -> str:
    """An address of this host that is not loopback: a client using it is 'from the network'."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not security.is_loopback(address.address):
                return address.address
    pytest.skip("this host has no non-loopback IPv4 address to attack from")


class Served:
    """``triton-diffusion serve`` as a user runs it, on free ports."""

    def __init__(self, tmp_path: Path, *args: str, env: dict = None):
        self.ports = [free_port() for _ in range(3)]
        self.log = tmp_path / "serve.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "triton_diffusion.cli", "serve", "--models", MODEL, "--http-port", str(self.ports[0]),
             "--grpc-port", str(self.ports[1]), "--metrics-port", str(self.ports[2]), *args],
            env={**os.environ, **OFFLINE, **(env or {})}, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        harness.wait_until(lambda: self.process.poll() is not None or "listening:" in self.log.read_text(),
                           "the server to be ready", timeout=300)
        assert self.process.poll() is None, self.log.read_text()

    def tritonserver(self) -> psutil.Process:
        (server,) = [p for p in psutil.Process(self.process.pid).children() if p.name() == "tritonserver"]
        return server

    def listening(self, process: psutil.Process) -> set[str]:
        return {c.laddr.ip for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(120)


def http(method: str, url: str, body: dict = None, headers: dict = None, timeout: float = 30):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def evil_load_body(marker: Path) -> dict:
    """Triton's load API with a config and a model.py of the caller's own: code execution as the
    server's user, unless the model-repository API is restricted."""
    code = f"open({str(marker)!r}, 'w').write('ran')\nclass TritonPythonModel:\n    def execute(self, requests):\n        return []\n"
    config = {"name": "evil", "backend": "python", "max_batch_size": 0,
              "input": [{"name": "IN", "data_type": "TYPE_FP32", "dims": [1]}],
              "output": [{"name": "OUT", "data_type": "TYPE_FP32", "dims": [1]}]}
    return {"parameters": {"config": json.dumps(config), "file:1/model.py": base64.b64encode(code.encode()).decode()}}


# The stated bounds on what hostile requests may leave behind (growth after the corpus).
TRITON_RSS_BOUND = 128 * guard.MIB
STUB_RSS_BOUND = 128 * guard.MIB
SHM_BOUND = 16 * guard.MIB  # at most one growth step of a stub's region (shm-growth-byte-size)


def memory_of(triton: psutil.Process) -> dict:
    """RSS of tritonserver and of its stubs, and the bytes of their shared-memory regions."""
    stubs = triton.children()
    regions = [stub.cmdline()[2] for stub in stubs]
    return {"tritonserver": triton.memory_info().rss, "stubs": sum(stub.memory_info().rss for stub in stubs),
            "shm": sum((Path("/dev/shm") / region).stat().st_size for region in regions)}


def test_the_default_launch_listens_on_loopback_only(tmp_path):
    outside = outside_address()
    served = Served(tmp_path)
    try:
        triton = served.tritonserver()
        assert served.listening(triton) <= {"127.0.0.1", "::ffff:127.0.0.1"}, served.listening(triton)
        assert len([c for c in triton.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]) == 3
        for port in served.ports:  # the load-with-code request cannot even connect from outside
            with pytest.raises(OSError):
                socket.create_connection((outside, port), timeout=5).close()
        assert "open, loopback only" in served.log.read_text()
    finally:
        assert served.stop() == 0


def test_beyond_loopback_the_admin_apis_need_the_key_and_requests_are_bounded(tmp_path):
    outside = outside_address()
    key = secrets.token_urlsafe(32)
    (tmp_path / "admin.key").write_text(key + "\n")
    refused = subprocess.run([sys.executable, "-m", "triton_diffusion.cli", "serve", "--address", "0.0.0.0", "--models", MODEL],
                             env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "no key" in refused.stdout + refused.stderr

    served = Served(tmp_path, "--address", "0.0.0.0", "--admin-key-file", str(tmp_path / "admin.key"))
    try:
        triton = served.tritonserver()
        assert served.listening(triton) <= {"127.0.0.1", "::ffff:127.0.0.1"}  # the guard alone listens beyond
        assert key not in " ".join(psutil.Process(served.process.pid).cmdline())
        base = f"http://{outside}:{served.ports[0]}"

        # Health, inference metadata and metrics stay open; the admin APIs are refused without the key.
        assert http("GET", f"{base}/v2/health/ready")[0] == 200
        assert http("GET", f"http://{outside}:{served.ports[2]}/metrics")[0] == 200
        marker = tmp_path / "evil-ran"
        for headers in ({}, {"admin-key": "wrong" + key}, {"Admin-Key": key[:-1]}):
            status, body = http("POST", f"{base}/v2/repository/models/evil/load", evil_load_body(marker), headers)
            assert status == 403 and b"restricted" in body, (headers, status, body)
        for path in ("/v2/repository/index", "/v2/systemsharedmemory/status", "/v2/trace/setting", "/v2/logging"):
            assert http("POST" if "index" in path else "GET", base + path)[0] == 403, path
        grpc = grpcclient.InferenceServerClient(f"{outside}:{served.ports[1]}")
        with pytest.raises(InferenceServerException, match="restricted"):
            grpc.get_model_repository_index()
        with pytest.raises(InferenceServerException, match="restricted"):
            grpc.load_model("evil", config=evil_load_body(marker)["parameters"]["config"],
                            files={"file:1/model.py": b"raise SystemExit"})
        assert not marker.exists()

        # With the key the same request works (over HTTP and gRPC): the key is the whole gate.
        assert grpc.get_model_repository_index(headers=security.admin_headers(key, "grpc"))
        status, body = http("POST", f"{base}/v2/repository/models/evil/load", evil_load_body(marker), {"admin-key": key})
        assert status == 200, body
        assert marker.read_text() == "ran"

        # The Model Analyzer recipe's shim adds the key to tritonclient's repository calls (gRPC and HTTP).
        from perf.model_analyzer import ADD_ADMIN_KEY

        shimmed = subprocess.run(
            [sys.executable, "-c", ADD_ADMIN_KEY + f"""
import tritonclient.grpc as g, tritonclient.http as h
assert g.InferenceServerClient("{outside}:{served.ports[1]}").get_model_repository_index()
assert h.InferenceServerClient("{outside}:{served.ports[0]}").get_model_repository_index()
print("ok")"""], env={**os.environ, "TRITON_DIFFUSION_ADMIN_KEY": key}, capture_output=True, text=True, timeout=120)
        assert shimmed.stdout.strip() == "ok", shimmed.stderr[-2000:]

        # Inference works from outside, through the guard, for the project's client.
        result = DiffusionClient(f"grpc://{outside}:{served.ports[1]}", MODEL).generate("a red circle", seed=3, steps=2)
        assert result.array.shape == (64, 64, 3)

        # The bad-input corpus (tests/test_bad_input.py) and tensors far beyond the largest valid
        # request, from outside: each refused, and tritonserver, the stub and their shared memory
        # stay within the stated bound of where they started.
        from .test_bad_input import BAD, send

        before = memory_of(triton)
        for label, inputs, _ in BAD:
            assert isinstance(send(f"{outside}:{served.ports[1]}", inputs, MODEL), InferenceServerException), label
        for size in (64 * guard.MIB, 256 * guard.MIB):  # gRPC refuses the message from its length
            huge = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
            huge.set_data_from_numpy(np.array([[b"x" * size]], dtype=object))
            with pytest.raises(InferenceServerException, match="RESOURCE_EXHAUSTED|larger than max"):
                grpc.infer(MODEL, [huge])
            del huge
        image = grpcclient.InferInput("IMAGE", [16, 2048, 2048, 3], "UINT8")  # 201 MB of pixels
        image.set_data_from_numpy(np.zeros((16, 2048, 2048, 3), np.uint8))
        with pytest.raises(InferenceServerException, match="RESOURCE_EXHAUSTED|larger than max"):
            grpc.infer(MODEL, [image])
        del image
        status, _ = http("POST", f"{base}/v2/models/{MODEL}/infer", None,  # HTTP, from the declared size
                         {"Content-Length": str(2**34), "Content-Type": "application/json"})
        assert status == 413
        status, _ = http("POST", f"{base}/v2/models/{MODEL}/infer", {"inputs": [], "pad": "x" * (64 * guard.MIB)})
        assert status == 413
        assert http("GET", f"{base}/v2/health/ready")[0] == 200
        growth = {name: value - before[name] for name, value in memory_of(triton).items()}
        print("memory growth after the corpus (MiB):", {k: round(v / guard.MIB, 1) for k, v in growth.items()})
        assert growth["tritonserver"] < TRITON_RSS_BOUND and growth["stubs"] < STUB_RSS_BOUND, growth
        assert growth["shm"] <= SHM_BOUND, growth
    finally:
        assert served.stop() == 0
