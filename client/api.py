"""A typed client over tritonclient (gRPC or HTTP, chosen by URL scheme).

    from client import DiffusionClient
    with DiffusionClient("grpc://localhost:8001") as c:
        c.generate("a lighthouse at dusk", seed=7).image.save("out.png")
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

DEFAULT_MODEL = "stable_diffusion_tiny"


class ServerError(RuntimeError):
    """The server answered with an error, or no answer came in time; ``status`` and the message
    are Triton's (``DEADLINE_EXCEEDED`` when the client's ``timeout_s`` ran out)."""

    def __init__(self, message: str, status: Optional[str] = None):
        super().__init__(message)
        self.status = status

    @property
    def retryable(self) -> bool:
        """Queue full / model temporarily unavailable: the only errors worth retrying."""
        return self.status in RETRYABLE_STATUSES

    @property
    def timed_out(self) -> bool:
        return self.status in TIMEOUT_STATUSES


# gRPC's and HTTP's spelling of "queue full / try later" (and, behind a load balancer, of "the
# replica went away": 502), and of "the deadline passed". Retrying is safe: a request with a seed
# makes the same image again.
RETRYABLE_STATUSES = ("StatusCode.UNAVAILABLE", "503", "502", "UNAVAILABLE")
TIMEOUT_STATUSES = ("StatusCode.DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED")


def timeout_error(timeout_s: float) -> ServerError:
    return ServerError(f"no response within the client's timeout of {timeout_s:g}s", "DEADLINE_EXCEEDED")


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


_NUMPY_TYPES = {"TYPE_STRING": object, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64, "TYPE_FP32": np.float32,
                "TYPE_FP64": np.float64, "TYPE_UINT8": np.uint8}


@dataclass(frozen=True)
class ServedSchema:
    """What a served model's config declares: its inputs (name -> numpy dtype) and request defaults.

    Read once from the server (``get_model_config``), so the client never hard-codes names, types
    or defaults: ``config.pbtxt`` is the one place they are written.
    """

    inputs: Mapping[str, object]
    defaults: Mapping[str, float]
    output: str = "IMAGE"  # IMAGE ([H, W, 3] per prompt) or VIDEO ([F, H, W, 3])
    # A decoupled model (batching: continuous) answers over a gRPC stream, not a unary call.
    decoupled: bool = False
    parameters: Mapping[str, str] = field(default_factory=dict)  # every config parameter, as written
    progress: bool = False  # declares PROGRESS: sends progress messages to requests that ask

    @classmethod
    def from_config(cls, config: Mapping) -> "ServedSchema":
        config = config.get("config", config)  # gRPC's as_json wraps it
        inputs = {entry["name"]: _NUMPY_TYPES[entry.get("data_type", "TYPE_STRING")] for entry in config.get("input", [])}
        parameters = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        defaults = {}
        for key, value in parameters.items():
            if key.startswith("default_"):
                try:
                    number = float(value)
                except ValueError:
                    continue
                defaults[key] = int(number) if number.is_integer() else number
        output = "VIDEO" if any(entry.get("name") == "VIDEO" for entry in config.get("output", [])) else "IMAGE"
        decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
        progress = decoupled and any(entry.get("name") == "PROGRESS" for entry in config.get("output", []))
        return cls(inputs, defaults, output, decoupled, parameters, progress)


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None  # None: the server draws one and returns it
    steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    height: Optional[int] = None  # None: the model's default size, or the source image's size
    width: Optional[int] = None
    init_image: Optional[object] = None  # PIL image or uint8 HxWx3 array (image-to-image)
    strength: Optional[float] = None
    num_frames: Optional[int] = None  # video models; None: the model's default
    step_cache: bool = False  # models with a per-row step cache: skip blocks where it allows (images change)
    lora: Optional[str] = None  # models with a lora_dir: the adapter's name
    lora_scale: Optional[float] = None  # its weight (None: 1.0)
    priority: int = 0
    timeout_us: int = 0
    # continuous models: called with each progress message, an int32 [rows, 2] array of
    # (steps done, steps in all) per image (not sent to the server)
    on_progress: Optional[Callable[[np.ndarray], None]] = field(default=None, repr=False, compare=False)

    def tensors(self, schema: ServedSchema) -> dict[str, np.ndarray]:
        """One tensor for every input the model declares, with the batch dimension (1).

        Requests then carry the same set of inputs, which Triton's dynamic batcher requires to
        put them in one batch. Unset values are sent as the server's "default" markers where the
        schema has one (SEED -1: the server draws the seed; HEIGHT/WIDTH 0: the model's default
        size, or the source image's; an empty NEGATIVE_PROMPT or IMAGE: none), else as the
        model's ``default_*`` parameter read from its served config.
        """
        if self.num_frames and "NUM_FRAMES" not in schema.inputs:
            raise ValueError("num_frames is for video models; this model declares no NUM_FRAMES input")
        if self.step_cache and "STEP_CACHE" not in schema.inputs:
            raise ValueError("step_cache: this model declares no STEP_CACHE input (its config has no per-row "
                             "step_cache, e.g. \"FirstBlockCache threshold=0.1\")")
        if self.lora and "LORA" not in schema.inputs:
            raise ValueError("lora: this model declares no LORA input (its config has no lora_dir)")
        if self.init_image is not None and "IMAGE" not in schema.inputs:
            raise ValueError("this model serves text-to-image only; it declares no IMAGE input for a source image")
        image = None
        if self.init_image is not None:
            image = np.asarray(self.init_image.convert("RGB") if hasattr(self.init_image, "convert") else self.init_image)
        values = {
            "PROMPT": self.prompt.encode("utf-8"),
            "NEGATIVE_PROMPT": (self.negative_prompt or "").encode("utf-8"),
            "SEED": -1 if self.seed is None else self.seed,
            "NUM_INFERENCE_STEPS": _or(self.steps, schema.defaults.get("default_steps")),
            "GUIDANCE_SCALE": _or(self.guidance_scale, schema.defaults.get("default_guidance_scale")),
            "HEIGHT": self.height or 0,
            "WIDTH": self.width or 0,
            "STRENGTH": _or(self.strength, schema.defaults.get("default_strength")),
            "NUM_FRAMES": self.num_frames or 0,
            "STEP_CACHE": int(bool(self.step_cache)),
            "LORA": (self.lora or "").encode("utf-8"),
            "LORA_SCALE": 1.0 if self.lora_scale is None else self.lora_scale,
        }
        tensors = {}
        for name, dtype in schema.inputs.items():
            if name == "IMAGE":
                if image is not None and (image.ndim != 3 or image.shape[2] != 3):
                    raise ValueError(f"init_image must be an RGB image (height x width x 3), got shape {list(image.shape)}")
                tensors[name] = (image if image is not None else np.zeros((0, 0, 3))).astype(np.uint8, copy=False)[None]
            elif values.get(name) is not None:
                tensors[name] = np.array([[fitted(name, values[name], dtype)]], dtype=dtype)
        return tensors


def fitted(name: str, value, dtype):
    """``value`` checked against the input's declared type: numpy would silently wrap 2**32 + 10
    into an INT32's 10, and 1e300 into an FP32's inf."""
    if dtype in (np.int32, np.int64):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        info = np.iinfo(dtype)
        if not info.min <= value <= info.max:
            raise ValueError(f"{name}={value} is out of range: the model takes a {np.dtype(dtype).name} "
                             f"({info.min}..{info.max})")
    elif dtype in (np.float32, np.float64):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value) or abs(value) > np.finfo(dtype).max:
            raise ValueError(f"{name}={value} is not a finite {np.dtype(dtype).name}")
    elif dtype is object and not isinstance(value, (bytes, str)):
        raise ValueError(f"{name} must be text, got {type(value).__name__}")
    return value


def _or(value, default):
    return value if value is not None else default


@dataclass
class GenerationResult:
    array: np.ndarray  # uint8 HxWx3 (an image) or FxHxWx3 (a video)
    seed: int
    seconds: float
    request: GenerationRequest = field(repr=False, default=None)

    @property
    def is_video(self) -> bool:
        return self.array.ndim == 4

    @property
    def image(self):
        """The image (of a video: its first frame)."""
        from PIL import Image

        return Image.fromarray(self.array[0] if self.is_video else self.array)

    def save_video(self, path, fps: int = 16) -> None:
        """Write the frames as MP4 (H.264 through imageio-ffmpeg's bundled ffmpeg) or, for a ``.gif``
        path, an animated GIF (Pillow)."""
        from pathlib import Path

        frames = self.array if self.is_video else self.array[None]
        if Path(path).suffix.lower() == ".gif":
            from PIL import Image

            images = [Image.fromarray(frame) for frame in frames]
            images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
            return
        import imageio_ffmpeg

        height, width = frames.shape[1:3]
        # yuv420p (what players expect) needs even sides; macro_block_size=1 keeps the size exact otherwise.
        writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, codec="libx264",
                                             pix_fmt_out="yuv420p" if height % 2 == 0 == width % 2 else "yuv444p",
                                             macro_block_size=1, quality=8)
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()


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


def build_outputs(module, output: str = "IMAGE", progress: bool = False) -> list:
    return [module.InferRequestedOutput(name) for name in (output, "SEED", *(["PROGRESS"] if progress else []))]


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


def stream_request(model: str, inputs: list, outputs: list, options: dict, progress: bool = False) -> dict:
    """One request of a gRPC stream (decoupled models): ``infer``'s options, less the client deadline
    (the stream has its own), asking for progress messages where the model sends them."""
    request = {"model_name": model, "inputs": inputs, "outputs": outputs,
               **{key: value for key, value in options.items() if key != "client_timeout"}}
    if progress:
        request["parameters"] = {"progress": True}
    return request


# Once a continuous model has accepted a request it sends progress at least every second
# (progress_interval_ms); a stream silent for this long means the model's process is gone (or
# hung): the client gives up with UNAVAILABLE rather than wait forever.
PROGRESS_TIMEOUT_S = 30.0


def stalled_error(seconds: float) -> ServerError:
    return ServerError(f"the stream went silent: no progress for {seconds:g}s after the model accepted the request "
                       "(its process may have died); the request was abandoned", "StatusCode.UNAVAILABLE")


def is_progress(result, output: str) -> bool:
    """A progress message (PROGRESS only), as opposed to the final answer (IMAGE or VIDEO, SEED)."""
    return result.as_numpy(output) is None


def final_or_none(result, error, progress: bool, output: str, on_progress=None):
    """One message of a request's stream: the final result; None for a progress message (handed
    to ``on_progress``); an error raised as ``ServerError`` with its status."""
    if error is not None:
        raise stream_error(error)
    if not progress or not is_progress(result, output):
        return result
    if on_progress is not None:
        on_progress(result.as_numpy("PROGRESS"))
    return None


# Triton's gRPC stream (ModelStreamInfer) carries an error as a bare message, without its status
# code, unless the client asks for this mode: the stream then ends with the error's gRPC status
# (queue full: UNAVAILABLE, bad input: INVALID_ARGUMENT), as a unary call would (Triton >= 2.49).
STREAM_HEADERS = {"triton_grpc_error": "true"}
# Except for errors raised while Triton *enqueues* the request (its core's fixed messages: queue
# full, model not ready, bad shapes): Triton 2.51 writes those as a bare message in any mode. Their
# codes, from Triton core's source; anything else refused at enqueue is a malformed request.
_ENQUEUE_ERRORS = (
    ("Exceeds maximum queue size", "StatusCode.UNAVAILABLE"),
    ("Request timeout expired", "StatusCode.UNAVAILABLE"),
    ("Server is stopping", "StatusCode.UNAVAILABLE"),
    ("Server not ready", "StatusCode.UNAVAILABLE"),
    ("Server exiting", "StatusCode.UNAVAILABLE"),
    ("is not at ready state", "StatusCode.UNAVAILABLE"),
    ("has no available versions", "StatusCode.UNAVAILABLE"),
    ("unknown model", "StatusCode.NOT_FOUND"),
)


def stream_error(exc: Exception) -> ServerError:
    """A stream's error with its status code, recovered from the message where Triton sent none."""
    error = to_server_error(exc)
    if error.status is None:
        message = str(error).lower()
        error.status = next((status for text, status in _ENQUEUE_ERRORS if text.lower() in message),
                            "StatusCode.INVALID_ARGUMENT")
    return error


def decoupled_over_http(model: str) -> ServerError:
    return ServerError(f"model {model!r} is decoupled (batching: continuous) and answers over gRPC streams only; "
                       "use a grpc:// URL")


def parse_result(result, request: GenerationRequest, seconds: float, output: str = "IMAGE") -> GenerationResult:
    return GenerationResult(
        array=result.as_numpy(output)[0], seed=int(result.as_numpy("SEED")[0][0]), seconds=seconds, request=request
    )


def as_json(protocol: str) -> dict:
    """Keyword arguments that make a tritonclient call return JSON-like dicts for either protocol."""
    return {"as_json": True} if protocol == "grpc" else {}


class ClientOptions:
    """What the sync and asyncio clients share: address, model, deadline, retries, cached schema.

    ``timeout_s`` bounds each attempt of a request (gRPC: a deadline, which also cancels the
    request on the server; HTTP: the client stops waiting, the server still runs it). When it
    runs out the call raises ``ServerError`` with ``timed_out`` set. A continuous model's request
    also fails (UNAVAILABLE) when its stream brings no progress for ``progress_timeout_s``.
    """

    def __init__(
        self,
        url: str = "grpc://localhost:8001",
        model: str = DEFAULT_MODEL,
        timeout_s: Optional[float] = None,
        retry: Optional[RetryPolicy] = None,
        progress_timeout_s: float = PROGRESS_TIMEOUT_S,
    ):
        self.protocol, self.address = _split_url(url)
        self.model = model
        self.timeout_s = timeout_s
        self.progress_timeout_s = progress_timeout_s
        self.retry = retry or RetryPolicy()
        self.retries = 0  # retried attempts so far (queue full, or a replica gone behind a balancer)
        self._schema: Optional[ServedSchema] = None
        self._connect()

    def _connect(self) -> None:
        raise NotImplementedError


_HTTP_TIMEOUTS: tuple = (TimeoutError,)
try:  # tritonclient.http (sync) runs on gevent, whose timeout is not a TimeoutError
    import gevent

    _HTTP_TIMEOUTS += (gevent.Timeout,)
except ImportError:  # pragma: no cover - gevent comes with tritonclient[http]
    pass


class DiffusionClient(ClientOptions):
    """Synchronous client: ``generate`` one image, or ``generate_many`` with a thread pool."""

    def _connect(self) -> None:
        self._module = protocol_module(self.protocol)
        if self.protocol == "http" and self.timeout_s is not None:
            self._client = self._module.InferenceServerClient(
                self.address, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
            )
        else:
            self._client = self._module.InferenceServerClient(self.address)

    @property
    def schema(self) -> ServedSchema:
        """The served model's inputs and request defaults, read once from its config."""
        if self._schema is None:
            from tritonclient.utils import InferenceServerException

            try:
                config = self._client.get_model_config(self.model, **as_json(self.protocol))
            except InferenceServerException as exc:
                raise to_server_error(exc) from None
            except _HTTP_TIMEOUTS:
                self._reconnect()
                raise timeout_error(self.timeout_s) from None
            self._schema = ServedSchema.from_config(config)
        return self._schema

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
                self.retries += 1
                time.sleep(delay)

    def _generate_once(self, request: GenerationRequest) -> GenerationResult:
        from tritonclient.utils import InferenceServerException

        kwargs = infer_options(request, self.protocol, self.timeout_s)
        schema = self.schema
        inputs = build_inputs(self._module, request.tensors(schema))
        outputs = build_outputs(self._module, schema.output, schema.progress)
        started = time.perf_counter()
        try:
            if schema.decoupled:
                result = self._stream_once(stream_request(self.model, inputs, outputs, kwargs, schema.progress),
                                           schema.output, request.on_progress)
            else:
                result = self._client.infer(self.model, inputs, outputs=outputs, **kwargs)
        except InferenceServerException as exc:
            raise to_server_error(exc) from None
        except _HTTP_TIMEOUTS:
            self._reconnect()  # the timed-out connection may still receive the late answer
            raise timeout_error(self.timeout_s) from None
        return parse_result(result, request, time.perf_counter() - started, schema.output)

    def _stream_once(self, request: dict, output: str, on_progress=None):
        """A decoupled model's final response, over a stream opened for this request; progress
        messages go to ``on_progress``, and silence after the first one ends the wait."""
        import queue

        if self.protocol != "grpc":
            raise decoupled_over_http(self.model)
        progress = "parameters" in request
        responses: queue.Queue = queue.Queue()
        self._client.start_stream(lambda result, error: responses.put((result, error)), stream_timeout=self.timeout_s,
                                  headers=STREAM_HEADERS)
        answered = False
        try:
            self._client.async_stream_infer(**request)
            accepted = False
            while True:
                try:  # before the model accepts it, the request is Triton's to answer (queue, restart)
                    result, error = responses.get(timeout=self.progress_timeout_s if accepted else None)
                except queue.Empty:
                    raise stalled_error(self.progress_timeout_s) from None
                answered = error is not None  # an error ends the request as a final answer does
                final = final_or_none(result, error, progress, output, on_progress)
                if final is not None:
                    answered = True
                    return final
                accepted = True
        finally:
            # Cancel only what is abandoned: a cancellation racing the final response Triton already
            # sent can strand the request in Triton 2.51, and its model version never unloads
            # (perf/stream_cancel_race.py). Without cancelling, stop_stream waits for the stream's end.
            self._client.stop_stream(cancel_requests=not answered)

    def _reconnect(self) -> None:
        try:
            self._client.close()
        finally:
            self._connect()

    def generate_many(self, requests: Sequence[GenerationRequest], concurrency: int = 8, on_result=None) -> list:
        """Results in request order; a failed request's slot holds its exception (``ServerError``
        for whatever the server or the deadline said) and the others go on. ``on_result(index,
        result_or_exception)`` is called as each one finishes (from worker threads)."""
        import threading
        from concurrent.futures import ThreadPoolExecutor

        schema = self.schema
        local = threading.local()
        clients = []

        def one(index_and_request):
            index, request = index_and_request
            if not hasattr(local, "client"):  # one connection per worker thread
                local.client = DiffusionClient(f"{self.protocol}://{self.address}", self.model, self.timeout_s, self.retry,
                                               self.progress_timeout_s)
                local.client._schema = schema
                clients.append(local.client)
            try:
                outcome = local.client.generate(request)
            except Exception as exc:  # noqa: BLE001 - reported in the request's slot
                outcome = exc
            if on_result is not None:
                on_result(index, outcome)
            return outcome

        try:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                return list(pool.map(one, enumerate(requests)))
        finally:
            for client in clients:
                self.retries += client.retries
                client.close()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "DiffusionClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
