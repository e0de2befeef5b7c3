"""A typed client over tritonclient (gRPC or HTTP, chosen by URL scheme).

    from client import DiffusionClient
    with DiffusionClient("grpc://localhost:8001") as c:
        c.generate("a lighthouse at dusk", seed=7).image.save("out.png")
"""

from __future__ import annotations

import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

DEFAULT_MODEL = "stable_diffusion_tiny"


class ServerError(RuntimeError):
    """The server answered with an error; ``status`` and the message are Triton's."""

    def __init__(self, message: str, status: Optional[str] = None):
        super().__init__(message)
        self.status = status

    @property
    def retryable(self) -> bool:
        """Queue full / model temporarily unavailable: the only errors worth retrying."""
        return self.status in RETRYABLE_STATUSES


# gRPC's and HTTP's spelling of "queue full / try later".
RETRYABLE_STATUSES = ("StatusCode.UNAVAILABLE", "503", "UNAVAILABLE")


@dataclass
class RetryPolicy:
    """Retry UNAVAILABLE (e.g. max_queue_size reached) with exponential backoff; nothing else."""

    attempts: int = 4
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 4.0
    jitter: float = 0.5  # each delay is scaled by a random factor in [1 - jitter, 1]: no retry stampedes

    def delays(self):
        delay = self.initial_backoff_s
        for _ in range(self.attempts - 1):
            yield delay * (1 - self.jitter * random.random())
            delay = min(self.max_backoff_s, delay * 2)


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None
    steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    init_image: Optional[object] = None  # PIL image or uint8 HxWx3 array (image-to-image)
    strength: Optional[float] = None
    priority: int = 0
    timeout_us: int = 0

    def tensors(self, defaults: Optional[Mapping[str, float]] = None) -> dict[str, np.ndarray]:
        """Input tensors, with the batch dimension (1) the model's config expects.

        With the model's ``defaults`` (``model_defaults`` of its config), every input is sent with an explicit
        value: requests then carry the same set of inputs, which Triton's dynamic batcher
        requires to put them in one batch (an empty IMAGE means text-to-image).
        """
        defaults = defaults or {}
        image = None
        if self.init_image is not None:
            image = np.asarray(self.init_image.convert("RGB") if hasattr(self.init_image, "convert") else self.init_image)
        height, width = self.height, self.width
        if image is not None:
            height = height if height is not None else image.shape[0]
            width = width if width is not None else image.shape[1]
        tensors = {"PROMPT": np.array([[self.prompt.encode("utf-8")]], dtype=object)}
        negative = self.negative_prompt if self.negative_prompt is not None else ("" if defaults else None)
        if negative is not None:
            tensors["NEGATIVE_PROMPT"] = np.array([[negative.encode("utf-8")]], dtype=object)
        seed = self.seed if self.seed is not None else (secrets.randbelow(2**31) if defaults else None)
        for name, value, dtype in (
            ("SEED", seed, np.int64),
            ("NUM_INFERENCE_STEPS", _or(self.steps, defaults.get("default_steps")), np.int32),
            ("GUIDANCE_SCALE", _or(self.guidance_scale, defaults.get("default_guidance_scale")), np.float32),
            ("HEIGHT", _or(height, defaults.get("default_height")), np.int32),
            ("WIDTH", _or(width, defaults.get("default_width")), np.int32),
            ("STRENGTH", _or(self.strength, defaults.get("default_strength")), np.float32),
        ):
            if value is not None:
                tensors[name] = np.array([[value]], dtype=dtype)
        if image is not None:
            tensors["IMAGE"] = image[None].astype(np.uint8, copy=False)
        elif defaults:
            tensors["IMAGE"] = np.zeros((1, 0, 0, 3), dtype=np.uint8)
        return tensors


def _or(value, default):
    return value if value is not None else default


def model_defaults(config: Mapping) -> dict[str, float]:
    """The ``default_*`` request values from a model config (``get_model_config`` as JSON)."""
    config = config.get("config", config)
    defaults = {}
    for key, value in config.get("parameters", {}).items():
        if key.startswith("default_"):
            try:
                defaults[key] = float(value.get("string_value", ""))
            except ValueError:
                continue
    return defaults


@dataclass
class GenerationResult:
    array: np.ndarray  # uint8 HxWx3
    seed: int
    seconds: float
    request: GenerationRequest = field(repr=False, default=None)

    @property
    def image(self):
        from PIL import Image

        return Image.fromarray(self.array)


def _split_url(url: str) -> tuple[str, str]:
    """``grpc://host:port`` / ``http://host:port`` / bare ``host:port`` (port 8001 means gRPC)."""
    if "://" in url:
        scheme, _, address = url.partition("://")
        if scheme not in ("grpc", "http"):
            raise ValueError(f"unsupported scheme {scheme!r}: use grpc:// or http://")
        return scheme, address
    return ("grpc" if url.endswith(":8001") else "http"), url


def protocol_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def build_inputs(module, tensors: dict[str, np.ndarray]) -> list:
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in tensors.items():
        tensor = module.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def build_outputs(module) -> list:
    return [module.InferRequestedOutput("IMAGE"), module.InferRequestedOutput("SEED")]


def to_server_error(exc: Exception) -> ServerError:
    status = exc.status() if hasattr(exc, "status") else None
    message = exc.message() if hasattr(exc, "message") else str(exc)
    return ServerError(message or str(exc), status)


def as_request(prompt_or_request, options: dict) -> GenerationRequest:
    if isinstance(prompt_or_request, GenerationRequest):
        return prompt_or_request
    return GenerationRequest(prompt_or_request, **options)


def infer_options(request: GenerationRequest, protocol: str, timeout_s: Optional[float]) -> dict:
    """Per-request scheduling options (priority, server-side queue timeout) and the client timeout."""
    kwargs = {}
    if request.priority:
        kwargs["priority"] = request.priority
    if request.timeout_us:
        kwargs["timeout"] = request.timeout_us
    if timeout_s is not None and protocol == "grpc":
        kwargs["client_timeout"] = timeout_s
    return kwargs


def parse_result(result, request: GenerationRequest, seconds: float) -> GenerationResult:
    return GenerationResult(
        array=result.as_numpy("IMAGE")[0], seed=int(result.as_numpy("SEED")[0][0]), seconds=seconds, request=request
    )


def as_json(protocol: str) -> dict:
    """Keyword arguments that make a tritonclient call return JSON-like dicts for either protocol."""
    return {"as_json": True} if protocol == "grpc" else {}


class ClientOptions:
    """What the sync and asyncio clients share: address, model, deadline, retries, cached defaults."""

    def __init__(
        self,
        url: str = "grpc://localhost:8001",
        model: str = DEFAULT_MODEL,
        timeout_s: Optional[float] = None,
        retry: Optional[RetryPolicy] = None,
    ):
        self.protocol, self.address = _split_url(url)
        self.model = model
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._defaults: Optional[dict[str, float]] = None
        self._connect()

    def _connect(self) -> None:
        raise NotImplementedError


class DiffusionClient(ClientOptions):
    """Synchronous client: ``generate`` one image, or ``generate_many`` with a thread pool."""

    def _connect(self) -> None:
        timeout_s = self.timeout_s
        self._module = protocol_module(self.protocol)
        if self.protocol == "http" and timeout_s is not None:
            self._client = self._module.InferenceServerClient(
                self.address, connection_timeout=timeout_s, network_timeout=timeout_s
            )
        else:
            self._client = self._module.InferenceServerClient(self.address)

    @property
    def defaults(self) -> dict[str, float]:
        """The model's request defaults, read once from its config."""
        if self._defaults is None:
            from tritonclient.utils import InferenceServerException

            try:
                config = self._client.get_model_config(self.model, **as_json(self.protocol))
            except InferenceServerException as exc:
                raise to_server_error(exc) from None
            self._defaults = model_defaults(config)
        return self._defaults

    def generate(self, prompt_or_request, **options) -> GenerationResult:
        """One image. Raises ``ServerError`` with Triton's status and message."""
        request = as_request(prompt_or_request, options)
        delays = self.retry.delays()
        while True:
            try:
                return self._generate_once(request)
            except ServerError as exc:
                delay = next(delays, None) if exc.retryable else None
                if delay is None:
                    raise
                time.sleep(delay)

    def _generate_once(self, request: GenerationRequest) -> GenerationResult:
        from tritonclient.utils import InferenceServerException

        kwargs = infer_options(request, self.protocol, self.timeout_s)
        started = time.perf_counter()
        try:
            result = self._client.infer(
                self.model, build_inputs(self._module, request.tensors(self.defaults)), outputs=build_outputs(self._module), **kwargs
            )
        except InferenceServerException as exc:
            raise to_server_error(exc) from None
        return parse_result(result, request, time.perf_counter() - started)

    def generate_many(self, requests: Sequence[GenerationRequest], concurrency: int = 8) -> list:
        """Results in request order; a failed request's slot holds its ``ServerError``."""
        import threading
        from concurrent.futures import ThreadPoolExecutor

        defaults = self.defaults
        local = threading.local()
        clients = []

        def one(request):
            if not hasattr(local, "client"):  # one connection per worker thread
                local.client = DiffusionClient(f"{self.protocol}://{self.address}", self.model, self.timeout_s, self.retry)
                local.client._defaults = defaults
                clients.append(local.client)
            try:
                return local.client.generate(request)
            except ServerError as exc:
                return exc

        try:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                return list(pool.map(one, requests))
        finally:
            for client in clients:
                client.close()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "DiffusionClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
