"""Random-weight pipelines of real diffusers architectures, built from configs on the target device.

``pretrained_model: "random:<name>"`` in a ``config.pbtxt`` serves one of these: the real pipeline
classes and shapes (so timings and memory are those of the real model), no weights to download.
GPU benchmarks use the full-size ones; the ``-tiny`` ones check the same code path on a CPU.
"""

from __future__ import annotations

import contextlib
from typing import Callable

RANDOM_PREFIX = "random:"


def byte_level_tokenizer(max_length: int):
    """A byte-level BPE tokenizer with no merges (every character a token, ids < 514)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    base = list(bytes_to_unicode().values())
    vocab = {token: index for index, token in enumerate(base + [t + "</w>" for t in base])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


@contextlib.contextmanager
def _default(device, dtype):
    """Create parameters directly on ``device`` in ``dtype`` (a 12B model never exists in fp32)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _clip_text(hidden: int, layers: int, heads: int, intermediate: int, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=max(49408 if hidden >= 768 else 0, len(tokenizer)),
            hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )


def _vae(channels: tuple, latent_channels: int, layers: int, groups: int, flux: bool = False):
    from diffusers import AutoencoderKL

    extra = {"use_quant_conv": False, "use_post_quant_conv": False, "scaling_factor": 0.3611, "shift_factor": 0.1159} if flux else {}
    return AutoencoderKL(
        block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels), latent_channels=latent_channels,
        layers_per_block=layers, norm_num_groups=groups, **extra,
    )


def stable_diffusion(tiny: bool):
    """SD-1.5: UNet 860M (320/640/1280/1280, cross-attn 768), CLIP ViT-L/14 text encoder, KL VAE."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = byte_level_tokenizer(77)
    if tiny:
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        )
        text_encoder = _clip_text(32, 2, 4, 64, tokenizer)
        vae = _vae((16, 32, 32, 32), 4, 1, 16)
    else:
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8,
        )
        text_encoder = _clip_text(768, 12, 12, 3072, tokenizer)
        vae = _vae((128, 256, 512, 512), 4, 2, 32)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def flux(tiny: bool):
    """FLUX.1-dev: 12B MMDiT (19 double + 38 single blocks, 24x128 heads), T5-XXL + CLIP-L, 16-ch VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = byte_level_tokenizer(77)
    tokenizer_2 = byte_level_tokenizer(512)
    if tiny:
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        text_encoder = _clip_text(32, 2, 4, 64, tokenizer)
        t5 = T5Config(vocab_size=len(tokenizer_2), d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                      feed_forward_proj="gated-gelu")
        vae = _vae((16, 32, 32, 32), 16, 1, 16, flux=True)
    else:
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
        text_encoder = _clip_text(768, 12, 12, 3072, tokenizer)
        t5 = T5Config(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                      feed_forward_proj="gated-gelu")
        vae = _vae((128, 256, 512, 512), 16, 2, 32, flux=True)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(t5), tokenizer_2=tokenizer_2, transformer=transformer,
    )


ARCHITECTURES: dict[str, Callable] = {
    "sd15": lambda: stable_diffusion(tiny=False),
    "sd15-tiny": lambda: stable_diffusion(tiny=True),
    "flux-dev": lambda: flux(tiny=False),
    "flux-dev-tiny": lambda: flux(tiny=True),
}


def build_random_pipeline(name: str, device: str, dtype, seed: int = 0):
    """Build ``name`` with random weights directly on ``device`` in ``dtype``."""
    import torch

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown random architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    torch.manual_seed(seed)
    with _default(device, dtype):
        pipe = ARCHITECTURES[name]()
    return pipe.to(device)
