"""OpenAI-compatible images API in front of Triton: ``/v1/images/generations``, ``/v1/images/edits``
and ``/v1/models``, translated to Triton gRPC requests.

Every image of every HTTP request becomes its own Triton request (one row), sent concurrently, so
the images of many users meet in Triton's dynamic batcher exactly as direct gRPC requests do. A
caller that disconnects cancels its Triton requests (cancelling the gRPC call), which frees their
rows in a running batch. Triton's errors come back as OpenAI's error JSON with the matching HTTP
status.

    triton-diffusion gateway --triton grpc://localhost:8001 --port 9000
    curl localhost:9000/v1/images/generations -H 'content-type: application/json' \\
         -d '{"prompt": "a red circle on a blue background", "size": "128x128"}'

Extensions to OpenAI's request body: ``seed`` (image i gets seed + i), ``steps``,
``guidance_scale``, ``negative_prompt``, and ``strength`` for edits. ``response_format: url``
returns a ``data:image/png;base64,...`` URL (the gateway stores nothing).
"""

# No "from __future__ import annotations": FastAPI reads the handlers' annotations at runtime.
import asyncio
import base64
import io
import time
from typing import Optional

import numpy as np

from client import AsyncDiffusionClient, GenerationRequest, ServerError

# Triton status -> (HTTP status, OpenAI error type)
_STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "NOT_FOUND": (404, "invalid_request_error"),
    "UNAVAILABLE": (503, "server_error"),
    "DEADLINE_EXCEEDED": (504, "server_error"),
    "CANCELLED": (499, "invalid_request_error"),
}
MAX_IMAGES_PER_REQUEST = 10  # OpenAI's limit for n


class ApiError(Exception):
    """An error to send as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def from_server_error(exc: ServerError) -> ApiError:
    status = (exc.status or "").removeprefix("StatusCode.")
    http, kind = _STATUS.get(status, (500, "server_error"))
    if "unknown model" in str(exc).lower() or "has no available versions" in str(exc):
        http, kind = 404, "invalid_request_error"
    return ApiError(http, str(exc), kind)


def parse_size(size: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """OpenAI's ``"WIDTHxHEIGHT"`` -> (height, width); ``None``/``"auto"``: the model's default."""
    if size in (None, "", "auto"):
        return None, None
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ApiError(400, f"size must look like '1024x1024' (width x height) or 'auto', got {size!r}", param="size")
    return int(height), int(width)


def encode_png(array: np.ndarray) -> bytes:
    """PNG at zlib level 1: lossless like any PNG, several times faster to write than the default."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _encoded(result) -> str:
    return base64.b64encode(encode_png(result.array)).decode()


def decode_image(data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ApiError(400, f"image is not a readable image file: {exc}", param="image") from None


class Gateway:
    """Holds one asyncio Triton client per model and turns OpenAI requests into Triton requests."""

    def __init__(self, triton_url: str, default_model: str, timeout_s: Optional[float] = None):
        self.triton_url, self.default_model, self.timeout_s = triton_url, default_model, timeout_s
        self._clients: dict[str, AsyncDiffusionClient] = {}

    def client(self, model: Optional[str]) -> AsyncDiffusionClient:
        model = model or self.default_model
        if model not in self._clients:
            self._clients[model] = AsyncDiffusionClient(self.triton_url, model, timeout_s=self.timeout_s)
        return self._clients[model]

    async def models(self) -> list[str]:
        """Models Triton reports READY."""
        client = self.client(None)
        index = await client._client.get_model_repository_index(as_json=True)
        return [entry["name"] for entry in index.get("models", []) if entry.get("state") == "READY"]

    async def generate(self, body: dict, image: Optional[np.ndarray] = None) -> dict:
        """One OpenAI images response for ``body`` (generations, or edits when ``image`` is given)."""
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt is required and must be a non-empty string", param="prompt")
        count = _int(body.get("n", 1), "n")
        if not 1 <= count <= MAX_IMAGES_PER_REQUEST:
            raise ApiError(400, f"n must be between 1 and {MAX_IMAGES_PER_REQUEST}, got {count}", param="n")
        response_format = body.get("response_format") or "b64_json"
        if response_format not in ("b64_json", "url"):
            raise ApiError(400, f"response_format must be 'b64_json' or 'url', got {response_format!r}", param="response_format")
        height, width = parse_size(body.get("size"))
        seed = body.get("seed")
        requests = [
            GenerationRequest(
                prompt, negative_prompt=body.get("negative_prompt"), seed=None if seed is None else _int(seed, "seed") + index,
                steps=None if body.get("steps") is None else _int(body["steps"], "steps"),
                guidance_scale=None if body.get("guidance_scale") is None else _float(body["guidance_scale"], "guidance_scale"),
                height=height, width=width, init_image=image,
                strength=None if body.get("strength") is None else _float(body["strength"], "strength"),
            )
            for index in range(count)
        ]
        client = self.client(body.get("model"))
        # Each image its own Triton request, all in flight at once: they meet in the batcher.
        # Cancelling this coroutine (the caller went away) cancels every gRPC call.
        results = await asyncio.gather(*(client.generate(request) for request in requests), return_exceptions=True)
        for result in results:
            if isinstance(result, ServerError):
                raise from_server_error(result)
            if isinstance(result, BaseException):
                raise result
        # Off the event loop (zlib releases the GIL): other callers' requests keep flowing meanwhile.
        encoded_images = await asyncio.gather(*(asyncio.to_thread(_encoded, result) for result in results))
        data = []
        for result, encoded in zip(results, encoded_images):
            item = {"b64_json": encoded} if response_format == "b64_json" else {"url": f"data:image/png;base64,{encoded}"}
            item["revised_prompt"] = None
            item["seed"] = result.seed
            data.append(item)
        return {"created": int(time.time()), "data": data}

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()


def _int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} must be an integer, got {value!r}", param=name) from None


def _float(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} must be a number, got {value!r}", param=name) from None


def create_app(triton_url: str = "grpc://localhost:8001", default_model: str = "stable_diffusion_tiny",
               timeout_s: Optional[float] = None):
    """The FastAPI application (``uvicorn.run(create_app(...))``)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    gateway = Gateway(triton_url, default_model, timeout_s)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await gateway.close()

    app = FastAPI(title="triton-diffusion OpenAI-compatible images API", lifespan=lifespan)
    app.state.gateway = gateway

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def until_disconnected(request: Request, work):
        """Run ``work``; if the caller disconnects first, cancel it (and with it the Triton requests)."""
        task = asyncio.ensure_future(work)
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.1)
            if not done and await request.is_disconnected():
                task.cancel()
                raise ApiError(499, "the client closed the request", "invalid_request_error")
        return task.result()

    @app.get("/v1/models")
    async def list_models():
        try:
            names = await gateway.models()
        except Exception as exc:  # Triton unreachable
            raise ApiError(503, f"Triton at {triton_url} is not reachable: {exc}", "server_error") from None
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "triton-diffusion"}
                                           for name in names]}

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the body must be JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return await until_disconnected(request, gateway.generate(body))

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        form = await request.form()
        if form.get("mask") is not None:
            raise ApiError(400, "mask is not supported: the whole image is edited (image-to-image)", param="mask")
        upload = form.get("image") or form.get("image[]")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "image is required (a multipart file)", param="image")
        image = decode_image(await upload.read())
        body = {key: value for key, value in form.items() if key not in ("image", "image[]")}
        return await until_disconnected(request, gateway.generate(body, image))

    return app
