"""Stable Diffusion 3 and 3.5: MMDiT, CLIP-L + OpenCLIP bigG + T5-XXL, 16-channel VAE; classifier-free
guidance above 1 (no skip-layer guidance, the pipeline's default)."""

from __future__ import annotations

from .base import Architecture, Family
from .stepping import FlowMatchSteps, RowState
from .weights import byte_level_tokenizer, clip_text, kl_vae, t5_encoder


class StableDiffusion3Steps(FlowMatchSteps):
    """``StableDiffusion3Pipeline.__call__``: classifier-free guidance per row (GUIDANCE_SCALE above 1),
    in the model's dtype; no skip-layer guidance (the pipeline's default)."""

    def prepare(self, items):
        from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3 as module

        pipe = self.pipe
        guided = [self.family.guided(item.params.guidance_scale) for item in items]
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=[item.prompt for item in items], prompt_2=None, prompt_3=None,
            negative_prompt=[item.negative_prompt or "" for item in items] if any(guided) else None,
            do_classifier_free_guidance=any(guided), device=self.device, max_sequence_length=self.max_sequence_length)
        rows = []
        for index, item in enumerate(items):
            params = item.params
            latents = self._noise(item, (pipe.transformer.config.in_channels, params.height, params.width), embeds.dtype)
            mu = None
            if pipe.scheduler.config.get("use_dynamic_shifting", None):
                patch = pipe.transformer.config.patch_size
                mu = self._shift((latents.shape[2] // patch) * (latents.shape[3] // patch), module, max_shift=1.16)
            timesteps, sigmas = self._schedule(params.num_inference_steps, None, mu, module)
            condition = {"embeds": embeds[index:index + 1], "pooled": pooled[index:index + 1]}
            if guided[index]:
                condition.update(negative_embeds=negative_embeds[index:index + 1],
                                 negative_pooled=negative_pooled[index:index + 1])
            rows.append(RowState(item, latents, condition, timesteps, sigmas))
        return rows

    def step(self, rows):
        import torch

        guided = [index for index, row in enumerate(rows) if self.guided(row)]
        latents = torch.cat([row.latents for row in rows])
        timestep = self._current_timesteps(rows)
        # The unconditional twins of the guided rows first, then every row (the pipeline's order).
        def both(key: str, negative_key: str):
            return torch.cat([rows[index].condition[negative_key] for index in guided] + [row.condition[key] for row in rows])

        self._name_rows(rows, guided, negative_first=True)
        output = self.pipe.transformer(
            hidden_states=torch.cat([latents[guided], latents]),
            timestep=torch.cat([timestep[guided], timestep]),
            encoder_hidden_states=both("embeds", "negative_embeds"),
            pooled_projections=both("pooled", "negative_pooled"),
            joint_attention_kwargs=None,
            return_dict=False,
        )[0]
        unconditional, conditional = output[:len(guided)], output[len(guided):]
        velocity = []
        for index, row in enumerate(rows):
            prediction = conditional[index:index + 1]
            if self.guided(row):
                uncond = unconditional[guided.index(index)][None]
                prediction = uncond + row.guidance_scale * (prediction - uncond)
            velocity.append(prediction)
        self._advance(rows, self._euler(rows, latents, torch.cat(velocity)))

    def decode(self, rows):
        import torch

        return self._decode_shifted(torch.cat([row.latents for row in rows]))


def build(tiny: bool):
    """SD3.5 Large: 8B MMDiT (38 blocks, 38x64 heads, qk RMS-norm), CLIP-L + bigG + T5-XXL, 16-ch VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = byte_level_tokenizer(77), byte_level_tokenizer(77), byte_level_tokenizer(256)
    if tiny:
        text_encoder = clip_text(32, 2, 4, 64, tokenizer, projection=32, act="gelu")
        text_encoder_2 = clip_text(32, 2, 4, 64, tokenizer_2, projection=32, act="gelu")
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
            joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
            pos_embed_max_size=32, qk_norm="rms_norm",
        )
        vae = kl_vae((16, 32, 32, 32), 16, 1, 16, flux=True)
    else:
        text_encoder = clip_text(768, 12, 12, 3072, tokenizer, projection=768)
        text_encoder_2 = clip_text(1280, 32, 20, 5120, tokenizer_2, projection=1280, act="gelu")
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
            num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
            out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm",
        )
        vae = kl_vae((128, 256, 512, 512), 16, 2, 32, flux=True)
    vae.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=t5_encoder(tiny, tokenizer_3), tokenizer_3=tokenizer_3,
    )


FAMILY = Family(
    "stable-diffusion-3",
    pipelines=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
    cfg_above=1.0,
    steps=StableDiffusion3Steps,
    step_pipelines=("StableDiffusion3Pipeline",),
    schedulers=("FlowMatchEulerDiscreteScheduler",),
    speed={"compile": "full"},  # its transformer declares no repeated blocks (docs/benchmarks.md)
    architectures=(
        Architecture("sd35-large", lambda: build(tiny=False), guidance=3.5),
        Architecture("sd35-large-tiny", lambda: build(tiny=True), guidance=3.5, tiny=True),
    ),
    test_model="sd3_tiny",
)
