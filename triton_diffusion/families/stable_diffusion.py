"""Stable Diffusion 1.x and 2.x (SD-1.5, SD 2.1, SD-Turbo, the tiny test models): UNet, one CLIP
text encoder, KL VAE; classifier-free guidance above 1; any of diffusers' classic schedulers."""

from __future__ import annotations

import copy
import inspect

from .base import Architecture, ContinuousUnsupported, Family, ShrinkSpec
from .stepping import RowState, StepModel
from .weights import byte_level_tokenizer, clip_text, kl_vae


class StableDiffusionSteps(StepModel):
    """``StableDiffusionPipeline.__call__`` (SD-1.5, SD 2.x, SD-Turbo). Its schedulers (PNDM, DDIM,
    DPM-Solver, Euler ancestral...) may keep history between steps and draw noise, so every row gets
    its own copy of the pipeline's scheduler and its own generator: the UNet call is batched, each
    row's scheduler step is the pipeline's own ``scheduler.step`` on that row alone."""

    def __init__(self, pipe, device: str, max_sequence_length: int = 0):
        super().__init__(pipe, device, max_sequence_length)
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise ContinuousUnsupported("UNets with a guidance embedding (LCM) have no step model")
        accepted = set(inspect.signature(pipe.scheduler.step).parameters)
        self.step_takes = {"eta": "eta" in accepted, "generator": "generator" in accepted}

    def prepare(self, items):
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipe
        guided = [self.family.guided(item.params.guidance_scale) for item in items]
        embeds, negative_embeds = pipe.encode_prompt(
            [item.prompt for item in items], self.device, 1, any(guided),
            [item.negative_prompt or "" for item in items] if any(guided) else None)
        rows = []
        for index, item in enumerate(items):
            params = item.params
            scheduler = copy.deepcopy(pipe.scheduler)
            scheduler.set_timesteps(params.num_inference_steps, device=self.device)
            generator = torch.Generator("cpu").manual_seed(item.seed)
            shape = (1, pipe.unet.config.in_channels, params.height // pipe.vae_scale_factor,
                     params.width // pipe.vae_scale_factor)
            latents = randn_tensor(shape, generator=[generator], device=self.device, dtype=embeds.dtype)
            latents = latents * scheduler.init_noise_sigma
            condition = {"embeds": embeds[index:index + 1],
                         "negative_embeds": negative_embeds[index:index + 1] if guided[index] else None}
            rows.append(RowState(item, latents, condition, scheduler.timesteps, None, scheduler=scheduler,
                                 generator=generator))
        return rows

    def step(self, rows):
        import torch

        guided = [index for index, row in enumerate(rows) if self.guided(row)]
        timesteps = [row.timesteps[row.step] for row in rows]
        scaled = [row.scheduler.scale_model_input(row.latents, t) for row, t in zip(rows, timesteps)]
        # The unconditional twins of the guided rows first, then every row (the pipeline's order).
        self._name_rows(rows, guided, negative_first=True)
        noise = self.pipe.unet(
            torch.cat([scaled[index] for index in guided] + scaled),
            torch.stack([timesteps[index] for index in guided] + timesteps),
            encoder_hidden_states=torch.cat([rows[index].condition["negative_embeds"] for index in guided]
                                            + [row.condition["embeds"] for row in rows]),
            timestep_cond=None, cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=False,
        )[0]
        unconditional, conditional = noise[:len(guided)], noise[len(guided):]
        for index, (row, t) in enumerate(zip(rows, timesteps)):
            prediction = conditional[index:index + 1]
            if self.guided(row):
                uncond = unconditional[guided.index(index)][None]
                prediction = uncond + row.guidance_scale * (prediction - uncond)
            extra = {}
            if self.step_takes["eta"]:
                extra["eta"] = 0.0
            if self.step_takes["generator"]:
                extra["generator"] = [row.generator]
            row.latents = row.scheduler.step(prediction, t, row.latents, **extra, return_dict=False)[0]
            row.step += 1

    def decode(self, rows):
        import torch

        pipe = self.pipe
        latents = torch.cat([row.latents for row in rows])
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        image, flagged = pipe.run_safety_checker(image, self.device, latents.dtype)
        denormalize = [True] * image.shape[0] if flagged is None else [not nsfw for nsfw in flagged]
        return self._to_uint8(image, do_denormalize=denormalize)


def build(tiny: bool):
    """SD-1.5: UNet 860M (320/640/1280/1280, cross-attn 768), CLIP ViT-L/14 text encoder, KL VAE."""
    from diffusers import PNDMScheduler, UNet2DConditionModel

    tokenizer = byte_level_tokenizer(77)
    if tiny:
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        )
        text_encoder = clip_text(32, 2, 4, 64, tokenizer)
        vae = kl_vae((16, 32, 32, 32), 4, 1, 16)
    else:
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8,
        )
        text_encoder = clip_text(768, 12, 12, 3072, tokenizer)
        vae = kl_vae((128, 256, 512, 512), 4, 2, 32)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    return assemble(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def assemble(**components):
    """A Stable Diffusion pipeline of these components, without a safety checker (the random
    architectures' and the tiny trained model's)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


_SHRINK = ShrinkSpec(("latents", "prompt_embeds"))
FAMILY = Family(
    "stable-diffusion",
    pipelines=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    cfg_above=1.0,
    shrink={"StableDiffusionPipeline": _SHRINK, "StableDiffusionImg2ImgPipeline": _SHRINK},
    steps=StableDiffusionSteps,
    step_pipelines=("StableDiffusionPipeline",),
    # each row steps with its own copy of the pipeline's scheduler, so any scheduler whose state
    # lives in its instance works; these are the ones the equality test covers
    schedulers=("PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"),
    speed={"compile": "full", "compile_vae": "true", "channels_last": "true", "fuse_qkv": "true"},
    architectures=(
        Architecture("sd15", lambda: build(tiny=False), dtype="float16", guidance=7.5),
        Architecture("sd15-tiny", lambda: build(tiny=True), dtype="float16", guidance=7.5, tiny=True),
    ),
    test_model="stable_diffusion_tiny",
)
