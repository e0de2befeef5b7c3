"""The OpenAI-compatible gateway, driven by the official ``openai`` package against the real server."""

from __future__ import annotations

import base64
import io
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from PIL import Image

from client import DiffusionClient
from testing import harness

from .conftest import STEPS, TINY, assert_same_image, batch_histogram, metric, wait_until_denoising


class RunningGateway:
    """uvicorn serving the gateway in a thread, on a free port, in front of ``server``."""

    def __init__(self, server):
        import uvicorn

        from triton_diffusion.gateway import create_app

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        config = uvicorn.Config(create_app(f"grpc://{server.grpc_url}", TINY), host="127.0.0.1", port=self.port, log_level="warning")
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        harness.wait_until(lambda: self.uvicorn.started, "the gateway to listen", timeout=60)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, **options)

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def gateway(server):
    running = RunningGateway(server)
    yield running
    running.stop()


def decoded(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB"))


def test_generations_with_n_return_each_image_as_direct_grpc_would(gateway, server):
    response = gateway.client().images.generate(
        model=TINY, prompt="a red circle on a blue background", n=2, size="96x64", response_format="b64_json",
        extra_body={"seed": 7, "steps": 4})
    assert len(response.data) == 2
    images = [decoded(item) for item in response.data]
    assert all(image.shape == (64, 96, 3) for image in images)  # OpenAI sizes are width x height
    with DiffusionClient(f"grpc://{server.grpc_url}", TINY) as direct:
        for offset, image in enumerate(images):
            alone = direct.generate("a red circle on a blue background", seed=7 + offset, steps=4, height=64, width=96)
            assert_same_image(image, alone.array)  # PNG is lossless: the same pixels
    assert (images[0] != images[1]).mean() > 0.5  # seed + i: two different images


def test_url_format_and_the_models_list(gateway):
    client = gateway.client()
    item = client.images.generate(prompt="a green square", size="64x64", response_format="url", extra_body={"steps": 2}).data[0]
    assert item.url.startswith("data:image/png;base64,")
    assert TINY in [model.id for model in client.models.list()]


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ({"size": "64 by 64"}, openai.BadRequestError, "size must look like '1024x1024'"),
        ({"size": "4096x4096"}, openai.BadRequestError, "HEIGHT=4096 is outside the allowed range"),  # the model's own limit, from Triton
        ({"n": 11}, openai.BadRequestError, "n: Input should be less than or equal to 10"),
        ({"model": "no_such_model"}, openai.NotFoundError, "no_such_model"),
        ({"extra_body": {"steps": 1000}}, openai.BadRequestError, "NUM_INFERENCE_STEPS"),
        # the tiny model has no lora_dir: an adapter is refused before anything reaches Triton
        ({"extra_body": {"lora": "ink"}}, openai.BadRequestError, "declares no LORA input"),
        ({"extra_body": {"lora": "x" * 200}}, openai.BadRequestError, "lora: String should have at most 128"),
        ({"extra_body": {"lora_scale": -1}}, openai.BadRequestError, "lora_scale: Input should be greater than or equal to 0"),
    ],
)
def test_bad_requests_get_openai_errors_with_the_reason(gateway, arguments, error, message):
    with pytest.raises(error, match=message) as raised:
        gateway.client().images.generate(prompt="a blue triangle", **arguments)
    assert raised.value.body["message"] and raised.value.body["type"] == "invalid_request_error"


def test_edits_take_a_multipart_image(gateway, server):
    source = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(source).save(buffer, format="PNG")
    response = gateway.client().images.edit(
        image=("source.png", buffer.getvalue(), "image/png"), prompt="a yellow circle", n=1,
        extra_body={"seed": 11, "steps": 4, "strength": 0.5})
    image = decoded(response.data[0])
    assert image.shape == (64, 64, 3)
    with DiffusionClient(f"grpc://{server.grpc_url}", TINY) as direct:
        alone = direct.generate("a yellow circle", seed=11, steps=4, init_image=source, strength=0.5)
    assert_same_image(image, alone.array)
    with pytest.raises(openai.BadRequestError, match="mask is not supported"):
        gateway.client().images.edit(image=("s.png", buffer.getvalue(), "image/png"), mask=("m.png", buffer.getvalue(), "image/png"),
                                     prompt="x")


def test_eight_concurrent_callers_meet_in_one_triton_execution(delayed_server):
    server = delayed_server(8)
    running = RunningGateway(server)
    try:
        client = running.client()
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda i: client.images.generate(prompt=f"shape number {i}", extra_body={"seed": i}), range(8)))
        assert [r.data[0].seed for r in responses] == list(range(8))
        assert batch_histogram(server) == {8: 1}
    finally:
        running.stop()


def test_a_caller_that_goes_away_cancels_its_triton_request(gateway, server):
    """A raw HTTP request, and its socket closed once Triton is denoising it: the gateway must
    cancel the Triton request (counted by the backend as cancelled)."""
    import json

    cancelled_before = metric(server, "diffusion_requests_cancelled_total")
    steps_before = metric(server, STEPS)
    body = json.dumps({"prompt": "a long one", "size": "512x512", "steps": 50}).encode()
    caller = socket.create_connection(("127.0.0.1", gateway.port))
    caller.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                   + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    wait_until_denoising(server, steps_before)
    caller.close()  # the caller hangs up mid-denoise
    harness.wait_for_metric(server, "diffusion_requests_cancelled_total", TINY, cancelled_before + 1)
