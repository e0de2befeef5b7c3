"""Tiny random-weight pipelines of real architectures, built locally (no model hub).

They are saved with ``save_pretrained`` and served through the same ``from_pretrained`` path as
real checkpoints, so tests and the embedded default exercise the real loading and calling code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .families import build_random_pipeline
from .settings import default_cache_dir

TINY_MODELS = ("tiny-sd",)
_BUILD_VERSION = "2"  # bump when the architecture below changes, so caches rebuild


def build_tiny_sd(seed: int = 0):
    """Stable Diffusion architecture (UNet2DCondition + CLIP text encoder + KL VAE), tiny widths."""
    import torch

    return build_random_pipeline("sd15-tiny", "cpu", torch.float32, seed)


def ensure_tiny_model(name: str = "tiny-sd", cache_dir: Path | None = None, force: bool = False) -> Path:
    """Build ``name`` into the cache (once) and return its directory."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; known: {TINY_MODELS}")
    target = (cache_dir or default_cache_dir()) / name
    stamp = target / ".tiny-build"
    if not force and stamp.is_file() and stamp.read_text() == _BUILD_VERSION:
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    build_tiny_sd().save_pretrained(staging)
    (staging / ".tiny-build").write_text(_BUILD_VERSION)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # atomic: a half-written model is never served
    return target
