"""The gateway under hostile input: more than 100 bad requests, each a specific 4xx in OpenAI's
error format, none a 5xx or a hang, and memory (gateway, tritonserver, stubs, /dev/shm) bounded.

The gateway runs as users run it (``triton-diffusion gateway`` with an API key file) in front of a
real tritonserver serving a dynamic and a continuous model.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from testing import harness
from triton_diffusion.gateway import Gateway, GatewaySettings, ImagesBody, from_server_error, parse_body
from triton_diffusion.launcher import SHM_ROOT, free_port
from client import ServerError

from .conftest import start_server

DYNAMIC, CONTINUOUS = "tiny_shapes", "stable_diffusion_tiny_continuous"
MIB = 1024 * 1024
# The stated bounds: growth after the whole corpus (measured on this 2-core machine: see the
# docs/security.md for the numbers of a run).
GATEWAY_RSS_BOUND = 64 * MIB
GATEWAY_PEAK_BOUND = 128 * MIB  # its high-water mark: bodies are read up to the 25 MiB limit
TRITON_RSS_BOUND = 128 * MIB
STUB_RSS_BOUND = 128 * MIB


def png(width: int, height: int, rows: bytes = None, *, truncate: int = 0) -> bytes:
    """A PNG whose header says ``width`` x ``height``; its pixel data is zeros (compressed in
    chunks, so a 12000x12000 'bomb' is ~0.4 MB), or ``rows`` when given."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor, parts = zlib.compressobj(9), []
    if rows is None:
        line = b"\x00" * (width * 3 + 1)
        for _ in range(height):
            parts.append(compressor.compress(line))
    else:
        parts.append(compressor.compress(rows))
    data = b"".join(parts) + compressor.flush()
    if truncate:
        data = data[:truncate]
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def header_only_png(width: int, height: int) -> bytes:
    """IHDR of a ``width`` x ``height`` image and a few bytes of data: refused from the header."""
    return png(8, 8)[:16] + struct.pack(">II", width, height) + png(8, 8)[24:]


def encoded(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


SOURCE = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def corpus(key: str) -> list[tuple]:
    """(label, kind, request arguments, expected status) — kind: json, form, raw."""
    ok = {"prompt": "a red circle on a blue background", "steps": 2, "size": "64x64"}
    cases = [
        # keys and routes
        ("no key", "json", {"json": ok, "headers": {}}, 401),
        ("wrong key", "json", {"json": ok, "headers": {"Authorization": "Bearer " + secrets.token_urlsafe(32)}}, 401),
        ("key minus a character", "json", {"json": ok, "headers": {"Authorization": f"Bearer {key[:-1]}"}}, 401),
        ("key plus a character", "json", {"json": ok, "headers": {"Authorization": f"Bearer {key}x"}}, 401),
        ("empty bearer", "json", {"json": ok, "headers": {"Authorization": "Bearer "}}, 401),
        ("basic auth", "json", {"json": ok, "headers": {"Authorization": "Basic " + key}}, 401),
        ("key as a query parameter", "json", {"json": ok, "headers": {}, "path": f"/v1/images/generations?api_key={key}"}, 401),
        ("models without a key", "raw", {"method": "GET", "path": "/v1/models", "headers": {}}, 401),
        ("edits without a key", "form", {"data": {"prompt": "x"}, "files": {"image": ("a.png", encoded(SOURCE, "PNG"))},
                                         "headers": {}}, 401),
        ("docs off", "raw", {"method": "GET", "path": "/docs"}, 404),
        ("openapi off", "raw", {"method": "GET", "path": "/openapi.json"}, 404),
        ("redoc off", "raw", {"method": "GET", "path": "/redoc"}, 404),
        ("unknown route", "raw", {"method": "POST", "path": "/v1/chat/completions"}, 404),
        ("GET generations", "raw", {"method": "GET", "path": "/v1/images/generations"}, 405),
        ("PUT models", "raw", {"method": "PUT", "path": "/v1/models"}, 405),
        # framing
        ("not JSON", "raw", {"data": b"{bad"}, 400),
        ("invalid UTF-8", "raw", {"data": b'{"prompt": "\xff\xfe"}'}, 400),
        ("JSON array", "json", {"json": [ok]}, 400),
        ("JSON string", "json", {"json": "prompt"}, 400),
        ("JSON null", "raw", {"data": b"null"}, 400),
        ("JSON number", "raw", {"data": b"12"}, 400),
        ("empty body", "raw", {"data": b""}, 400),
        ("nested 100000 deep", "raw", {"data": b"[" * 100000 + b"]" * 100000}, 400),
        ("30 MB body", "raw", {"data": b'{"prompt": "' + b"x" * (30 * MIB) + b'"}'}, 413),
        ("declared 1 TB body", "socket", {"declared": 10**12, "body": b"{}"}, 413),
        ("chunked 30 MB body", "chunked", {"size": 30 * MIB}, 413),
        ("10000 unknown keys", "json", {"json": {**ok, **{f"k{i}": i for i in range(10000)}}}, 400),
    ]
    hostile = {
        "prompt": [None, 5, [], {}, "", "x" * 40000, True],
        "model": [5, [], {}, "../../etc/passwd", "x" * 300, "no_such_model", "tiny_shapes/../x", "", "tiny shapes"],
        "n": [0, 11, -1, 1.9, "2", True, 10**30, []],
        "size": ["4294967360x4294967360", "10**30", "64x64x64", "-64x64", "0x0", "64", 64, [], "99999x64",
                 "\u0661\u0662\u0668x\u0661\u0662\u0668", "64X"],
        "response_format": ["png", 5, "URL"],
        "quality": ["hd", "high", 5],
        "style": ["vivid", "natural"],
        "user": [5, "x" * 1000],
        "seed": [2**64, -1, 1.5, "7", 10**30, True, 2**63 - 1],
        "steps": [4294967306, 0, -1, 1.5, "10", 10001, 51],
        "guidance_scale": ["NaN", "Infinity", -1, 1e300, "7", 1001, 51],
        "negative_prompt": [5, [], "x" * 40000],
        "strength": [0.5],  # generations take no strength
        "step_cache": ["yes", 5, [], True],  # True: this model has no per-row step cache
        "foo": [1], "mask": ["x"], "background": ["transparent"],
    }
    for field, values in hostile.items():
        for value in values:
            if field == "guidance_scale" and value in ("NaN", "Infinity"):
                body = json.dumps({**ok, field: 0}).replace('"guidance_scale": 0', f'"guidance_scale": {value}').encode()
                cases.append((f"{field}={value}", "raw", {"data": body}, 400))
                continue
            body = {key: v for key, v in ok.items() if key != field} if value is None else {**ok, field: value}
            status = 404 if field == "model" and value not in (5, [], {}) and len(str(value)) <= 128 else 400
            cases.append((f"{field}={str(value)[:40]}", "json", {"json": body}, status))
    # the continuous model: its errors keep their codes through the gateway
    cases += [
        ("continuous steps=0", "json", {"json": {**ok, "model": CONTINUOUS, "steps": 0}}, 400),
        ("continuous size too big", "json", {"json": {**ok, "model": CONTINUOUS, "size": "4096x4096"}}, 400),
        ("edit on a text-only model", "form", {"data": {"prompt": "x", "model": CONTINUOUS},
                                               "files": {"image": ("a.png", encoded(SOURCE, "PNG"))}}, 400),
    ]
    image = ("a.png", encoded(SOURCE, "PNG"))
    cases += [
        ("edit without an image", "form", {"data": {"prompt": "x"}, "files": {}}, 400),
        ("edit with two images", "form", {"data": {"prompt": "x"}, "files": [("image", image), ("image", image)]}, 400),
        ("image as a text field", "form", {"data": {"prompt": "x", "image": "not a file"}, "files": {}}, 400),
        ("image of random bytes", "form", {"data": {"prompt": "x"}, "files": {"image": ("a.png", os.urandom(4096))}}, 400),
        ("GIF image", "form", {"data": {"prompt": "x"}, "files": {"image": ("a.gif", encoded(SOURCE, "GIF"))}}, 400),
        ("BMP image", "form", {"data": {"prompt": "x"}, "files": {"image": ("a.bmp", encoded(SOURCE, "BMP"))}}, 400),
        ("PNG bomb 12000x12000", "form", {"data": {"prompt": "x"}, "files": {"image": ("b.png", png(12000, 12000))}}, 400),
        ("PNG header 20000x20000", "form", {"data": {"prompt": "x"}, "files": {"image": ("b.png", header_only_png(20000, 20000))}}, 400),
        ("PNG header 2^31 wide", "form", {"data": {"prompt": "x"}, "files": {"image": ("b.png", header_only_png(2**31 - 1, 1))}}, 400),
        ("truncated PNG", "form", {"data": {"prompt": "x"}, "files": {"image": ("t.png", png(64, 64, truncate=20))}}, 400),
        ("JPEG 30000x30000 header", "form", {"data": {"prompt": "x"}, "files": {"image": ("j.jpg", jpeg_header(30000, 30000))}}, 400),
        ("mask", "form", {"data": {"prompt": "x"}, "files": {"image": image, "mask": image}}, 400),
        ("three files", "form", {"data": {"prompt": "x"}, "files": [("image", image), ("a", image), ("b", image)]}, 400),
        ("n=1.9 as text", "form", {"data": {"prompt": "x", "n": "1.9"}, "files": {"image": image}}, 400),
        ("n=abc", "form", {"data": {"prompt": "x", "n": "abc"}, "files": {"image": image}}, 400),
        ("steps wrapping INT32", "form", {"data": {"prompt": "x", "steps": "4294967306"}, "files": {"image": image}}, 400),
        ("strength 2", "form", {"data": {"prompt": "x", "strength": "2"}, "files": {"image": image}}, 400),
        ("prompt twice", "form", {"data": [("prompt", "x"), ("prompt", "y")], "files": {"image": image}}, 400),
        ("40 fields", "form", {"data": {"prompt": "x", **{f"f{i}": "1" for i in range(40)}}, "files": {"image": image}}, 400),
        ("a 200 KB text field", "form", {"data": {"prompt": "x" * 200_000}, "files": {"image": image}}, 400),
        ("JSON to edits", "json", {"json": ok, "path": "/v1/images/edits"}, 400),
        ("edit of a made-up model", "form", {"data": {"prompt": "x", "model": "made_up"}, "files": {"image": image}}, 404),
    ]
    cases += [(f"made-up model {i}", "json", {"json": {**ok, "model": f"made_up_{i}_{secrets.token_hex(4)}"}}, 404)
              for i in range(30)]
    return cases


def jpeg_header(width: int, height: int) -> bytes:
    """A JPEG whose SOF0 marker says ``width`` x ``height`` (the rest is a small image's)."""
    data = bytearray(encoded(SOURCE, "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", min(height, 65535), min(width, 65535))
    return bytes(data)


def send(base: str, key: str, kind: str, arguments: dict) -> requests.Response | tuple:
    headers = arguments.get("headers", {"Authorization": f"Bearer {key}"})
    path = arguments.get("path", "/v1/images/generations" if kind in ("json", "raw", "socket", "chunked") else "/v1/images/edits")
    url = base + path
    if kind == "json":
        return requests.post(url, json=arguments["json"], headers=headers, timeout=120)
    if kind == "form":
        return requests.post(url, data=arguments["data"], files=arguments["files"] or None, headers=headers, timeout=120)
    if kind == "raw":
        return requests.request(arguments.get("method", "POST"), url, data=arguments.get("data"),
                                headers={"Content-Type": "application/json", **headers}, timeout=120)
    if kind == "chunked":
        def chunks():
            block = b"x" * MIB
            yield b'{"prompt": "'
            for _ in range(arguments["size"] // MIB):
                yield block
        try:
            return requests.post(url, data=chunks(), headers={"Content-Type": "application/json", **headers}, timeout=120)
        except requests.ConnectionError:  # the server answered 413 and closed while we still sent
            return (413, {"error": {"message": "closed early", "type": "invalid_request_error"}})
    assert kind == "socket"
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {arguments['declared']}\r\n\r\n".encode() + arguments["body"])
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536) or b"\r\n\r\n"
        head, _, body = answer.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            more = sock.recv(65536)
            if not more:
                break
            body += more
    return (int(head.split(b" ", 2)[1]), json.loads(body))


def status_and_body(response) -> tuple[int, object]:
    if isinstance(response, tuple):
        return response
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


def peak_rss(process: psutil.Process) -> int:
    """The process's high-water mark of resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def memory(server, gateway: psutil.Process) -> dict:
    stubs = psutil.Process(server.process.pid).children(recursive=True)
    shm = sum(path.stat().st_size for path in SHM_ROOT.glob(server.shm_prefix + "*"))
    return {"gateway": gateway.memory_info().rss, "gateway peak": peak_rss(gateway), "tritonserver": server.process and psutil.Process(server.process.pid).memory_info().rss,
            **{f"stub {stub.cmdline()[1].split('/')[-3]}": stub.memory_info().rss for stub in stubs}, "shm": shm}


@pytest.fixture(scope="module")
def hostile_setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    server = start_server(work, [DYNAMIC, CONTINUOUS], name="hostile", require_ready=True)
    key = secrets.token_urlsafe(32)
    (work / "keys").write_text(f"{secrets.token_urlsafe(32)}\n{key}\n")  # two keys: rotation
    port = free_port()
    gateway = subprocess.Popen([sys.executable, "-m", "triton_diffusion.cli", "gateway", "--triton", f"grpc://{server.grpc_url}",
                                "--model", DYNAMIC, "--port", str(port), "--api-key-file", str(work / "keys")],
                               stdout=open(work / "gateway.log", "w"), stderr=subprocess.STDOUT)
    try:
        harness.wait_until(lambda: harness._answers(f"http://127.0.0.1:{port}/health"), "the gateway", timeout=120)
        yield server, f"http://127.0.0.1:{port}", key, psutil.Process(gateway.pid), work
    finally:
        gateway.terminate()
        gateway.wait(60)
        server.stop()


def good_requests(base: str, key: str) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    response = requests.post(base + "/v1/images/generations", headers=auth, timeout=300,
                             json={"prompt": "a red circle on a blue background", "n": 2, "size": "64x64", "seed": 1, "steps": 2})
    assert response.status_code == 200 and len(response.json()["data"]) == 2, response.text
    response = requests.post(base + "/v1/images/edits", headers=auth, timeout=300, data={"prompt": "a blue square", "steps": "4", "strength": "0.5"},
                             files={"image": ("s.png", encoded(SOURCE, "PNG"))})
    assert response.status_code == 200, response.text
    response = requests.post(base + "/v1/images/generations", headers=auth, timeout=300,
                             json={"prompt": "x", "model": CONTINUOUS, "size": "64x64", "steps": 2})
    assert response.status_code == 200, response.text


def test_a_hostile_corpus_gets_specific_4xx_errors_and_memory_stays_bounded(hostile_setup):
    server, base, key, gateway, work = hostile_setup
    good_requests(base, key)  # warm: lazily made clients, buffers, the stubs' shared memory
    before = memory(server, gateway)
    cases = corpus(key)
    assert len(cases) >= 100
    problems = []
    for label, kind, arguments, expected in cases:
        status, body = status_and_body(send(base, key, kind, arguments))
        error = body.get("error") if isinstance(body, dict) else None
        if status != expected:
            problems.append(f"{label}: HTTP {status} (expected {expected}): {str(body)[:200]}")
        elif not (isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"]
                  and error.get("type") in ("invalid_request_error", "rate_limit_error") and "param" in error and "code" in error):
            problems.append(f"{label}: not an OpenAI error body: {str(body)[:200]}")
    assert not problems, f"{len(problems)} of {len(cases)}:\n" + "\n".join(problems)
    good_requests(base, key)  # the gateway and the models still serve
    after = memory(server, gateway)
    growth = {name: after[name] - before.get(name, 0) for name in after}
    (work / "memory.json").write_text(json.dumps({"before": before, "after": after, "cases": len(cases)}, indent=1))
    print("memory growth (MiB):", {name: round(value / MIB, 1) for name, value in growth.items()})
    assert growth["gateway"] < GATEWAY_RSS_BOUND, growth
    assert growth["gateway peak"] < GATEWAY_PEAK_BOUND, growth  # the bomb was never decoded
    assert growth["tritonserver"] < TRITON_RSS_BOUND, growth
    assert all(value < STUB_RSS_BOUND for name, value in growth.items() if name.startswith("stub")), growth
    assert growth["shm"] == 0, growth  # no region grew: nothing oversized reached a stub


def test_unknown_model_names_are_looked_up_not_kept(hostile_setup):
    server = hostile_setup[0]

    async def run():
        gateway = Gateway(GatewaySettings(triton_url=f"grpc://{server.grpc_url}", default_model=DYNAMIC))
        try:
            for index in range(50):
                with pytest.raises(Exception, match="is not served"):
                    await gateway.client(f"made_up_{index}")
            assert list(gateway._clients) == []
            await gateway.client(CONTINUOUS)
            assert list(gateway._clients) == [CONTINUOUS]
        finally:
            await gateway.close()

    asyncio.run(run())


def test_settings_refuse_exposure_without_a_key_and_errors_map_the_same_for_both_paths():
    from triton_diffusion.security import SecurityError

    with pytest.raises(SecurityError, match="beyond loopback"):
        GatewaySettings(host="0.0.0.0").check()
    GatewaySettings(host="0.0.0.0", api_keys=("k" * 16,)).check()
    with pytest.raises(SecurityError, match="not among"):
        GatewaySettings(models=("a",), default_model="b").check()
    # a continuous model's queue-full arrives as StatusCode.UNAVAILABLE (client.api.stream_error), a
    # dynamic model's likewise: both are 503; bad input is 400 on both
    for status, http in [("StatusCode.UNAVAILABLE", 503), ("UNAVAILABLE", 503), ("StatusCode.INVALID_ARGUMENT", 400),
                         ("INVALID_ARGUMENT", 400), ("StatusCode.NOT_FOUND", 404), ("StatusCode.DEADLINE_EXCEEDED", 504),
                         ("StatusCode.INTERNAL", 500), (None, 500)]:
        assert from_server_error(ServerError("m", status)).status == http
    assert from_server_error(ServerError("", None)).message  # never an empty message
    assert parse_body({"prompt": "x", "n": "2"}, strict=False).n == 2
    # images in flight are capped across callers: past the cap, 429 before anything is sent
    from triton_diffusion.gateway import ApiError

    capped = Gateway(GatewaySettings(max_images_in_flight=2))
    with pytest.raises(ApiError) as refused:
        asyncio.run(capped.generate(parse_body({"prompt": "x", "n": 3}), client=None))
    assert refused.value.status == 429 and refused.value.code == "rate_limit_exceeded" and capped.in_flight == 0
    assert isinstance(parse_body({"prompt": "x", "quality": "standard"}), ImagesBody)
