"""A diffusers pipeline taken apart into steps, so that rows can join a running batch (continuous mode).

The dynamic-batching path calls a pipeline's ``__call__`` once per batch. Continuous batching
needs its stages apart: encode the prompts, draw each row's noise, make each row's sigma schedule,
run one denoiser step for whatever rows are live (each at its own timestep), decode. A
``StepModel`` does that for one family by following that family's ``__call__`` line by line: the
same encoder calls, the noise from the row's own generator, the same schedule, the same scheduler
arithmetic. So a row's image equals the one ``pipe(...)`` makes for it alone, within floating
point tolerance (``tests/test_continuous.py`` checks it against the dynamic-batching model).

Rows at different steps of different schedules share one denoiser call (per-row timesteps). The
flow-matching families (FLUX.1, SD3.5, Qwen-Image, Z-Image) step all rows at once: their Euler step
keeps no state beyond the row's sigmas. Stable Diffusion's schedulers may keep history, so each of
its rows carries its own scheduler instance and steps with it.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from .pipeline import WarmupReport, run_warm_up, to_uint8
from .requests import TEXT_TO_IMAGE, CallParams, GenerationItem


class ContinuousUnsupported(ValueError):
    """The pipeline has no step model (continuous batching needs one per family)."""


@dataclass(eq=False)
class RowState:
    """One image being denoised: where it is, and everything its next step needs."""

    item: GenerationItem
    latents: Any  # torch.Tensor, batch dim 1, in the family's latent layout
    condition: dict[str, Any]  # per-family text conditioning (batch dim 1)
    timesteps: Any  # torch.Tensor [steps]
    sigmas: Any  # torch.Tensor [steps + 1] (None where the row has its own scheduler)
    step: int = 0
    scheduler: Any = None  # the row's own scheduler instance, for schedulers with per-row history
    generator: Any = None  # the row's generator, where the scheduler draws noise at each step

    @property
    def size(self) -> tuple[int, int]:
        return self.item.params.height, self.item.params.width

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def finished(self) -> bool:
        return self.step >= self.steps

    @property
    def guidance_scale(self) -> float:
        return self.item.params.guidance_scale


class StepModel:
    """One family's pipeline, stage by stage. Subclasses follow their pipeline's ``__call__``."""

    pipeline_prefix = ""  # the diffusers class-name prefix this model takes apart

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for stage in ("prepare", "step", "decode"):  # called from Triton's thread and the batcher's
            if stage in cls.__dict__:
                setattr(cls, stage, torch.inference_mode()(cls.__dict__[stage]))

    def __init__(self, pipe, device: str, max_sequence_length: int = 0):
        self.pipe = pipe
        self.device = device
        call = inspect.signature(pipe.__call__).parameters
        default = call["max_sequence_length"].default if "max_sequence_length" in call else 0
        self.max_sequence_length = max_sequence_length or default
        self._schedules: dict[tuple[int, Optional[float]], tuple[Any, Any]] = {}

    # -- stages ----------------------------------------------------------------------------------
    def prepare(self, items: Sequence[GenerationItem]) -> list[RowState]:
        """Encode the prompts (one batched encoder call), draw each row's noise, make its schedule."""
        raise NotImplementedError

    def step(self, rows: Sequence[RowState]) -> None:
        """One denoising step for rows of one size, each at its own step of its own schedule."""
        raise NotImplementedError

    def decode(self, rows: Sequence[RowState]) -> list[np.ndarray]:
        """Finished rows of one size -> uint8 HxWx3 images."""
        raise NotImplementedError

    def warm_up(self, batch_sizes: Sequence[int], sizes: Sequence[tuple[int, int]],
                guidance_scales: Sequence[float]) -> WarmupReport:
        """Run the running batch's own stages (prepare, two steps, decode) for every row count x size x
        guidance before READY, so that a compiled denoiser and VAE have their graphs (with
        ``compile_dynamic=auto`` the second row count makes the batch dimension dynamic) and serving
        compiles nothing. The settings' ``warmup_plan()`` gives the three lists."""
        plan = []
        for height, width in sizes:
            scales_and_rows = [(guidance_scale, rows) for guidance_scale in guidance_scales for rows in batch_sizes]
            if batch_sizes and 0.0 not in guidance_scales:
                # A guided row is two denoiser rows, so guided warm-up calls never run a denoiser batch
                # of 1; an unguided request alone does (other mixes are covered by the dynamic graph).
                scales_and_rows.append((0.0, 1))
            plan += [(CallParams(TEXT_TO_IMAGE, height, width, 2, scale), rows) for scale, rows in scales_and_rows]
        return run_warm_up(plan, self._run_to_end)

    def _run_to_end(self, items: list[GenerationItem]) -> None:
        rows = self.prepare(items)
        while not rows[0].finished:
            self.step(rows)
        self.decode(rows)

    def unsupported(self, item: GenerationItem) -> Optional[str]:
        if item.task != TEXT_TO_IMAGE:
            return ("continuous batching serves text-to-image only; send image-to-image requests to a model with "
                    "dynamic batching")
        return None

    # -- shared helpers ----------------------------------------------------------------------------
    def _noise(self, item: GenerationItem, shape_args: tuple, dtype):
        """The row's initial latents from its own CPU generator, as ``pipe(generator=[...])`` draws them."""
        generator = torch.Generator("cpu").manual_seed(item.seed)
        return self.pipe.prepare_latents(1, *shape_args, dtype, self.device, [generator])

    def _schedule(self, steps: int, sigmas, mu: Optional[float], module) -> tuple[Any, Any]:
        """(timesteps, sigmas) of the pipeline's scheduler for this many steps and shift ``mu``
        (``module.retrieve_timesteps``, the pipeline's own), made on a copy so that the pipeline's
        scheduler is untouched and rows share nothing."""
        key = (steps, mu)
        if key not in self._schedules:
            scheduler = copy.deepcopy(self.pipe.scheduler)
            extra = {} if mu is None else {"mu": mu}
            timesteps, _ = module.retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas, **extra)
            self._schedules[key] = (timesteps, scheduler.sigmas.to(self.device))
        return self._schedules[key]

    def _shift(self, image_seq_len: int, module, max_shift: float = 1.15) -> float:
        """``calculate_shift`` with the scheduler's config, as the pipelines call it."""
        config = self.pipe.scheduler.config
        return module.calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                                      config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                      config.get("max_shift", max_shift))

    def _decode_shifted(self, latents) -> list[np.ndarray]:
        """The common end of a flow-matching ``__call__``: undo the VAE's scaling and shift, decode,
        postprocess to [0, 1], then uint8."""
        vae = self.pipe.vae
        image = vae.decode((latents / vae.config.scaling_factor) + vae.config.shift_factor, return_dict=False)[0]
        return list(to_uint8(self.pipe.image_processor.postprocess(image, output_type="pt")))

    @staticmethod
    def _current_timesteps(rows: Sequence[RowState]):
        return torch.stack([row.timesteps[row.step] for row in rows])

    @staticmethod
    def _euler(rows: Sequence[RowState], sample, velocity):
        """``FlowMatchEulerDiscreteScheduler.step`` for rows at different steps: the same float32
        upcast of the sample, ``dt`` in the velocity's dtype as the scheduler's 0-dim ``dt`` is."""
        sigma = torch.stack([row.sigmas[row.step] for row in rows])
        sigma_next = torch.stack([row.sigmas[row.step + 1] for row in rows])
        dt = (sigma_next - sigma).to(velocity.dtype).view(-1, *([1] * (velocity.dim() - 1)))
        return (sample.to(torch.float32) + dt * velocity).to(velocity.dtype)

    @staticmethod
    def _advance(rows: Sequence[RowState], latents) -> None:
        for row, row_latents in zip(rows, latents.split(1)):
            row.latents = row_latents
            row.step += 1


class FluxSteps(StepModel):
    """``FluxPipeline.__call__`` (guidance-distilled: the guidance is an embedding, per row)."""

    pipeline_prefix = "Flux"

    def prepare(self, items):
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
        pipe = self.pipe
        latents = torch.cat([row.latents for row in rows])
        timestep = self._current_timesteps(rows).to(latents.dtype)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.tensor([row.guidance_scale for row in rows], device=latents.device, dtype=torch.float32)
        first = rows[0].condition
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
        pipe = self.pipe
        height, width = rows[0].size
        return self._decode_shifted(
            pipe._unpack_latents(torch.cat([row.latents for row in rows]), height, width, pipe.vae_scale_factor))


class ZImageSteps(StepModel):
    """``ZImagePipeline.__call__``: classifier-free guidance per row (GUIDANCE_SCALE > 0), variable
    length captions as lists, float32 latents."""

    pipeline_prefix = "ZImage"

    def prepare(self, items):
        from diffusers.pipelines.z_image import pipeline_z_image

        pipe = self.pipe
        guided = [item.params.guidance_scale > 0 for item in items]
        # encode_prompt rewrites the list it is given (chat template): hand it fresh lists
        embeds, negative_embeds = pipe.encode_prompt(
            prompt=[item.prompt for item in items],
            negative_prompt=[item.negative_prompt or "" for item in items] if any(guided) else None,
            do_classifier_free_guidance=any(guided), device=self.device,
            max_sequence_length=self.max_sequence_length)
        rows = []
        for index, item in enumerate(items):
            params = item.params
            latents = self._noise(item, (pipe.transformer.in_channels, params.height, params.width), torch.float32)
            image_seq_len = (latents.shape[2] // 2) * (latents.shape[3] // 2)
            sigmas = pipeline_z_image.get_default_z_image_sigmas(params.num_inference_steps)
            mu = self._shift(image_seq_len, pipeline_z_image)
            timesteps, all_sigmas = self._schedule(params.num_inference_steps, sigmas, mu, pipeline_z_image)
            condition = {"embeds": embeds[index], "negative_embeds": negative_embeds[index] if guided[index] else None}
            rows.append(RowState(item, latents, condition, timesteps, all_sigmas))
        return rows

    def step(self, rows):
        transformer = self.pipe.transformer
        latents = torch.cat([row.latents for row in rows])
        timestep = (1000 - self._current_timesteps(rows)) / 1000
        guided = [index for index, row in enumerate(rows) if row.guidance_scale > 0]
        # Conditional rows first, then the unconditional twins of the guided rows (the pipeline's order).
        typed = latents.to(transformer.dtype).unsqueeze(2)
        inputs = list(typed.unbind(dim=0)) + [typed[index] for index in guided]
        captions = [row.condition["embeds"] for row in rows] + [rows[index].condition["negative_embeds"] for index in guided]
        outputs = transformer(inputs, torch.cat([timestep, timestep[guided]]), captions, joint_attention_kwargs=None,
                              return_dict=False)[0]
        predictions = []
        for index, row in enumerate(rows):
            positive = outputs[index].float()
            if row.guidance_scale > 0:
                negative = outputs[len(rows) + guided.index(index)].float()
                positive = positive + row.guidance_scale * (positive - negative)
            predictions.append(positive)
        velocity = -torch.stack(predictions, dim=0).squeeze(2)
        self._advance(rows, self._euler(rows, latents, velocity.to(torch.float32)))

    def decode(self, rows):
        return self._decode_shifted(torch.cat([row.latents for row in rows]).to(self.pipe.vae.dtype))


class StableDiffusion3Steps(StepModel):
    """``StableDiffusion3Pipeline.__call__``: classifier-free guidance per row (GUIDANCE_SCALE > 1),
    in the model's dtype; no skip-layer guidance (the pipeline's default)."""

    pipeline_prefix = "StableDiffusion3"

    def prepare(self, items):
        from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3 as module

        pipe = self.pipe
        guided = [item.params.guidance_scale > 1 for item in items]
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
        guided = [index for index, row in enumerate(rows) if row.guidance_scale > 1]
        latents = torch.cat([row.latents for row in rows])
        timestep = self._current_timesteps(rows)
        # The unconditional twins of the guided rows first, then every row (the pipeline's order).
        def both(key: str, negative_key: str):
            return torch.cat([rows[index].condition[negative_key] for index in guided] + [row.condition[key] for row in rows])

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
            if row.guidance_scale > 1:
                uncond = unconditional[guided.index(index)][None]
                prediction = uncond + row.guidance_scale * (prediction - uncond)
            velocity.append(prediction)
        self._advance(rows, self._euler(rows, latents, torch.cat(velocity)))

    def decode(self, rows):
        return self._decode_shifted(torch.cat([row.latents for row in rows]))


class QwenImageSteps(StepModel):
    """``QwenImagePipeline.__call__``: true CFG per row (GUIDANCE_SCALE > 1, with the family's
    negative prompt when a request sends none) and its norm rescale; captions of different
    lengths padded to the longest in the call, with the attention mask the pipeline builds."""

    pipeline_prefix = "QwenImage"

    def __init__(self, pipe, device: str, max_sequence_length: int = 0):
        super().__init__(pipe, device, max_sequence_length)
        from .families import family_of

        if pipe.transformer.config.guidance_embeds:
            raise ContinuousUnsupported("guidance-distilled Qwen-Image checkpoints (guidance_embeds) have no step model")
        self.cfg_negative_prompt = family_of(pipe).cfg_negative_prompt or " "

    def _captions(self, prompts: list[str]) -> list:
        """One unpadded [1, tokens, D] caption per prompt."""
        embeds, mask = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                               max_sequence_length=self.max_sequence_length)
        lengths = [embeds.shape[1]] * len(prompts) if mask is None else mask.sum(dim=1).tolist()
        return [embeds[index:index + 1, :length] for index, length in enumerate(lengths)]

    def prepare(self, items):
        from diffusers.pipelines.qwenimage import pipeline_qwenimage as module

        pipe = self.pipe
        guided = [index for index, item in enumerate(items) if item.params.guidance_scale > 1]
        captions = self._captions([item.prompt for item in items])
        negatives = self._captions([items[index].negative_prompt or self.cfg_negative_prompt for index in guided]) if guided else []
        channels = pipe.transformer.config.in_channels // 4
        rows = []
        for index, item in enumerate(items):
            params = item.params
            latents = self._noise(item, (channels, params.height, params.width), captions[index].dtype)
            sigmas = np.linspace(1.0, 1 / params.num_inference_steps, params.num_inference_steps)
            timesteps, all_sigmas = self._schedule(params.num_inference_steps, sigmas,
                                                   self._shift(latents.shape[1], module), module)
            condition = {"caption": captions[index],
                         "negative_caption": negatives[guided.index(index)] if index in guided else None}
            rows.append(RowState(item, latents, condition, timesteps, all_sigmas))
        return rows

    @staticmethod
    def _padded(captions: list):
        """Captions padded to the longest, and their mask (None when none is padded, as the pipeline)."""
        longest = max(caption.shape[1] for caption in captions)
        embeds = torch.cat([torch.nn.functional.pad(caption, (0, 0, 0, longest - caption.shape[1])) for caption in captions])
        mask = torch.stack([torch.arange(longest, device=embeds.device) < caption.shape[1] for caption in captions]).long()
        return embeds, None if bool(mask.all()) else mask

    def step(self, rows):
        pipe = self.pipe
        guided = [index for index, row in enumerate(rows) if row.guidance_scale > 1]
        latents = torch.cat([row.latents for row in rows])
        timestep = self._current_timesteps(rows).to(latents.dtype)
        height, width = rows[0].size
        scale = pipe.vae_scale_factor * 2
        captions = [row.condition["caption"] for row in rows] + [rows[index].condition["negative_caption"] for index in guided]
        embeds, mask = self._padded(captions)
        count = len(rows) + len(guided)
        output = pipe.transformer(
            hidden_states=torch.cat([latents, latents[guided]]),
            timestep=torch.cat([timestep, timestep[guided]]) / 1000,
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds,
            img_shapes=[[(1, height // scale, width // scale)]] * count,
            attention_kwargs={},
            return_dict=False,
        )[0]
        velocity = []
        for index, row in enumerate(rows):
            prediction = output[index:index + 1]
            if row.guidance_scale > 1:
                negative = output[len(rows) + guided.index(index)][None]
                combined = negative + row.guidance_scale * (prediction - negative)
                prediction = combined * (torch.norm(prediction, dim=-1, keepdim=True)
                                         / torch.norm(combined, dim=-1, keepdim=True))
            velocity.append(prediction)
        self._advance(rows, self._euler(rows, latents, torch.cat(velocity)))

    def decode(self, rows):
        pipe = self.pipe
        height, width = rows[0].size
        latents = pipe._unpack_latents(torch.cat([row.latents for row in rows]), height, width, pipe.vae_scale_factor)
        latents = latents.to(pipe.vae.dtype)
        config = pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        image = pipe.vae.decode(latents / inverse_std + mean, return_dict=False)[0][:, :, 0]
        return list(to_uint8(pipe.image_processor.postprocess(image, output_type="pt")))


class StableDiffusionSteps(StepModel):
    """``StableDiffusionPipeline.__call__`` (SD-1.5, SD 2.x, SD-Turbo). Its schedulers (PNDM, DDIM,
    DPM-Solver, Euler ancestral...) may keep history between steps and draw noise, so every row gets
    its own copy of the pipeline's scheduler and its own generator: the UNet call is batched, each
    row's scheduler step is the pipeline's own ``scheduler.step`` on that row alone."""

    pipeline_prefix = "StableDiffusionPipeline"

    def __init__(self, pipe, device: str, max_sequence_length: int = 0):
        super().__init__(pipe, device, max_sequence_length)
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise ContinuousUnsupported("UNets with a guidance embedding (LCM) have no step model")
        accepted = set(inspect.signature(pipe.scheduler.step).parameters)
        self.step_takes = {"eta": "eta" in accepted, "generator": "generator" in accepted}

    def prepare(self, items):
        pipe = self.pipe
        guided = [item.params.guidance_scale > 1 for item in items]
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
        guided = [index for index, row in enumerate(rows) if row.guidance_scale > 1]
        timesteps = [row.timesteps[row.step] for row in rows]
        scaled = [row.scheduler.scale_model_input(row.latents, t) for row, t in zip(rows, timesteps)]
        # The unconditional twins of the guided rows first, then every row (the pipeline's order).
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
            if row.guidance_scale > 1:
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
        pipe = self.pipe
        latents = torch.cat([row.latents for row in rows])
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        image, flagged = pipe.run_safety_checker(image, self.device, latents.dtype)
        denormalize = [True] * image.shape[0] if flagged is None else [not nsfw for nsfw in flagged]
        return list(to_uint8(pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=denormalize)))


STEP_MODELS: tuple[type[StepModel], ...] = (FluxSteps, ZImageSteps, StableDiffusion3Steps, QwenImageSteps,
                                            StableDiffusionSteps)


def step_model_for(pipe, device: str, max_sequence_length: int = 0) -> StepModel:
    name = type(pipe).__name__
    for model in STEP_MODELS:
        if name.startswith(model.pipeline_prefix) and "Img2Img" not in name:
            return model(pipe, device, max_sequence_length)
    families = ", ".join(f"{model.pipeline_prefix}*" for model in STEP_MODELS)
    raise ContinuousUnsupported(f"continuous batching has no step model for {name} (it has: {families}); "
                                "use batching: dynamic for this model")
