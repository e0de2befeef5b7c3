"""Tiny random-weight pipelines of real architectures, built locally (no model hub).

They are saved with ``save_pretrained`` and served through the same ``from_pretrained`` path as
real checkpoints, so tests and the embedded default exercise the real loading and calling code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .settings import default_cache_dir

TINY_MODELS = ("tiny-sd",)
_BUILD_VERSION = "1"  # bump when the architecture below changes, so caches rebuild


def _byte_level_clip_tokenizer(max_length: int = 77):
    """A CLIP BPE tokenizer over byte-level characters (no merges): every character is a token."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    base = list(bytes_to_unicode().values())
    vocab = {token: index for index, token in enumerate(base + [t + "</w>" for t in base])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_tiny_sd(seed: int = 0):
    """Stable Diffusion architecture (UNet2DCondition + CLIP text encoder + KL VAE), tiny widths."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _byte_level_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),  # four blocks: the real 8x downsampling factor
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=128,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


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
