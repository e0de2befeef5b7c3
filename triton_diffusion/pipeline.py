"""Load a diffusers pipeline from a model's settings, and run one pipeline call per chunk.

Family-agnostic: the pipeline class comes from ``model_index.json`` (or ``pipeline_class``), the
image-to-image variant from ``AutoPipelineForImage2Image.from_pipe`` (shared weights), and call
arguments are passed only where the pipeline's ``__call__`` accepts them.
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable, Optional, Sequence

import numpy as np

from .architectures import RANDOM_PREFIX, build_random_pipeline
from .cancellation import RowCancellation
from .requests import IMAGE_TO_IMAGE, GenerationItem
from .settings import ModelSettings

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """A device (or host allocator) out-of-memory error, after which a smaller batch may fit."""
    import torch

    out_of_memory = isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )
    if out_of_memory and torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the smaller retries the freed blocks
    return out_of_memory


class ModelLoadError(RuntimeError):
    """The pipeline could not be loaded; the message says what to fix."""


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ModelLoadError(f"torch_dtype must be auto, float32, float16 or bfloat16, got {name!r}") from None


def _load_error_message(settings: ModelSettings, location: str, exc: Exception) -> str:
    import os

    # Hub ids look like "org/name"; anything else is meant as a local path.
    looks_local = os.path.isabs(location) or location.startswith(".") or location.count("/") != 1
    if looks_local and not os.path.exists(location):
        hint = f"the local path {location!r} does not exist (run scripts/setup.sh to build the tiny models)"
    elif settings.local_files_only or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        hint = (
            f"the weights of {location!r} are not in the local Hugging Face cache and downloads are disabled "
            "(local_files_only / HF_HUB_OFFLINE); download them first or mount a cache that has them"
        )
    else:
        hint = f"{location!r} could not be loaded from a local path or the Hugging Face Hub"
    return f"cannot load pipeline from config.pbtxt parameter pretrained_model={settings.pretrained_model!r}: {hint}. Cause: {type(exc).__name__}: {exc}"


class PipelineRunner:
    """Holds the loaded pipelines of one model instance and runs chunks through them."""

    def __init__(self, text_to_image, image_to_image, device: str):
        self.text_to_image = text_to_image
        self.image_to_image = image_to_image
        self.device = device
        self._accepted = {
            IMAGE_TO_IMAGE: set(inspect.signature(image_to_image.__call__).parameters) if image_to_image else set(),
            "text-to-image": set(inspect.signature(text_to_image.__call__).parameters),
        }

    @classmethod
    def load(cls, settings: ModelSettings) -> "PipelineRunner":
        import diffusers
        import torch

        if settings.torch_num_threads > 0:
            torch.set_num_threads(settings.torch_num_threads)
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.torch_dtype, device)
        pipeline_cls = getattr(diffusers, settings.pipeline_class or "DiffusionPipeline", None)
        if pipeline_cls is None:
            raise ModelLoadError(f"config.pbtxt parameter pipeline_class={settings.pipeline_class!r} is not a diffusers class")
        location = settings.model_location
        kwargs = {"torch_dtype": dtype, "local_files_only": settings.local_files_only}
        if settings.variant:
            kwargs["variant"] = settings.variant
        if location.startswith(RANDOM_PREFIX):
            try:
                pipe = build_random_pipeline(location[len(RANDOM_PREFIX):], device, dtype)
            except ValueError as exc:
                raise ModelLoadError(f"config.pbtxt parameter pretrained_model: {exc}") from None
        else:
            try:
                pipe = pipeline_cls.from_pretrained(location, **kwargs)
            except Exception as exc:  # diffusers raises many types here; all mean "not loadable"
                raise ModelLoadError(_load_error_message(settings, location, exc)) from exc
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        image_to_image = None
        if settings.enable_image_to_image:
            try:
                image_to_image = diffusers.AutoPipelineForImage2Image.from_pipe(pipe)
                image_to_image.set_progress_bar_config(disable=True)
            except (ValueError, KeyError) as exc:
                log.warning("%s has no image-to-image variant (%s); serving text-to-image only", type(pipe).__name__, exc)
        return cls(pipe, image_to_image, device)

    def unsupported(self, item: GenerationItem) -> Optional[str]:
        """Why this pipeline cannot serve ``item``, or None."""
        accepted = self._accepted[item.task]
        if not accepted:
            return f"this model ({type(self.text_to_image).__name__}) does not serve {item.task}"
        if item.negative_prompt is not None and "negative_prompt" not in accepted:
            return f"this model ({type(self.text_to_image).__name__}) does not take NEGATIVE_PROMPT"
        return None

    def run(
        self, items: Sequence[GenerationItem], cancelled: Optional[Sequence[Callable[[], bool]]] = None
    ) -> list[Optional[np.ndarray]]:
        """One pipeline call for items of one signature; returns uint8 HxWx3 images in order.

        ``cancelled[i]()`` says whether item i is still wanted; a cancelled item is dropped from
        the call at the next denoising step where the pipeline allows it, and its output is None.
        """
        import torch
        from PIL import Image

        first = items[0]
        is_i2i = first.task == IMAGE_TO_IMAGE
        pipe = self.image_to_image if is_i2i else self.text_to_image
        # One CPU generator per item: its noise does not depend on its batch-mates or the device.
        generators = [torch.Generator("cpu").manual_seed(item.seed) for item in items]
        kwargs = {
            "prompt": [item.prompt for item in items],
            "num_inference_steps": first.num_inference_steps,
            "guidance_scale": first.guidance_scale,
            "generator": generators,
            "output_type": "np",
        }
        if first.negative_prompt is not None:
            kwargs["negative_prompt"] = [item.negative_prompt for item in items]
        if is_i2i:
            kwargs["image"] = [
                Image.fromarray(item.image).convert("RGB").resize((item.width, item.height), Image.LANCZOS)
                if item.image.shape[:2] != (item.height, item.width)
                else Image.fromarray(item.image)
                for item in items
            ]
            kwargs["strength"] = first.strength
        # Image-to-image pipelines that take no size (SD) use the resized source image's size.
        kwargs["height"], kwargs["width"] = first.height, first.width
        rows = RowCancellation(cancelled or [lambda: False] * len(items), generators)
        if cancelled is not None:
            kwargs["callback_on_step_end"] = rows
            kwargs["callback_on_step_end_tensor_inputs"] = rows.tensor_inputs(pipe)
        accepted = self._accepted[first.task]
        kwargs = {key: value for key, value in kwargs.items() if key in accepted}
        try:
            with torch.inference_mode():
                images = pipe(**kwargs).images
        finally:
            rows.close()
        images = np.asarray(images)
        outputs: list[Optional[np.ndarray]] = [None] * len(items)
        for row, position in rows.wanted():
            outputs[row] = (images[position] * 255).round().clip(0, 255).astype(np.uint8)
        return outputs
