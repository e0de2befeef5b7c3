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


def _clip_text(hidden: int, layers: int, heads: int, intermediate: int, tokenizer, projection: int = 0,
               act: str = "quick_gelu"):
    """A CLIP text encoder; with ``projection``, the variant with a projection head (pooled output)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=max(49408 if hidden >= 768 else 0, len(tokenizer)),
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **({"projection_dim": projection} if projection else {}),
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


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

    tokenizer = byte_level_tokenizer(77)
    tokenizer_2 = byte_level_tokenizer(512)
    if tiny:
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        text_encoder = _clip_text(32, 2, 4, 64, tokenizer)
        vae = _vae((16, 32, 32, 32), 16, 1, 16, flux=True)
    else:
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
        text_encoder = _clip_text(768, 12, 12, 3072, tokenizer)
        vae = _vae((128, 256, 512, 512), 16, 2, 32, flux=True)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=_t5(tiny, tokenizer_2), tokenizer_2=tokenizer_2, transformer=transformer,
    )


def _t5(tiny: bool, tokenizer, umt5: bool = False):
    """T5 v1.1 XXL encoder (FLUX, SD3) or UMT5-XXL (Wan): 24 layers, d_model 4096, 64 heads."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    if tiny:
        config = config_cls(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                            feed_forward_proj="gated-gelu")
    else:
        config = config_cls(vocab_size=256384 if umt5 else 32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64,
                            num_layers=24, feed_forward_proj="gated-gelu")
    return model_cls(config).eval()


def stable_diffusion_xl(tiny: bool):
    """SDXL base 1.0: UNet 2.6B (320/640/1280, 1/2/10 transformer layers, cross-attn 2048), CLIP-L +
    OpenCLIP bigG text encoders, KL VAE (scaling 0.13025)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = byte_level_tokenizer(77), byte_level_tokenizer(77)
    if tiny:
        text_encoder = _clip_text(32, 2, 4, 64, tokenizer)
        text_encoder_2 = _clip_text(32, 2, 4, 64, tokenizer_2, projection=32, act="gelu")
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
            cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=32,
        )
        vae = _vae((16, 32, 32, 32), 4, 1, 16)
    else:
        text_encoder = _clip_text(768, 12, 12, 3072, tokenizer)
        text_encoder_2 = _clip_text(1280, 32, 20, 5120, tokenizer_2, projection=1280, act="gelu")
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = _vae((128, 256, 512, 512), 4, 2, 32)
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )


def stable_diffusion_3(tiny: bool):
    """SD3.5 Large: 8B MMDiT (38 blocks, 38x64 heads, qk RMS-norm), CLIP-L + bigG + T5-XXL, 16-ch VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = byte_level_tokenizer(77), byte_level_tokenizer(77), byte_level_tokenizer(256)
    if tiny:
        text_encoder = _clip_text(32, 2, 4, 64, tokenizer, projection=32, act="gelu")
        text_encoder_2 = _clip_text(32, 2, 4, 64, tokenizer_2, projection=32, act="gelu")
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
            joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
            pos_embed_max_size=32, qk_norm="rms_norm",
        )
        vae = _vae((16, 32, 32, 32), 16, 1, 16, flux=True)
    else:
        text_encoder = _clip_text(768, 12, 12, 3072, tokenizer, projection=768)
        text_encoder_2 = _clip_text(1280, 32, 20, 5120, tokenizer_2, projection=1280, act="gelu")
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
            num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
            out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm",
        )
        vae = _vae((128, 256, 512, 512), 16, 2, 32, flux=True)
    vae.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=_t5(tiny, tokenizer_3), tokenizer_3=tokenizer_3,
    )


# The Qwen chat template (Qwen3's, without tool calls): Z-Image formats every prompt through it.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# Wan VAE latent statistics (shared by Qwen-Image's VAE), per channel.
WAN_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                   3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def qwen_tokenizer(max_length: int):
    """Byte-level tokenizer with Qwen's chat markers as single tokens (templates stay short)."""
    tokenizer = byte_level_tokenizer(max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def qwen_image(tiny: bool):
    """Qwen-Image: 20B MMDiT (60 blocks, 24x128 heads), Qwen2.5-VL-7B text encoder, Wan-style 16-ch VAE."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer(1024 + 34)
    if tiny:
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
        )
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 2, "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default"}}
        vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32}
        vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, True],
                                     latents_mean=WAN_LATENTS_MEAN, latents_std=WAN_LATENTS_STD)
        vocab = len(tokenizer)
    else:
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
        )
        text = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                "num_key_value_heads": 4, "rope_theta": 1000000.0, "max_position_embeddings": 128000,
                "rms_norm_eps": 1e-6, "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default"}}
        vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
                  "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112}
        vae = AutoencoderKLQwenImage(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                     temperal_downsample=[False, True, True],
                                     latents_mean=WAN_LATENTS_MEAN, latents_std=WAN_LATENTS_STD)
        vocab = 152064
    config = Qwen2_5_VLConfig(text_config={**text, "vocab_size": vocab}, vision_config=vision, vocab_size=vocab,
                              hidden_size=text["hidden_size"])
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
    )
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(),
        tokenizer=tokenizer, transformer=transformer,
    )


def z_image(tiny: bool):
    """Z-Image-Turbo: 6B single-stream DiT (30 layers + 2+2 refiners, dim 3840, 30 heads), Qwen3-4B text
    encoder, FLUX's 16-ch VAE; 8 denoising steps without CFG."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = qwen_tokenizer(512)
    if tiny:
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0,
            axes_dims=[8, 4, 4], axes_lens=[1024, 64, 64],
        )
        text = Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16, vocab_size=len(tokenizer), max_position_embeddings=1024)
        vae = _vae((16, 32, 32, 32), 16, 1, 16, flux=True)
    else:
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
            n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
            t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
        )
        text = Qwen3Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                           rope_theta=1000000.0, tie_word_embeddings=True)
        vae = _vae((128, 256, 512, 512), 16, 2, 32, flux=True)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=vae, text_encoder=Qwen3Model(text).eval(), tokenizer=tokenizer, transformer=transformer,
    )


def wan(tiny: bool):
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
    return WanPipeline(tokenizer=tokenizer, text_encoder=_t5(tiny, tokenizer, umt5=True), vae=vae,
                       transformer=transformer, scheduler=scheduler)



ARCHITECTURES: dict[str, Callable] = {
    "sd15": lambda: stable_diffusion(tiny=False),
    "sd15-tiny": lambda: stable_diffusion(tiny=True),
    "flux-dev": lambda: flux(tiny=False),
    "flux-dev-tiny": lambda: flux(tiny=True),
    "sdxl": lambda: stable_diffusion_xl(tiny=False),
    "sdxl-tiny": lambda: stable_diffusion_xl(tiny=True),
    "sd35-large": lambda: stable_diffusion_3(tiny=False),
    "sd35-large-tiny": lambda: stable_diffusion_3(tiny=True),
    "qwen-image": lambda: qwen_image(tiny=False),
    "qwen-image-tiny": lambda: qwen_image(tiny=True),
    "z-image-turbo": lambda: z_image(tiny=False),
    "z-image-turbo-tiny": lambda: z_image(tiny=True),
    "wan2.1-t2v-1.3b": lambda: wan(tiny=False),
    "wan2.1-t2v-1.3b-tiny": lambda: wan(tiny=True),
}


def build_random_pipeline(name: str, device: str, dtype, seed: int = 0):
    """Build ``name`` with random weights directly on ``device`` in ``dtype``."""
    import torch

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown random architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    torch.manual_seed(seed)
    with _default(device, dtype):
        pipe = ARCHITECTURES[name]()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # a freshly built transformers model is in training mode: dropout on
    # Schedulers keep their tables on the CPU (some call numpy on them): rebuild outside the device context.
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    return pipe.to(device)
