"""OpenAI-compatible images API in front of Triton: ``/v1/images/generations``, ``/v1/images/edits``
and ``/v1/models``, translated to Triton gRPC requests.

Every image of every HTTP request becomes its own Triton request (one row), sent concurrently, so
the images of many users meet in Triton's dynamic batcher exactly as direct gRPC requests do. A
caller that disconnects cancels its Triton requests (cancelling the gRPC call), which frees their
rows in a running batch. Triton's errors come back as OpenAI's error JSON with the matching HTTP
status, for dynamic and continuous models alike.

    triton-diffusion gateway --triton grpc://localhost:8001 --port 9000
    curl localhost:9000/v1/images/generations -H 'content-type: application/json' \\
         -d '{"prompt": "a red circle on a blue background", "size": "128x128"}'

Closed and bounded (``GatewaySettings``): it binds loopback unless told otherwise and then needs an
API key (``Authorization: Bearer <key>``, what the ``openai`` package sends); request bodies,
images in flight and uploaded images (checked from their header, before decoding) are bounded;
every field is type- and range-checked before anything reaches Triton; only models Triton serves
are looked up. ``/health`` answers without a key (for probes) and says nothing else.

Extensions to OpenAI's request body: ``seed`` (image i gets seed + i), ``steps``,
``guidance_scale``, ``negative_prompt``, ``step_cache`` (models with a per-row step cache: use it
for this request; images change), ``lora`` and ``lora_scale`` (models with a ``lora_dir``: the
adapter this request uses), and ``strength`` for edits. ``response_format: url``
returns a ``data:image/png;base64,...`` URL (the gateway stores nothing). ``quality`` takes only
``auto``/``standard`` (the model's defaults; ``steps`` is the quality knob) and ``style`` is refused.
"""

# No "from __future__ import annotations": FastAPI reads the handlers' annotations at runtime.
import asyncio
import base64
import io
import logging
import re
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from client import AsyncDiffusionClient, GenerationRequest, ServerError

from . import security

log = logging.getLogger("triton_diffusion.gateway")

# Triton status -> (HTTP status, OpenAI error type); gRPC's "StatusCode.X" and plain "X" both map.
_STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "NOT_FOUND": (404, "invalid_request_error"),
    "UNAVAILABLE": (503, "server_error"),
    "RESOURCE_EXHAUSTED": (503, "server_error"),
    "DEADLINE_EXCEEDED": (504, "server_error"),
    "CANCELLED": (499, "invalid_request_error"),
    "UNIMPLEMENTED": (400, "invalid_request_error"),
}
MAX_IMAGES_PER_REQUEST = 10  # OpenAI's limit for n
MAX_TEXT = 32000  # characters of a prompt (gpt-image-1's limit; the model's byte limit applies after)
MAX_SIDE = 16384
MAX_SEED = 2**63 - 1 - MAX_IMAGES_PER_REQUEST  # image i gets seed + i: an INT64 without wrap-around
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MIB = 1024 * 1024
# What a source image may be: Pillow opens many formats; these are what OpenAI documents.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class GatewaySettings:
    triton_url: str = "grpc://localhost:8001"
    default_model: str = "tiny_shapes"
    timeout_s: Optional[float] = None  # per image; cancels the Triton request
    api_keys: tuple = ()  # empty: no key is checked (only allowed on loopback)
    models: tuple = ()  # the models served through the gateway; empty: any model Triton serves
    max_body_bytes: int = 25 * MIB  # OpenAI's limit for an uploaded image (gpt-image-1: 25 MB... per file)
    max_images_in_flight: int = 64  # across all callers; past it: 429
    docs: bool = False  # /docs, /redoc and /openapi.json
    host: str = security.LOOPBACK

    def check(self) -> "GatewaySettings":
        security.check_exposure(self.host, "x" if self.api_keys else None, "the gateway",
                                "an API key (--api-key-file or TRITON_DIFFUSION_GATEWAY_API_KEYS)")
        if self.models and self.default_model not in self.models:
            raise security.SecurityError(f"the default model {self.default_model!r} is not among --models {list(self.models)}")
        return self


class ApiError(Exception):
    """An error to send as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def from_server_error(exc: ServerError) -> ApiError:
    status = (exc.status or "").removeprefix("StatusCode.")
    http, kind = _STATUS.get(status, (500, "server_error"))
    if "unknown model" in str(exc).lower() or "has no available versions" in str(exc):
        http, kind = 404, "invalid_request_error"
    return ApiError(http, str(exc) or f"Triton answered {status or 'an error'} with no message", kind)


# -- request bodies (pure) ------------------------------------------------------------------------
class ImagesBody(BaseModel):
    """``/v1/images/generations`` (JSON, strict types) and the fields of ``/v1/images/edits``
    (multipart strings, converted). Unknown fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_TEXT)
    model: Optional[str] = Field(None, max_length=128)
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    size: Optional[str] = Field(None, max_length=32)
    response_format: Optional[Literal["b64_json", "url"]] = None
    quality: Optional[str] = Field(None, max_length=32)
    style: Optional[str] = Field(None, max_length=32)
    user: Optional[str] = Field(None, max_length=256)  # OpenAI's end-user id: accepted, not used
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    steps: Optional[int] = Field(None, ge=1, le=10000)
    guidance_scale: Optional[float] = Field(None, ge=0, le=1000, allow_inf_nan=False)
    negative_prompt: Optional[str] = Field(None, max_length=MAX_TEXT)
    strength: Optional[float] = Field(None, ge=0, le=1, allow_inf_nan=False)
    step_cache: bool = False  # the model's per-row step cache for this request (images change)
    lora: Optional[str] = Field(None, max_length=128)  # models with a lora_dir: the adapter's name
    lora_scale: Optional[float] = Field(None, ge=0, le=100, allow_inf_nan=False)  # its weight (the model bounds it)


def parse_body(data: object, strict: bool = True) -> ImagesBody:
    """Validate a request body; the first problem becomes a 400 naming its field."""
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        body = ImagesBody.model_validate(data, strict=strict)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown field {field!r}: this server takes prompt, model, n, size, response_format, "
                                "quality, user, seed, steps, guidance_scale, negative_prompt, step_cache, lora, lora_scale and "
                                "(edits) strength",
                           param=field) from None
        if first["type"] == "missing":
            raise ApiError(400, f"{field} is required", param=field) from None
        got = first.get("input")
        shown = repr(got) if isinstance(got, (int, float, str, bool, type(None))) and len(repr(got)) <= 64 else type(got).__name__
        raise ApiError(400, f"{field}: {first['msg']} (got {shown})", param=field) from None
    if body.quality not in (None, "auto", "standard"):
        raise ApiError(400, f"quality {body.quality!r} is not supported: 'auto' and 'standard' give the model's defaults; "
                            "ask for more denoising steps with 'steps'", param="quality")
    if body.style is not None:
        raise ApiError(400, "style is not supported: describe the style in the prompt", param="style")
    if body.model is not None and not MODEL_NAME.fullmatch(body.model):
        raise ApiError(404, f"model {body.model[:64]!r} does not exist", param="model", code="model_not_found")
    return body


def parse_size(size: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """OpenAI's ``"WIDTHxHEIGHT"`` -> (height, width); ``None``/``"auto"``: the model's default."""
    if size in (None, "", "auto"):
        return None, None
    match = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", size.lower())  # ASCII digits only
    if not match or not all(1 <= int(side) <= MAX_SIDE for side in match.groups()):
        raise ApiError(400, f"size must look like '1024x1024' (width x height, each 1..{MAX_SIDE}) or 'auto', got {size!r}",
                       param="size")
    width, height = (int(side) for side in match.groups())
    return height, width


def encode_png(array: np.ndarray) -> bytes:
    """PNG at zlib level 1: lossless like any PNG, several times faster to write than the default."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _encoded(result) -> str:
    return base64.b64encode(encode_png(result.array)).decode()


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """An uploaded image as uint8 RGB, refused from its header (before any pixel is decoded) when
    it is not PNG, JPEG or WebP or holds more than ``max_pixels``."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except Image.DecompressionBombError:  # Pillow's own limit, far above any model's
        raise ApiError(400, f"image declares more pixels than this model accepts ({max_pixels:,} at most)",
                       param="image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ApiError(400, "image must be a PNG, JPEG or WebP file (this one is not readable as any of them)",
                       param="image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ApiError(400, f"image is {width}x{height} = {width * height:,} pixels; this model accepts at most "
                            f"{max_pixels:,}", param="image")
    try:
        return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError) as exc:
        raise ApiError(400, f"image could not be decoded: {exc}", param="image") from None


# -- the gateway ----------------------------------------------------------------------------------
class Gateway:
    """One asyncio Triton client per served model; turns OpenAI requests into Triton requests."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self._clients: dict[str, AsyncDiffusionClient] = {}  # only models Triton reported ready
        self._probe_client: Optional[AsyncDiffusionClient] = None  # made inside the server's event loop
        self.in_flight = 0

    @property
    def _probe(self) -> AsyncDiffusionClient:
        if self._probe_client is None:
            self._probe_client = AsyncDiffusionClient(self.settings.triton_url, self.settings.default_model, timeout_s=30)
        return self._probe_client

    async def client(self, model: Optional[str]) -> AsyncDiffusionClient:
        """The client of a model Triton serves now; 404 for any other name (nothing is kept for it)."""
        model = model or self.settings.default_model
        if self.settings.models and model not in self.settings.models:
            raise ApiError(404, f"model {model!r} is not served here; available: {', '.join(self.settings.models)}",
                           param="model", code="model_not_found")
        if model not in self._clients:
            if not await self._ready(model):
                raise ApiError(404, f"model {model!r} is not served (not in Triton's repository, not loaded, or not "
                                    "ready)", param="model", code="model_not_found")
            self._clients[model] = AsyncDiffusionClient(self.settings.triton_url, model, timeout_s=self.settings.timeout_s)
        return self._clients[model]

    async def _ready(self, model: str) -> bool:
        try:  # Triton's health API: open even where the admin APIs need a key
            return bool(await self._probe._client.is_model_ready(model))
        except Exception as exc:  # noqa: BLE001 - Triton unreachable
            raise ApiError(503, f"Triton at {self.settings.triton_url} is not reachable: {exc}", "server_error") from None

    async def models(self) -> list[str]:
        """The models Triton reports ready (of ``--models`` when set)."""
        if self.settings.models:
            return [model for model in self.settings.models if await self._ready(model)]
        try:
            index = await self._probe._client.get_model_repository_index(as_json=True)
        except Exception:  # noqa: BLE001 - the index is an admin API: restricted where Triton has an admin key
            names = [self.settings.default_model, *self._clients]
            return [model for model in dict.fromkeys(names) if await self._ready(model)]
        return [entry["name"] for entry in index.get("models", []) if entry.get("state") == "READY"]

    async def max_input_pixels(self, client: AsyncDiffusionClient) -> int:
        """The model's own limit on source images (its ``max_input_image_pixels``)."""
        from .settings import RequestLimits

        schema = await client.schema()
        if "IMAGE" not in schema.inputs:
            raise ApiError(400, f"model {client.model!r} serves text-to-image only: it takes no source image",
                           param="image")
        return int(schema.parameters.get("max_input_image_pixels", RequestLimits.max_input_image_pixels))

    async def generate(self, body: ImagesBody, client: AsyncDiffusionClient, image: Optional[np.ndarray] = None) -> dict:
        """One OpenAI images response for ``body`` (generations, or edits when ``image`` is given)."""
        if body.strength is not None and image is None:
            raise ApiError(400, "strength is for edits (/v1/images/edits) only", param="strength")
        height, width = parse_size(body.size)
        if self.in_flight + body.n > self.settings.max_images_in_flight:
            raise ApiError(429, f"the gateway is holding its limit of {self.settings.max_images_in_flight} images in "
                                "flight; retry later", "rate_limit_error", code="rate_limit_exceeded")
        self.in_flight += body.n  # taken before the first await: the check and the count are one step
        try:
            return await self._generate(body, client, image, height, width)
        finally:
            self.in_flight -= body.n

    async def _generate(self, body: ImagesBody, client: AsyncDiffusionClient, image, height, width) -> dict:
        try:
            requests = [
                GenerationRequest(body.prompt, negative_prompt=body.negative_prompt,
                                  seed=None if body.seed is None else body.seed + index, steps=body.steps,
                                  guidance_scale=body.guidance_scale, height=height, width=width, init_image=image,
                                  strength=body.strength, step_cache=body.step_cache, lora=body.lora,
                                  lora_scale=body.lora_scale)
                for index in range(body.n)
            ]
            schema = await client.schema()
            for request in requests:
                request.tensors(schema)  # type and range checks against the model's declared inputs
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        except ServerError as exc:
            raise from_server_error(exc) from None
        # Each image its own Triton request, all in flight at once: they meet in the batcher.
        # Cancelling this coroutine (the caller went away) cancels every gRPC call.
        results = await asyncio.gather(*(client.generate(request) for request in requests), return_exceptions=True)
        for result in results:
            if isinstance(result, ServerError):
                raise from_server_error(result)
            if isinstance(result, ValueError):
                raise ApiError(400, str(result))
            if isinstance(result, BaseException):
                raise result
        # Off the event loop (zlib releases the GIL): other callers' requests keep flowing meanwhile.
        encoded_images = await asyncio.gather(*(asyncio.to_thread(_encoded, result) for result in results))
        data = []
        for result, encoded in zip(results, encoded_images):
            item = {"url": f"data:image/png;base64,{encoded}"} if body.response_format == "url" else {"b64_json": encoded}
            item["revised_prompt"] = None
            item["seed"] = result.seed
            data.append(item)
        return {"created": int(time.time()), "data": data}

    async def close(self) -> None:
        for client in [*self._clients.values(), *([self._probe_client] if self._probe_client else [])]:
            await client.close()


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 (declared or streamed)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        too_large = ApiError(413, f"the request body exceeds {self.limit:,} bytes", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await JSONResponse(too_large.body(), status_code=413)(scope, receive, send)
        seen, started = 0, False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await JSONResponse(too_large.body(), status_code=413)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def create_app(triton_url: str = "grpc://localhost:8001", default_model: str = "tiny_shapes",
               timeout_s: Optional[float] = None, settings: Optional[GatewaySettings] = None):
    """The FastAPI application (``uvicorn.run(create_app(...))``)."""
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = (settings or GatewaySettings(triton_url, default_model, timeout_s)).check()
    gateway = Gateway(settings)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await gateway.close()

    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="triton-diffusion OpenAI-compatible images API", lifespan=lifespan, **docs)
    app.state.gateway = gateway
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    bearer = HTTPBearer(auto_error=False)

    async def authorized(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if not settings.api_keys:
            return
        if credentials is None:
            raise ApiError(401, "no API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        if not security.key_matches(credentials.credentials, settings.api_keys):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return JSONResponse(ApiError(400, str(exc.errors()[:1])).body(), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):
        log.exception("unexpected gateway error")
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}", "server_error").body(), status_code=500)

    async def until_disconnected(request: Request, work):
        """Run ``work``; if the caller disconnects first, cancel it (and with it the Triton requests)."""
        task = asyncio.ensure_future(work)
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.1)
                if not done and await request.is_disconnected():
                    task.cancel()
                    raise ApiError(499, "the client closed the request", "invalid_request_error")
        except asyncio.CancelledError:
            task.cancel()
            raise
        return task.result()

    @app.get("/health", include_in_schema=False)
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def list_models():
        names = await gateway.models()
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "triton-diffusion"}
                                           for name in names]}

    @app.post("/v1/images/generations", dependencies=[Depends(authorized)])
    async def generations(request: Request):
        try:
            data = await request.json()
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            raise ApiError(400, "the body must be JSON (UTF-8, nested at most a few hundred levels)") from None
        body = parse_body(data, strict=True)
        client = await gateway.client(body.model)
        return await until_disconnected(request, gateway.generate(body, client))

    @app.post("/v1/images/edits", dependencies=[Depends(authorized)])
    async def edits(request: Request):
        from starlette.datastructures import UploadFile

        try:
            form = await request.form(max_files=2, max_fields=32, max_part_size=MAX_TEXT * 4)
        except Exception as exc:  # noqa: BLE001 - python-multipart's and Starlette's parse errors
            raise ApiError(400, f"the body must be multipart/form-data: {getattr(exc, 'detail', exc)}") from None
        if form.get("mask") is not None:
            raise ApiError(400, "mask is not supported: the whole image is edited (image-to-image)", param="mask")
        uploads = [value for key, value in form.multi_items() if key in ("image", "image[]")]
        if len(uploads) != 1 or not isinstance(uploads[0], UploadFile):
            raise ApiError(400, "image is required: exactly one multipart file", param="image")
        fields = {}
        for key, value in form.multi_items():
            if key in ("image", "image[]"):
                continue
            if not isinstance(value, str) or key in fields:
                raise ApiError(400, f"field {key!r} must be given once, as text", param=key)
            fields[key] = value
        body = parse_body(fields, strict=False)  # multipart values are strings: "2" -> 2, "1.9" refused
        client = await gateway.client(body.model)
        image = decode_image(await uploads[0].read(), await gateway.max_input_pixels(client))
        return await until_disconnected(request, gateway.generate(body, client, image))

    return app
