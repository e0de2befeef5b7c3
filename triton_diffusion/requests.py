"""Triton request tensors -> typed generation items, or a specific error for that request alone.

Pure logic: the input is a ``{name: numpy array}`` mapping (what the Python backend gives us),
so every rule here is unit-tested without a server.

A Triton request may carry a batch dimension B > 1 (B prompts in one request); it becomes B
``GenerationItem``s that share the request's output size, so its output is one [B, H, W, 3] tensor.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import numpy as np

from .schema import INPUT_KINDS, INTEGER, NUMBER, TEXT_BYTES
from .settings import ModelSettings

TEXT_TO_IMAGE = "text-to-image"
IMAGE_TO_IMAGE = "image-to-image"
MAX_SEED = 2**63 - 1


class RequestError(ValueError):
    """A request is invalid; the message is sent back to that client as INVALID_ARG."""


@dataclass(frozen=True)
class CallParams:
    """Everything one pipeline call takes as a scalar.

    It is both the batching signature (rows share a call only when their ``CallParams`` are
    equal) and the source of the call's scalar arguments (``PipelineRunner.run`` reads them from
    here alone), so a new scalar cannot be passed to the pipeline without also keeping rows that
    differ in it apart.
    """

    task: str
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    strength: Optional[float] = None  # image-to-image only
    with_negative_prompt: bool = False  # rows carry a NEGATIVE_PROMPT (a per-row list in the call)
    num_frames: int = 0  # video models only (0: an image)
    adapter_group: str = ""  # lora_batching: grouped: the rows' adapter (rows with different ones never share a call)

    @property
    def pixels(self) -> int:
        """Pixels one row makes (all its frames): what the call budget counts."""
        return self.height * self.width * max(1, self.num_frames)


@dataclass(frozen=True)
class GenerationItem:
    """One image to generate: its per-row values, and the scalars it shares with its batch-mates."""

    prompt: str
    seed: int
    params: CallParams
    negative_prompt: Optional[str] = None
    image: Optional[np.ndarray] = None  # image-to-image source, uint8 HxWx3
    step_cache: bool = False  # the model's per-row step cache may skip blocks for this row (STEP_CACHE=1)
    lora: str = ""  # the LoRA adapter this row uses (LORA; empty: none), and its weight (LORA_SCALE)
    lora_scale: float = 1.0

    @property
    def task(self) -> str:
        return self.params.task


def text_to_image(prompt: str, seed: int, steps: int, guidance_scale: float, height: int, width: int,
                  negative_prompt: Optional[str] = None, num_frames: int = 0) -> GenerationItem:
    """A text-to-image (or, with ``num_frames``, text-to-video) item: benchmarks and tests build
    items without a request."""
    params = CallParams(TEXT_TO_IMAGE, height, width, steps, guidance_scale, None, negative_prompt is not None,
                        num_frames)
    return GenerationItem(prompt, seed, params, negative_prompt)


def image_to_image(prompt: str, seed: int, image: np.ndarray, strength: float, steps: int, guidance_scale: float,
                   height: Optional[int] = None, width: Optional[int] = None,
                   negative_prompt: Optional[str] = None) -> GenerationItem:
    """An image-to-image item; the output size defaults to the source image's."""
    height = image.shape[0] if height is None else height
    width = image.shape[1] if width is None else width
    params = CallParams(IMAGE_TO_IMAGE, height, width, steps, guidance_scale, strength, negative_prompt is not None)
    return GenerationItem(prompt, seed, params, negative_prompt, image)


@dataclass(frozen=True)
class ParsedRequest:
    """A valid request: its rows, in order."""

    items: tuple[GenerationItem, ...]


ParseResult = Union[ParsedRequest, RequestError]
_DESCRIPTION = {INTEGER: "an integer", NUMBER: "a number"}


def _rows(name: str, array: np.ndarray, batch: int) -> np.ndarray:
    """Flatten ``[B, 1]`` (or ``[B]``) to ``[B]`` and check the batch dimension."""
    if array.ndim == 0:
        array = array.reshape(1)
    if array.shape[0] != batch:
        raise RequestError(f"{name} has batch dimension {array.shape[0]}, but PROMPT has {batch}")
    flat = array.reshape(batch, -1)
    if flat.shape[1] != 1:
        raise RequestError(f"{name} must hold one value per prompt (shape [batch, 1]), got shape {list(array.shape)}")
    return flat[:, 0]


def _decode_text(name: str, value: object, max_bytes: int, allow_empty: bool) -> str:
    raw = value if isinstance(value, (bytes, bytearray)) else str(value).encode()
    if len(raw) > max_bytes:
        raise RequestError(f"{name} is {len(raw)} bytes; the limit is {max_bytes} bytes")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if "\x00" in text:
        raise RequestError(f"{name} contains a NUL character")
    if not allow_empty and not text.strip():
        raise RequestError(f"{name} is empty")
    return text


def _scalar(name: str, inputs: Mapping[str, np.ndarray], batch: int, default) -> list:
    array = inputs.get(name)
    if array is None:
        return [default] * batch
    kind = INPUT_KINDS[name]
    if array.dtype.kind not in ("iu" if kind == INTEGER else "fiu"):
        raise RequestError(f"{name} must be {_DESCRIPTION[kind]}, got dtype {array.dtype}")
    values = _rows(name, array, batch).tolist()
    if kind == NUMBER:
        for value in values:
            if not math.isfinite(value):
                raise RequestError(f"{name} must be finite, got {value}")
    return values


# An adapter's name: a file or folder name in lora_dir, never a path.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _adapters(inputs: Mapping[str, np.ndarray], batch: int, settings: ModelSettings) -> list[tuple[str, float]]:
    """Each row's (adapter name or "", scale) from LORA and LORA_SCALE."""
    lora = inputs.get("LORA")
    names = [""] * batch
    if lora is not None:
        if lora.dtype.kind not in "OSU":
            raise RequestError(f"LORA must be BYTES (an adapter's name), got dtype {lora.dtype}")
        names = [_decode_text("LORA", value, TEXT_BYTES["LORA"], True) for value in _rows("LORA", lora, batch)]
    for name in names:
        if name and (not ADAPTER_NAME.fullmatch(name) or ".." in name):
            raise RequestError(f"LORA={name!r} is not an adapter name (letters, digits, '.', '_' and '-'; no paths)")
    scales = _scalar("LORA_SCALE", inputs, batch, 1.0)
    for scale in scales:
        _check_range("LORA_SCALE", scale, 0.0, settings.adapters.max_lora_scale)
    return [(name, float(scale) if name else 1.0) for name, scale in zip(names, scales)]


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise RequestError(f"{name}={value} is outside the allowed range [{low}, {high}]")


def _check_size(height: int, width: int, settings: ModelSettings, source: str = "", unsent: tuple = ()) -> None:
    """``source`` describes where the sides named in ``unsent`` came from (the source image):
    an error about a value the client never sent must say so."""
    for name, side in (("HEIGHT", height), ("WIDTH", width)):
        label = f"{name}={side}{source if name in unsent else ''}"
        if not settings.limits.min_side <= side <= settings.limits.max_side:
            raise RequestError(f"{label} is outside the allowed range [{settings.limits.min_side}, {settings.limits.max_side}]")
        if side % settings.limits.size_multiple:
            hint = "; send HEIGHT and WIDTH to resize it" if name in unsent else ""
            raise RequestError(f"{label} must be a multiple of {settings.limits.size_multiple}{hint}")
    size = f"{height}x{width}{source if unsent else ''}"
    if height * width > settings.limits.pixel_limit:
        raise RequestError(f"{size} is {height * width} pixels; the limit is {settings.limits.pixel_limit}")
    if settings.limits.allowed_sizes and (height, width) not in settings.limits.allowed_sizes:
        allowed = ", ".join(f"{h}x{w}" for h, w in settings.limits.allowed_sizes)
        raise RequestError(f"size {size} is not served by this model; allowed sizes: {allowed}")


def _source_images(inputs: Mapping[str, np.ndarray], batch: int, settings: ModelSettings) -> list:
    """Per-row source images, or Nones for text-to-image (IMAGE absent or with zero pixels)."""
    image = inputs.get("IMAGE")
    if image is None:
        return [None] * batch
    if image.dtype != np.uint8:
        raise RequestError(f"IMAGE must be UINT8, got dtype {image.dtype}")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] != 3:
        raise RequestError(f"IMAGE must have shape [batch, height, width, 3] (RGB), got {list(image.shape)}")
    if image.shape[0] != batch:
        raise RequestError(f"IMAGE has batch dimension {image.shape[0]}, but PROMPT has {batch}")
    pixels = image.shape[1] * image.shape[2]
    if pixels == 0:
        # An empty IMAGE means "no source image": clients send it so that text-to-image and
        # image-to-image requests carry the same inputs and Triton may batch them together.
        return [None] * batch
    if not settings.load.enable_image_to_image:
        raise RequestError("this model does not serve image-to-image; send no IMAGE (or an empty one)")
    if image.shape[1] < 8 or image.shape[2] < 8:
        raise RequestError(f"IMAGE is {image.shape[1]}x{image.shape[2]}; it must be at least 8x8")
    if pixels > settings.limits.max_input_image_pixels:
        raise RequestError(f"IMAGE has {pixels} pixels; the limit is {settings.limits.max_input_image_pixels}")
    return [np.ascontiguousarray(row) for row in image]


def _frames(inputs, batch: int, settings: ModelSettings) -> int:
    """Frames per row: NUM_FRAMES (absent or 0: ``default_num_frames``); 0 for image models."""
    frames = {int(value) for value in _scalar("NUM_FRAMES", inputs, batch, 0)}
    if len(frames) > 1:
        raise RequestError("all rows of one request must share NUM_FRAMES (its output is one tensor)")
    requested = frames.pop()
    if not settings.defaults.default_num_frames:
        if requested:
            raise RequestError(f"NUM_FRAMES={requested}: this model makes images, not videos")
        return 0
    frames = requested or settings.defaults.default_num_frames
    _check_range("NUM_FRAMES", frames, 1, settings.limits.max_num_frames)
    return frames


def _output_size(inputs, batch: int, images: list, settings: ModelSettings) -> tuple[int, int]:
    """The output size of every row. HEIGHT/WIDTH absent or 0 mean the default: the source
    image's size for image-to-image, the model's ``default_height``/``default_width`` otherwise."""
    heights = _scalar("HEIGHT", inputs, batch, 0)
    widths = _scalar("WIDTH", inputs, batch, 0)
    if len(set(heights)) > 1 or len(set(widths)) > 1:
        raise RequestError("all rows of one request must share HEIGHT and WIDTH (its output is one tensor)")
    height, width = int(heights[0]), int(widths[0])
    unsent = tuple(name for name, side in (("HEIGHT", height), ("WIDTH", width)) if not side)
    source = ""
    if images[0] is not None:
        if len({image.shape for image in images}) > 1 and unsent:
            raise RequestError("source images of different sizes in one request need HEIGHT and WIDTH")
        source = f" (the size of the {images[0].shape[0]}x{images[0].shape[1]} source IMAGE)"
        height = height or images[0].shape[0]
        width = width or images[0].shape[1]
    else:
        source = " (the model's default size)"
        height = height or settings.defaults.default_height
        width = width or settings.defaults.default_width
    _check_size(height, width, settings, source, unsent)
    return height, width


def parse_request(
    inputs: Mapping[str, Optional[np.ndarray]], settings: ModelSettings, random_seed=None
) -> ParseResult:
    """Validate one request's tensors; return its items or a ``RequestError`` (never raises it).

    ``inputs`` holds the tensors of the inputs the model's config declares (absent ones None).
    """
    random_seed = random_seed or (lambda: secrets.randbelow(2**31))
    inputs = {name: value for name, value in inputs.items() if value is not None}
    try:
        unknown = sorted(set(inputs) - set(INPUT_KINDS))
        if unknown:
            raise RequestError(f"unknown input(s) {unknown}; known inputs are {list(INPUT_KINDS)}")
        prompt = inputs.get("PROMPT")
        if prompt is None:
            raise RequestError("PROMPT is required")
        if prompt.dtype.kind not in "OSU":
            raise RequestError(f"PROMPT must be BYTES (UTF-8 text), got dtype {prompt.dtype}")
        if prompt.ndim == 0 or prompt.size == 0:
            raise RequestError(f"PROMPT must have shape [batch, 1], got {list(prompt.shape)}")
        batch = prompt.shape[0]
        prompts = [_decode_text("PROMPT", v, settings.limits.max_prompt_bytes, False) for v in _rows("PROMPT", prompt, batch)]

        negatives: list = [None] * batch
        negative = inputs.get("NEGATIVE_PROMPT")
        if negative is not None:
            if negative.dtype.kind not in "OSU":
                raise RequestError(f"NEGATIVE_PROMPT must be BYTES, got dtype {negative.dtype}")
            # An empty negative prompt means none (the pipeline's own default).
            negatives = [
                _decode_text("NEGATIVE_PROMPT", v, settings.limits.max_prompt_bytes, True) or None
                for v in _rows("NEGATIVE_PROMPT", negative, batch)
            ]

        # Any negative SEED (or none) means "draw one"; the seed used is returned.
        seeds = [int(s) if s is not None and s >= 0 else random_seed() for s in _scalar("SEED", inputs, batch, None)]
        steps = _scalar("NUM_INFERENCE_STEPS", inputs, batch, settings.defaults.default_steps)
        guidance = _scalar("GUIDANCE_SCALE", inputs, batch, settings.defaults.default_guidance_scale)
        images = _source_images(inputs, batch, settings)
        is_i2i = images[0] is not None
        height, width = _output_size(inputs, batch, images, settings)
        num_frames = _frames(inputs, batch, settings)
        strengths = _scalar("STRENGTH", inputs, batch, settings.defaults.default_strength)
        for strength in strengths:
            _check_range("STRENGTH", strength, 0.0, 1.0)
        cached = _scalar("STEP_CACHE", inputs, batch, 0)
        for flag in cached:
            if flag not in (0, 1):
                raise RequestError(f"STEP_CACHE must be 0 (exact) or 1 (use the model's step cache; images change), got {flag}")
        adapters = _adapters(inputs, batch, settings)
        items = []
        for row in range(batch):
            _check_range("NUM_INFERENCE_STEPS", steps[row], 1, settings.limits.max_steps)
            _check_range("GUIDANCE_SCALE", guidance[row], 0.0, settings.limits.max_guidance_scale)
            strength = float(strengths[row]) if is_i2i else None  # validated above; text-to-image has none
            if strength is not None and int(steps[row] * strength) < 1:
                raise RequestError(
                    f"NUM_INFERENCE_STEPS={steps[row]} x STRENGTH={strength} runs no denoising step; raise one of them"
                )
            params = CallParams(
                task=IMAGE_TO_IMAGE if is_i2i else TEXT_TO_IMAGE, height=height, width=width,
                num_inference_steps=int(steps[row]), guidance_scale=float(guidance[row]), strength=strength,
                with_negative_prompt=negatives[row] is not None, num_frames=num_frames,
                adapter_group=adapters[row][0] if settings.adapters.lora_batching == "grouped" else "",
            )
            items.append(GenerationItem(prompts[row], seeds[row], params, negatives[row], images[row], bool(cached[row]),
                                        *adapters[row]))
        return ParsedRequest(items=tuple(items))
    except RequestError as error:
        return error
