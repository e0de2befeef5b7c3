"""One module per diffusers family, and the registry that maps a pipeline class to its family.

Each module (``stable_diffusion``, ``sdxl``, ``sd3``, ``flux``, ``qwen_image``, ``z_image``, ``wan``)
declares a ``FAMILY`` (``base.Family``): everything family-specific, from when classifier-free
guidance runs to its continuous-mode step adapter and its random-weight architectures. Nothing
outside this package names a pipeline class; everything else asks the registry. A pipeline of no
listed family gets ``GENERIC`` (dynamic batching, no row drop, no step adapter).

Adding a family: ``docs/adding-a-family.md``.
"""

from __future__ import annotations

from typing import Optional

from . import flux, qwen_image, sd3, sdxl, stable_diffusion, wan, z_image
from .base import (GENERIC, IMAGE_OUTPUT, VIDEO_OUTPUT, Architecture, ContinuousUnsupported, Family,
                   ShrinkSpec)
from .weights import default_device_and_dtype

FAMILIES: tuple[Family, ...] = (stable_diffusion.FAMILY, sdxl.FAMILY, sd3.FAMILY, flux.FAMILY, qwen_image.FAMILY,
                                z_image.FAMILY, wan.FAMILY)
_BY_PIPELINE: dict[str, Family] = {name: family for family in FAMILIES for name in family.pipelines}
ARCHITECTURES: dict[str, tuple[Family, Architecture]] = {
    architecture.name: (family, architecture) for family in FAMILIES for architecture in family.architectures}
RANDOM_PREFIX = "random:"

__all__ = ["ARCHITECTURES", "FAMILIES", "GENERIC", "IMAGE_OUTPUT", "RANDOM_PREFIX", "VIDEO_OUTPUT", "Architecture",
           "ContinuousUnsupported", "Family", "ShrinkSpec", "architecture", "build_random_pipeline", "family_of",
           "frame_step", "shrink_spec", "step_model_for"]


def _class_name(pipe) -> str:
    return pipe.__name__ if isinstance(pipe, type) else type(pipe).__name__


def family_of(pipe) -> Family:
    """The family of a pipeline object (or class)."""
    return _BY_PIPELINE.get(_class_name(pipe), GENERIC)


def architecture(name: str) -> tuple[Family, Architecture]:
    """``(family, architecture)`` of a random-weight architecture name (``sd15``, ``flux-dev-tiny``...)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown random architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def frame_step(pipe) -> int:
    """Video pipelines take ``k * step + 1`` frames (the VAE compresses time by ``step``)."""
    return int(getattr(pipe, "vae_scale_factor_temporal", 1) or 1)


def shrink_spec(pipe) -> Optional[ShrinkSpec]:
    """How to drop rows from ``pipe``'s call, or None if it cannot be done."""
    spec = family_of(pipe).shrink.get(_class_name(pipe))
    unet = getattr(pipe, "unet", None)
    # LCM-style UNets get a batch-sized guidance embedding (timestep_cond) built before the loop.
    if spec and unet is not None and getattr(unet.config, "time_cond_proj_dim", None) is not None:
        return None
    return spec


def step_model_for(pipe, device: str, max_sequence_length: int = 0):
    """The family's step adapter for ``pipe`` (continuous batching), or ``ContinuousUnsupported`` saying why not."""
    name = _class_name(pipe)
    family = family_of(pipe)
    if family.steps is None or name not in family.step_pipelines:
        served = ", ".join(pipeline for each in FAMILIES for pipeline in each.step_pipelines)
        raise ContinuousUnsupported(f"continuous batching has no step model for {name} (it has: {served}); "
                                    "use batching: dynamic for this model")
    return family.steps(pipe, device, max_sequence_length)


def build_random_pipeline(name: str, device: str, dtype, seed: int = 0):
    """Build architecture ``name`` with random weights directly on ``device`` in ``dtype``."""
    import torch

    _, built = architecture(name)
    torch.manual_seed(seed)
    with default_device_and_dtype(device, dtype):
        pipe = built.build()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # a freshly built transformers model is in training mode: dropout on
    # Schedulers keep their tables on the CPU (some call numpy on them): rebuild outside the device context.
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    return pipe.to(device)
