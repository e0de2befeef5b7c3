"""A diffusers pipeline taken apart into steps, so that rows can join a running batch (continuous mode).

The dynamic-batching path calls a pipeline's ``__call__`` once per batch. Continuous batching
needs its stages apart: encode the prompts, draw each row's noise, make each row's sigma schedule,
run one denoiser step for whatever rows are live (each at its own timestep), decode. A
``StepModel`` does that for one family by following that family's ``__call__`` line by line: the
same encoder calls, the noise from the row's own generator, the same schedule, the same scheduler
arithmetic. So a row's image equals the one ``pipe(...)`` makes for it alone, within floating
point tolerance (``tests/test_continuous.py`` checks it against the dynamic-batching model).

Flow-matching families only: their Euler step keeps no state beyond the row's sigmas, so rows at
different steps of different schedules can share one denoiser call (per-row timesteps).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .requests import TEXT_TO_IMAGE, GenerationItem


@dataclass(eq=False)
class RowState:
    """One image being denoised: where it is, and everything its next step needs."""

    item: GenerationItem
    latents: Any  # torch.Tensor, batch dim 1, in the family's latent layout
    condition: dict[str, Any]  # per-family text conditioning (batch dim 1)
    timesteps: Any  # torch.Tensor [steps]
    sigmas: Any  # torch.Tensor [steps + 1]
    step: int = 0

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


def to_uint8(images) -> list[np.ndarray]:
    """[B, C, H, W] in [0, 1] -> uint8 HxWx3 arrays, rounded where the images are (the same rounding
    as ``PipelineRunner.run``)."""

    return list(images.float().mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


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
        self._schedules: dict[tuple[int, int], tuple[Any, Any]] = {}

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

    def _schedule(self, steps: int, image_seq_len: int, sigmas, module) -> tuple[Any, Any]:
        """(timesteps, sigmas) of the pipeline's scheduler for this many steps at this image size;
        made on a copy, so the pipeline's own scheduler is untouched (rows share nothing)."""
        key = (steps, image_seq_len)
        if key not in self._schedules:
            config = self.pipe.scheduler.config
            mu = module.calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                                        config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                        config.get("max_shift", 1.15))
            scheduler = copy.deepcopy(self.pipe.scheduler)
            timesteps, _ = module.retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas, mu=mu)
            self._schedules[key] = (timesteps, scheduler.sigmas.to(self.device))
        return self._schedules[key]

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
            timesteps, all_sigmas = self._schedule(params.num_inference_steps, latents.shape[1], sigmas, pipeline_flux)
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
        latents = pipe._unpack_latents(torch.cat([row.latents for row in rows]), height, width, pipe.vae_scale_factor)
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        return to_uint8(pipe.image_processor.postprocess(image, output_type="pt"))


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
            timesteps, all_sigmas = self._schedule(params.num_inference_steps, image_seq_len, sigmas, pipeline_z_image)
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
        pipe = self.pipe
        latents = torch.cat([row.latents for row in rows]).to(pipe.vae.dtype)
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        return to_uint8(pipe.image_processor.postprocess(image, output_type="pt"))


STEP_MODELS: tuple[type[StepModel], ...] = (FluxSteps, ZImageSteps)


class ContinuousUnsupported(ValueError):
    """The pipeline has no step model (continuous batching needs one per family)."""


def step_model_for(pipe, device: str, max_sequence_length: int = 0) -> StepModel:
    name = type(pipe).__name__
    for model in STEP_MODELS:
        if name.startswith(model.pipeline_prefix) and "Img2Img" not in name:
            return model(pipe, device, max_sequence_length)
    families = ", ".join(f"{model.pipeline_prefix}*" for model in STEP_MODELS)
    raise ContinuousUnsupported(f"continuous batching has no step model for {name} (it has: {families}); "
                                "use batching: dynamic for this model")
