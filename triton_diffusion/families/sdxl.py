"""Stable Diffusion XL: UNet, CLIP-L + OpenCLIP bigG, KL VAE; classifier-free guidance above 1. Dynamic
batching only: no step adapter, and a cancelled row rides to the end of its call (its added time and
text embeddings have not been checked for a row drop)."""

from __future__ import annotations

from .base import Architecture, Family
from .weights import byte_level_tokenizer, clip_text, kl_vae


def build(tiny: bool):
    """SDXL base 1.0: UNet 2.6B (320/640/1280, 1/2/10 transformer layers, cross-attn 2048), CLIP-L +
    OpenCLIP bigG text encoders, KL VAE (scaling 0.13025)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = byte_level_tokenizer(77), byte_level_tokenizer(77)
    if tiny:
        text_encoder = clip_text(32, 2, 4, 64, tokenizer)
        text_encoder_2 = clip_text(32, 2, 4, 64, tokenizer_2, projection=32, act="gelu")
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
            cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=32,
        )
        vae = kl_vae((16, 32, 32, 32), 4, 1, 16)
    else:
        text_encoder = clip_text(768, 12, 12, 3072, tokenizer)
        text_encoder_2 = clip_text(1280, 32, 20, 5120, tokenizer_2, projection=1280, act="gelu")
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = kl_vae((128, 256, 512, 512), 4, 2, 32)
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )


FAMILY = Family(
    "stable-diffusion-xl",
    pipelines=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    cfg_above=1.0,
    speed={"compile": "full", "compile_vae": "true", "channels_last": "true"},  # as SD's, measured (docs/benchmarks.md)
    architectures=(
        Architecture("sdxl", lambda: build(tiny=False), dtype="float16", guidance=5.0),
        Architecture("sdxl-tiny", lambda: build(tiny=True), dtype="float16", guidance=5.0, tiny=True),
    ),
    test_model="sdxl_tiny",
)
