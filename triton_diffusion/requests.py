"""Triton request tensors -> typed generation items, or a specific error for that request alone.

Pure logic: the input is a ``{name: numpy array}`` mapping (what the Python backend gives us),
so every rule here is unit-tested without a server.

A Triton request may carry a batch dimension B > 1 (B prompts in one request); it becomes B
``GenerationItem``s that share the request's output size, so its output is one [B, H, W, 3] tensor.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import numpy as np

from .settings import ModelSettings

TEXT_TO_IMAGE = "text-to-image"
IMAGE_TO_IMAGE = "image-to-image"

# name -> (accepted numpy dtype kinds, human name) for scalar-per-row inputs
_SCALAR_INPUTS = {
    "SEED": ("iu", "an integer"),
    "NUM_INFERENCE_STEPS": ("iu", "an integer"),
    "HEIGHT": ("iu", "an integer"),
    "WIDTH": ("iu", "an integer"),
    "GUIDANCE_SCALE": ("fiu", "a number"),
    "STRENGTH": ("fiu", "a number"),
}
KNOWN_INPUTS = ("PROMPT", "NEGATIVE_PROMPT", "IMAGE", *_SCALAR_INPUTS)
MAX_SEED = 2**63 - 1


class RequestError(ValueError):
    """A request is invalid; the message is sent back to that client as INVALID_ARG."""


@dataclass(frozen=True)
class GenerationItem:
    """One image to generate. ``image`` is set for image-to-image (uint8 HxWx3)."""

    prompt: str
    negative_prompt: Optional[str]
    seed: int
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    image: Optional[np.ndarray] = None
    strength: Optional[float] = None

    @property
    def task(self) -> str:
        return IMAGE_TO_IMAGE if self.image is not None else TEXT_TO_IMAGE


@dataclass(frozen=True)
class ParsedRequest:
    """A valid request: its rows, in order."""

    items: tuple[GenerationItem, ...]


ParseResult = Union[ParsedRequest, RequestError]


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


def _scalar(name: str, inputs: Mapping[str, np.ndarray], batch: int, default: float) -> list:
    array = inputs.get(name)
    if array is None:
        return [default] * batch
    kinds, description = _SCALAR_INPUTS[name]
    if array.dtype.kind not in kinds:
        raise RequestError(f"{name} must be {description}, got dtype {array.dtype}")
    values = _rows(name, array, batch).tolist()
    if "f" in kinds:
        for value in values:
            if not math.isfinite(value):
                raise RequestError(f"{name} must be finite, got {value}")
    return values


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise RequestError(f"{name}={value} is outside the allowed range [{low}, {high}]")


def _check_size(height: int, width: int, settings: ModelSettings) -> None:
    for name, side in (("HEIGHT", height), ("WIDTH", width)):
        _check_range(name, side, settings.min_side, settings.max_side)
        if side % settings.size_multiple:
            raise RequestError(f"{name}={side} must be a multiple of {settings.size_multiple}")
    if height * width > settings.max_pixels:
        raise RequestError(f"{height}x{width} is {height * width} pixels; the limit is {settings.max_pixels}")
    if settings.allowed_sizes and (height, width) not in settings.allowed_sizes:
        allowed = ", ".join(f"{h}x{w}" for h, w in settings.allowed_sizes)
        raise RequestError(f"size {height}x{width} is not served by this model; allowed sizes: {allowed}")


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
    if not settings.enable_image_to_image:
        raise RequestError("this model does not serve image-to-image; send no IMAGE (or an empty one)")
    if image.shape[1] < 8 or image.shape[2] < 8:
        raise RequestError(f"IMAGE is {image.shape[1]}x{image.shape[2]}; it must be at least 8x8")
    if pixels > settings.max_input_image_pixels:
        raise RequestError(f"IMAGE has {pixels} pixels; the limit is {settings.max_input_image_pixels}")
    return [np.ascontiguousarray(row) for row in image]


def parse_request(
    inputs: Mapping[str, Optional[np.ndarray]], settings: ModelSettings, random_seed=None
) -> ParseResult:
    """Validate one request's tensors; return its items or a ``RequestError`` (never raises it)."""
    random_seed = random_seed or (lambda: secrets.randbelow(2**31))
    inputs = {name: value for name, value in inputs.items() if value is not None}
    try:
        unknown = sorted(set(inputs) - set(KNOWN_INPUTS))
        if unknown:
            raise RequestError(f"unknown input(s) {unknown}; known inputs are {list(KNOWN_INPUTS)}")
        prompt = inputs.get("PROMPT")
        if prompt is None:
            raise RequestError("PROMPT is required")
        if prompt.dtype.kind not in "OSU":
            raise RequestError(f"PROMPT must be BYTES (UTF-8 text), got dtype {prompt.dtype}")
        if prompt.ndim == 0 or prompt.size == 0:
            raise RequestError(f"PROMPT must have shape [batch, 1], got {list(prompt.shape)}")
        batch = prompt.shape[0]
        prompts = [_decode_text("PROMPT", v, settings.max_prompt_bytes, False) for v in _rows("PROMPT", prompt, batch)]

        negatives: list = [None] * batch
        negative = inputs.get("NEGATIVE_PROMPT")
        if negative is not None:
            if negative.dtype.kind not in "OSU":
                raise RequestError(f"NEGATIVE_PROMPT must be BYTES, got dtype {negative.dtype}")
            # An empty negative prompt means none (the pipeline's own default).
            negatives = [
                _decode_text("NEGATIVE_PROMPT", v, settings.max_prompt_bytes, True) or None
                for v in _rows("NEGATIVE_PROMPT", negative, batch)
            ]

        seeds = [int(s) if s is not None else None for s in _scalar("SEED", inputs, batch, None)]
        for seed in seeds:
            if seed is not None:
                _check_range("SEED", seed, 0, MAX_SEED)
        steps = _scalar("NUM_INFERENCE_STEPS", inputs, batch, settings.default_steps)
        guidance = _scalar("GUIDANCE_SCALE", inputs, batch, settings.default_guidance_scale)
        images = _source_images(inputs, batch, settings)
        is_i2i = images[0] is not None
        # Image-to-image defaults to the source image's size; text-to-image to the model's.
        default_height = images[0].shape[0] if is_i2i else settings.default_height
        default_width = images[0].shape[1] if is_i2i else settings.default_width
        heights = _scalar("HEIGHT", inputs, batch, default_height)
        widths = _scalar("WIDTH", inputs, batch, default_width)
        strengths = _scalar("STRENGTH", inputs, batch, settings.default_strength)
        for strength in strengths:
            _check_range("STRENGTH", strength, 0.0, 1.0)
        if not is_i2i:
            strengths = [None] * batch  # validated above, but text-to-image has no strength

        if len(set(heights)) > 1 or len(set(widths)) > 1:
            raise RequestError("all rows of one request must share HEIGHT and WIDTH (its output is one tensor)")
        items = []
        for row in range(batch):
            _check_range("NUM_INFERENCE_STEPS", steps[row], 1, settings.max_steps)
            _check_range("GUIDANCE_SCALE", guidance[row], 0.0, settings.max_guidance_scale)
            _check_size(int(heights[row]), int(widths[row]), settings)
            if strengths[row] is not None:
                if int(steps[row] * strengths[row]) < 1:
                    raise RequestError(
                        f"NUM_INFERENCE_STEPS={steps[row]} x STRENGTH={strengths[row]} runs no denoising step; "
                        "raise one of them"
                    )
            items.append(
                GenerationItem(
                    prompt=prompts[row],
                    negative_prompt=negatives[row],
                    seed=seeds[row] if seeds[row] is not None else random_seed(),
                    num_inference_steps=int(steps[row]),
                    guidance_scale=float(guidance[row]),
                    height=int(heights[row]),
                    width=int(widths[row]),
                    image=images[row],
                    strength=float(strengths[row]) if strengths[row] is not None else None,
                )
            )
        return ParsedRequest(items=tuple(items))
    except RequestError as error:
        return error
