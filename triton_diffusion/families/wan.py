"""Wan 2.1 text-to-video: video DiT, UMT5-XXL text encoder, Wan 3D VAE; classifier-free guidance above 1;
outputs videos (``num_frames`` of 4k+1). Dynamic batching only."""

from __future__ import annotations

from ..paired_cfg import CfgPairing
from .base import VIDEO_OUTPUT, Architecture, Family
from .weights import WAN_LATENTS_MEAN, WAN_LATENTS_STD, byte_level_tokenizer, t5_encoder


def build(tiny: bool):
    """Wan 2.1 T2V 1.3B: 30-layer video DiT (12x128 heads, FFN 8960), UMT5-XXL text encoder, Wan 3D VAE."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    tokenizer = byte_level_tokenizer(512)
    if tiny:
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    else:
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        )
        vae = AutoencoderKLWan(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                               temperal_downsample=[False, True, True],
                               latents_mean=WAN_LATENTS_MEAN, latents_std=WAN_LATENTS_STD)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=t5_encoder(tiny, tokenizer, umt5=True), vae=vae,
                       transformer=transformer, scheduler=scheduler)


FAMILY = Family(
    "wan",
    pipelines=("WanPipeline",),
    cfg_above=1.0,
    # diffusers runs CFG as two transformer calls per step: paired into one (paired_cfg.py); the
    # captions are padded to max_sequence_length by the pipeline, so they concatenate as they are
    cfg_pairing=CfgPairing(("encoder_hidden_states",)),
    output=VIDEO_OUTPUT,
    speed={"compile": "regional"},  # the repeated transformer blocks (docs/benchmarks.md)
    architectures=(
        Architecture("wan2.1-t2v-1.3b", lambda: build(tiny=False), guidance=5.0),
        Architecture("wan2.1-t2v-1.3b-tiny", lambda: build(tiny=True), guidance=5.0, tiny=True),
    ),
    test_model="wan_tiny",
)
