"""The common part of the step adapters: a pipeline taken apart into steps, so that rows can join
a running batch (continuous mode).

The dynamic-batching path calls a pipeline's ``__call__`` once per batch. Continuous batching
needs its stages apart: encode the prompts, draw each row's noise, make each row's schedule, run
one denoiser step for whatever rows are live (each at its own timestep), decode. Each family's
module has a ``StepModel`` that does this by calling the pipeline's own stage methods
(``encode_prompt``, ``prepare_latents``, the module's ``retrieve_timesteps`` and
``calculate_shift``, ``scheduler.step``) and following its ``__call__`` for the rest, so a row's
image equals the one ``pipe(...)`` makes for it alone, within floating-point tolerance
(``tests/test_families.py`` checks every family against its pipeline for every scheduler the
family declares).

Rows at different steps of different schedules share one denoiser call (per-row timesteps).
Flow-matching families step all rows at once with the Euler update of
``FlowMatchEulerDiscreteScheduler`` (its only state is the row's sigmas); a family whose schedulers
keep history (Stable Diffusion) gives every row its own scheduler instance.

Why not Modular Diffusers' blocks: their denoise loops (diffusers 0.42) walk one timestep list for
the whole batch, so rows at different steps cannot share a call, and Stable Diffusion 1.x/2.x has
no modular pipeline. The stage methods above are the same code the blocks call.

Nothing here imports torch at module level (the family records are read without it); the stage
methods run under ``torch.inference_mode``.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..requests import TEXT_TO_IMAGE, CallParams, GenerationItem
from .base import ContinuousUnsupported, Family


def _in_inference_mode(stage):
    @functools.wraps(stage)
    def wrapped(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return stage(*args, **kwargs)

    return wrapped


def _keeping_row_caches(step):
    """A step that, once its denoiser call named its rows (``StepModel._name_rows``), puts each row's
    step-cache residuals back with the row, and leaves no adapter rows behind."""
    @functools.wraps(step)
    def wrapped(self, rows):
        from .. import row_cache

        completed = False
        try:
            step(self, rows)
            completed = True
        finally:
            row_cache.suspend(self.denoiser, completed)
            library = getattr(self.denoiser, "_lora_library", None)
            if library is not None:
                library.done()

    return wrapped


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
    cache: dict = field(default_factory=dict)  # pass ("cond"/"uncond") -> its per-row step-cache residuals

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

    family: Family  # set by each family module

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for stage in ("prepare", "step", "decode"):  # called from Triton's thread and the batcher's
            if stage in cls.__dict__:
                wrapped = cls.__dict__[stage]
                setattr(cls, stage, _in_inference_mode(_keeping_row_caches(wrapped) if stage == "step" else wrapped))

    def __init__(self, pipe, device: str, max_sequence_length: int = 0):
        scheduler = type(pipe.scheduler).__name__
        if scheduler not in self.family.schedulers:
            raise ContinuousUnsupported(
                f"continuous batching of {type(pipe).__name__} reproduces the schedulers "
                f"{', '.join(self.family.schedulers)}; this model's is {scheduler}: use batching: dynamic, "
                "or a scheduler from that list")
        self.pipe = pipe
        self.device = device
        call = inspect.signature(pipe.__call__).parameters
        default = call["max_sequence_length"].default if "max_sequence_length" in call else 0
        self.max_sequence_length = max_sequence_length or default
        self._schedules: dict[tuple[int, Optional[float]], tuple[Any, Any]] = {}
        from .. import row_cache
        from ..acceleration import denoiser_of

        self.denoiser = denoiser_of(pipe)
        row_cache.name_rows(self.denoiser)  # a per-row step cache keeps residuals with each row, not by position

    def guided(self, row: RowState) -> bool:
        return self.family.guided(row.guidance_scale)

    # -- stages ----------------------------------------------------------------------------------
    def prepare(self, items: Sequence[GenerationItem]) -> list[RowState]:
        """Encode the prompts (one batched encoder call), draw each row's noise, make its schedule."""
        raise NotImplementedError

    def step(self, rows: Sequence[RowState]) -> None:
        """One denoising step for rows of one size, each at its own step of its own schedule."""
        raise NotImplementedError

    def decode(self, rows: Sequence[RowState]) -> list:
        """Finished rows of one size -> uint8 HxWx3 images."""
        raise NotImplementedError

    def warm_up(self, batch_sizes: Sequence[int], sizes: Sequence[tuple[int, int]],
                guidance_scales: Sequence[float]):
        """Run the running batch's own stages (prepare, two steps, decode) for every row count x size x
        guidance before READY, so that a compiled denoiser and VAE have their graphs (with
        ``compile_dynamic=auto`` the second row count makes the batch dimension dynamic) and serving
        compiles nothing. The settings' ``warmup_plan()`` gives the three lists."""
        from ..pipeline import run_warm_up

        plan = []
        for height, width in sizes:
            scales_and_rows = [(guidance_scale, rows) for guidance_scale in guidance_scales for rows in batch_sizes]
            if batch_sizes and 0.0 not in guidance_scales:
                # A guided row is two denoiser rows, so guided warm-up calls never run a denoiser batch
                # of 1; an unguided request alone does (other mixes are covered by the dynamic graph).
                scales_and_rows.append((0.0, 1))
            plan += [(CallParams(TEXT_TO_IMAGE, height, width, 2, scale), rows) for scale, rows in scales_and_rows]
        return run_warm_up(plan, self.run_to_end, self.family.text_length_varies)

    def run_to_end(self, items: list[GenerationItem]) -> list:
        """All stages for ``items`` together (warm-up, and the tests' reference against the pipeline)."""
        rows = self.prepare(items)
        while not rows[0].finished:
            self.step(rows)
        return self.decode(rows)

    def unsupported(self, item: GenerationItem) -> Optional[str]:
        if item.task != TEXT_TO_IMAGE:
            return ("continuous batching serves text-to-image only; send image-to-image requests to a model with "
                    "dynamic batching")
        return None

    # -- shared helpers ----------------------------------------------------------------------------
    def _name_rows(self, rows: Sequence[RowState], guided: Sequence[int] = (), negative_first: bool = False) -> None:
        """The next denoiser call's rows, for a per-row step cache (``row_cache.resume``) and per-row LoRA
        adapters (``lora.AdapterLibrary.use``): each row's conditional pass, and the unconditional twins
        of the ``guided`` rows after them (or before them)."""
        from .. import row_cache

        passes = [(row, "cond") for row in rows]
        twins = [(rows[index], "uncond") for index in guided]
        order = twins + passes if negative_first else passes + twins
        row_cache.resume(self.denoiser, [row.cache.setdefault(name, {}) for row, name in order],
                         [row.item.step_cache for row, _ in order])
        library = getattr(self.denoiser, "_lora_library", None)
        if library is not None:
            library.use([row.item for row, _ in order])

    def _noise(self, item: GenerationItem, shape_args: tuple, dtype):
        """The row's initial latents from its own CPU generator, as ``pipe(generator=[...])`` draws them."""
        import torch

        generator = torch.Generator("cpu").manual_seed(item.seed)
        return self.pipe.prepare_latents(1, *shape_args, dtype, self.device, [generator])

    def _to_uint8(self, image, **postprocess) -> list:
        from ..pipeline import to_uint8

        return list(to_uint8(self.pipe.image_processor.postprocess(image, output_type="pt", **postprocess)))

    @staticmethod
    def _current_timesteps(rows: Sequence[RowState]):
        import torch

        return torch.stack([row.timesteps[row.step] for row in rows])


class FlowMatchSteps(StepModel):
    """The flow-matching families' common part: a schedule from the pipeline's own
    ``retrieve_timesteps`` (and ``calculate_shift``), the deterministic Euler update of
    ``FlowMatchEulerDiscreteScheduler.step`` for rows at different steps, and the usual VAE tail."""

    def __init__(self, pipe, device: str, max_sequence_length: int = 0):
        super().__init__(pipe, device, max_sequence_length)
        if pipe.scheduler.config.get("stochastic_sampling", False):
            raise ContinuousUnsupported(
                "continuous batching reproduces FlowMatchEulerDiscreteScheduler's deterministic step; this model's "
                "scheduler has stochastic_sampling=True: use batching: dynamic")

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

    def _decode_shifted(self, latents) -> list:
        """The common end of a flow-matching ``__call__``: undo the VAE's scaling and shift, decode,
        postprocess to [0, 1], then uint8."""
        vae = self.pipe.vae
        image = vae.decode((latents / vae.config.scaling_factor) + vae.config.shift_factor, return_dict=False)[0]
        return self._to_uint8(image)

    @staticmethod
    def _euler(rows: Sequence[RowState], sample, velocity):
        """``FlowMatchEulerDiscreteScheduler.step`` for rows at different steps: the same float32
        upcast of the sample, ``dt`` in the velocity's dtype as the scheduler's 0-dim ``dt`` is."""
        import torch

        sigma = torch.stack([row.sigmas[row.step] for row in rows])
        sigma_next = torch.stack([row.sigmas[row.step + 1] for row in rows])
        dt = (sigma_next - sigma).to(velocity.dtype).view(-1, *([1] * (velocity.dim() - 1)))
        return (sample.to(torch.float32) + dt * velocity).to(velocity.dtype)

    @staticmethod
    def _advance(rows: Sequence[RowState], latents) -> None:
        for row, row_latents in zip(rows, latents.split(1)):
            row.latents = row_latents
            row.step += 1
