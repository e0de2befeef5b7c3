"""What a family declares, and the records it declares it with.

A ``Family`` is everything the server needs to know about one diffusers family that a pipeline's
signature cannot tell: which pipeline classes it covers, when classifier-free guidance runs, the
negative prompt's rules, image or video, how a cancelled row leaves a running call, its step
adapter for continuous batching (and the schedulers that adapter reproduces), the speed knobs
measured fastest for it, and its random-weight architectures. Nothing here imports torch: the
records are read by the settings, the benchmarks and the tests as well as by the backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from ..paired_cfg import CfgPairing

IMAGE_OUTPUT, VIDEO_OUTPUT = "IMAGE", "VIDEO"


class ContinuousUnsupported(ValueError):
    """The pipeline (or its scheduler) has no step adapter: continuous batching cannot serve it."""


@dataclass(frozen=True)
class ShrinkSpec:
    """Where a pipeline keeps per-row state during its denoising loop (``cancellation.py`` drops a
    cancelled row's slice of each)."""

    callback_inputs: tuple[str, ...]  # handed to callback_on_step_end and taken back
    denoiser: str = ""  # component whose forward gets the arguments below
    denoiser_arguments: tuple[str, ...] = ()  # batch-sized, built before the loop, out of the callback's reach


@dataclass(frozen=True)
class Architecture:
    """A random-weight build of a real architecture (``pretrained_model: "random:<name>"``): the real
    classes and shapes, so timings and memory are the real model's, no weights to download. The
    benchmarks serve it at ``dtype``, ``guidance`` and ``steps`` (the model's published defaults)."""

    name: str
    build: Callable[[], object]  # called inside the device/dtype context of build_random_pipeline
    dtype: str = "bfloat16"
    guidance: float = 3.5
    steps: int = 20
    tiny: bool = False  # a CPU-sized variant of the same classes, for tests


@dataclass(frozen=True)
class Family:
    name: str
    # diffusers pipeline class names this family serves (text-to-image and image-to-image alike)
    pipelines: tuple[str, ...] = ()
    # The pipeline argument that GUIDANCE_SCALE sets: classifier-free guidance in most families;
    # Qwen-Image's ``guidance_scale`` only feeds guidance-distilled checkpoints, its CFG is ``true_cfg_scale``.
    guidance_argument: str = "guidance_scale"
    # Classifier-free guidance runs when GUIDANCE_SCALE is above this, as the pipeline's own
    # ``do_classifier_free_guidance`` decides; None: never (guidance-distilled: the scale is an embedding).
    cfg_above: Optional[float] = 1.0
    # Where true CFG runs only when a negative prompt is given, this one is sent when the request has
    # none (the family's published default), so GUIDANCE_SCALE above ``cfg_above`` always means CFG.
    cfg_negative_prompt: Optional[str] = None
    # Why NEGATIVE_PROMPT is refused, where the call signature takes one that would have no effect.
    negative_prompt_refusal: Optional[str] = None
    output: str = IMAGE_OUTPUT  # IMAGE: output.images [B, C, H, W]; VIDEO: output.frames [B, F, C, H, W]
    # Where the pipeline runs classifier-free guidance as two denoiser calls per step: what differs
    # between them, so that they run as one call of twice the rows (paired_cfg.py).
    cfg_pairing: Optional[CfgPairing] = None
    # How a cancelled row leaves a running pipeline call, per pipeline class (absent: it rides to the end).
    shrink: Mapping[str, ShrinkSpec] = field(default_factory=dict)
    # The continuous-batching step adapter (a ``stepping.StepModel``) and the pipeline classes it takes apart.
    steps: Optional[type] = None
    step_pipelines: tuple[str, ...] = ()
    # Scheduler class names the step adapter reproduces exactly (tests/test_families.py checks each one).
    schedulers: tuple[str, ...] = ()
    # Speed knobs that measured fastest for this family (benchmarks' ``--speed compiled``; docs/benchmarks.md).
    speed: Mapping[str, str] = field(default_factory=dict)
    # Name patterns of denoiser layers that stay unquantized under ``quantization`` (measured to
    # overflow or to lose too much; quantization.py, docs/benchmarks.md).
    fp8_skip: tuple[str, ...] = ()
    # (The transformer block's hidden-states argument, its token-mask argument), where diffusers'
    # block registry (which cache hooks read) has them wrong or the rows of a batch are padded to one
    # length: the per-row step cache (row_cache.py) reads these instead.
    cache_block_arguments: tuple[str, ...] = ()
    # Whether ``parallel: "ulysses=N"`` serves it: diffusers' context parallelism splits its denoiser's
    # sequences over N devices (its transformer has a ``_cp_plan``) and every call's sequences split
    # evenly (captions padded to one length by the pipeline).
    sequence_parallel: bool = False
    # Whether its text length is the prompt's own (token counts padded per batch, with a mask once they
    # differ) rather than one padded length: the warm-up then runs prompts of three lengths, so that
    # compiled graphs are dynamic in it and serving compiles nothing (pipeline.run_warm_up).
    text_length_varies: bool = False
    architectures: tuple[Architecture, ...] = ()
    # The shipped model (``model_repository/<name>``) with this family's tiny weights: the tests'
    # and benchmarks' config base (its ``<name>_continuous`` twin where the family has a step adapter).
    test_model: str = ""

    def __post_init__(self):
        if self.steps is not None:
            self.steps.family = self  # the step adapter reads its family's rules (when CFG runs, schedulers)

    @property
    def video(self) -> bool:
        return self.output == VIDEO_OUTPUT

    def guided(self, guidance_scale: float) -> bool:
        """Whether a call at ``guidance_scale`` runs classifier-free guidance (two denoiser rows per image)."""
        return self.cfg_above is not None and guidance_scale > self.cfg_above


# Any other diffusers pipeline with the common call shape: served by dynamic batching, no row drop,
# no step adapter.
GENERIC = Family("diffusers")
