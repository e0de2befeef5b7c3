"""FLUX.1 (dev, schnell): MMDiT, CLIP-L + T5-XXL, 16-channel VAE. Guidance-distilled: GUIDANCE_SCALE is an
embedding the transformer takes per row, never classifier-free guidance, so a negative prompt is refused."""

from __future__ import annotations

from .base import Architecture, Family, ShrinkSpec
from .stepping import FlowMatchSteps, RowState
from .weights import byte_level_tokenizer, clip_text, kl_vae, t5_encoder


class FluxSteps(FlowMatchSteps):
    """``FluxPipeline.__call__`` (guidance-distilled: the guidance is an embedding, per row)."""

    def prepare(self, items):
        import numpy as np
        from diffusers.pipelines.flux import pipeline_flux

        pipe = self.pipe
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=[item.prompt for item in items], prompt_2=None,
                                                      device=self.device, max_sequence_length=self.max_sequence_length)
        channels = pipe.transformer.config.in_channels // 4
        rows = []
        for index, item in enumerate(items):
            params = item.params
            latents, image_ids = self._noise(item, (channels, params.height, params.width), embeds.dtype)
            sigmas = np.linspace(1.0, 1 / params.num_inference_steps, params.num_inference_steps)
            if getattr(pipe.scheduler.config, "use_flow_sigmas", False):
                sigmas = None
            mu = self._shift(latents.shape[1], pipeline_flux)
            timesteps, all_sigmas = self._schedule(params.num_inference_steps, sigmas, mu, pipeline_flux)
            condition = {"embeds": embeds[index:index + 1], "pooled": pooled[index:index + 1], "text_ids": text_ids,
                         "image_ids": image_ids}
            rows.append(RowState(item, latents, condition, timesteps, all_sigmas))
        return rows

    def step(self, rows):
        import torch

        pipe = self.pipe
        latents = torch.cat([row.latents for row in rows])
        timestep = self._current_timesteps(rows).to(latents.dtype)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.tensor([row.guidance_scale for row in rows], device=latents.device, dtype=torch.float32)
        first = rows[0].condition
        self._name_rows(rows)
        velocity = pipe.transformer(
            hidden_states=latents,
            timestep=timestep / 1000,
            guidance=guidance,
            pooled_projections=torch.cat([row.condition["pooled"] for row in rows]),
            encoder_hidden_states=torch.cat([row.condition["embeds"] for row in rows]),
            txt_ids=first["text_ids"],
            img_ids=first["image_ids"],
            joint_attention_kwargs={},
            return_dict=False,
        )[0]
        self._advance(rows, self._euler(rows, latents, velocity))

    def decode(self, rows):
        import torch

        pipe = self.pipe
        height, width = rows[0].size
        return self._decode_shifted(
            pipe._unpack_latents(torch.cat([row.latents for row in rows]), height, width, pipe.vae_scale_factor))


def build(tiny: bool):
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
        text_encoder = clip_text(32, 2, 4, 64, tokenizer)
        vae = kl_vae((16, 32, 32, 32), 16, 1, 16, flux=True)
    else:
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
        text_encoder = clip_text(768, 12, 12, 3072, tokenizer)
        vae = kl_vae((128, 256, 512, 512), 16, 2, 32, flux=True)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=t5_encoder(tiny, tokenizer_2), tokenizer_2=tokenizer_2, transformer=transformer,
    )


_SHRINK = ShrinkSpec(("latents", "prompt_embeds"), "transformer", ("guidance", "pooled_projections", "encoder_hidden_states"))
FAMILY = Family(
    "flux",
    pipelines=("FluxPipeline", "FluxImg2ImgPipeline"),
    cfg_above=None,
    negative_prompt_refusal=(
        "FLUX.1 is guidance-distilled (GUIDANCE_SCALE is its embedded guidance, not classifier-free guidance), "
        "so a NEGATIVE_PROMPT would be ignored; send none"),
    shrink={"FluxPipeline": _SHRINK, "FluxImg2ImgPipeline": _SHRINK},
    steps=FluxSteps,
    step_pipelines=("FluxPipeline",),
    schedulers=("FlowMatchEulerDiscreteScheduler",),
    # no fuse_qkv yet: with fp8 it is not measured (the unfused copies diffusers kept, +4 GB, which
    # ruled it out, are dropped since 2026-12-08: acceleration.drop_unfused_projections)
    speed={"compile": "regional", "quantization": "fp8"},
    sequence_parallel=True,  # T5 captions padded to max_sequence_length; 2x2 latent patches (tests/test_parallel.py)
    architectures=(
        Architecture("flux-dev", lambda: build(tiny=False), guidance=3.5),
        Architecture("flux-dev-tiny", lambda: build(tiny=True), guidance=3.5, tiny=True),
    ),
    test_model="flux_tiny",
)
