"""What differs between diffusers families, in one place: how a request's knobs map to the call.

The backend serves any diffusers text-to-image (or text-to-video) pipeline through one call
shape; the few things a pipeline's signature cannot tell are listed here, per family, keyed by
the pipeline class name. A new family with the common shape needs no entry at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

IMAGE_OUTPUT, VIDEO_OUTPUT = "IMAGE", "VIDEO"


@dataclass(frozen=True)
class Family:
    name: str
    # The pipeline argument that GUIDANCE_SCALE sets: classifier-free guidance in most families;
    # Qwen-Image's ``guidance_scale`` only feeds guidance-distilled checkpoints, its CFG is ``true_cfg_scale``.
    guidance_argument: str = "guidance_scale"
    # True CFG runs only when a negative prompt is given; this one is sent when the request has none
    # (the family's published default), so GUIDANCE_SCALE > 1 always means CFG.
    cfg_negative_prompt: Optional[str] = None
    output: str = IMAGE_OUTPUT  # IMAGE: output.images [B, C, H, W]; VIDEO: output.frames [B, F, C, H, W]
    # Why NEGATIVE_PROMPT is refused, where the call signature takes one that would have no effect.
    negative_prompt_refusal: Optional[str] = None

    @property
    def video(self) -> bool:
        return self.output == VIDEO_OUTPUT


DEFAULT_FAMILY = Family("diffusers")
# Class-name prefix -> family. Text-to-image and image-to-image classes of one family share it.
FAMILIES: dict[str, Family] = {
    "Flux": Family("flux", negative_prompt_refusal=(
        "FLUX.1 is guidance-distilled (GUIDANCE_SCALE is its embedded guidance, not classifier-free guidance), "
        "so a NEGATIVE_PROMPT would be ignored; send none")),
    "QwenImage": Family("qwen-image", guidance_argument="true_cfg_scale", cfg_negative_prompt=" "),
    "Wan": Family("wan", output=VIDEO_OUTPUT),
}


def family_of(pipe) -> Family:
    """The family of a pipeline object (or class)."""
    name = pipe.__name__ if isinstance(pipe, type) else type(pipe).__name__
    for prefix, family in FAMILIES.items():
        if name.startswith(prefix):
            return family
    return DEFAULT_FAMILY


def frame_step(pipe) -> int:
    """Video pipelines take ``k * step + 1`` frames (the VAE compresses time by ``step``)."""
    return int(getattr(pipe, "vae_scale_factor_temporal", 1) or 1)
