"""Load a diffusers pipeline from a model's settings, and run one pipeline call per chunk.

Family-agnostic: the pipeline class comes from ``model_index.json`` (or ``pipeline_class``), the
image-to-image variant from ``AutoPipelineForImage2Image.from_pipe`` (shared weights). The call
arguments are fixed per task and checked against the pipeline's ``__call__`` at load time.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from . import row_cache
from .acceleration import (SpeedSettingError, apply_speed_settings, bucket_for, compiled_graphs, cuda_graph_recordings,
                           denoiser_of, reset_step_cache)
from .cancellation import RowCancellation, never_cancelled
from .families import RANDOM_PREFIX, Family, build_random_pipeline, family_of, frame_step
from .lora import AdapterLibrary
from .paired_cfg import PairedGuidance, why_unpaired
from .paired_cfg import install as install_pairing
from .quantization import QuantizationRefused
from .requests import IMAGE_TO_IMAGE, TEXT_TO_IMAGE, CallParams, GenerationItem, text_to_image
from .settings import ModelSettings

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """A device (or host allocator) out-of-memory error, after which a smaller batch may fit."""
    import torch

    out_of_memory = isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )
    if out_of_memory and torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the smaller retries the freed blocks
    return out_of_memory


def to_uint8(images) -> np.ndarray:
    """[B, (F,) C, H, W] in [0, 1] -> uint8 [B, (F,) H, W, 3]: rounded where the images are (the
    GPU), then one copy; the same rounding as on the CPU in float32."""
    import torch

    channels_last = (0, 1, 3, 4, 2) if images.dim() == 5 else (0, 2, 3, 1)
    return images.float().mul(255).round().clamp(0, 255).to(torch.uint8).permute(*channels_last).cpu().numpy()


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelLoadError(RuntimeError):
    """The pipeline could not be loaded; the message says what to fix."""


def resolve_device(name: str, instance_kind: str = "", instance_device_id: int = 0) -> str:
    """``device`` from config.pbtxt; ``auto`` means the GPU Triton gave this instance
    (``instance_group { kind: KIND_GPU }``), else the first GPU if there is one, else the CPU."""
    import torch

    if name != "auto":
        return name
    if instance_kind == "GPU":
        return f"cuda:{instance_device_id}"
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ModelLoadError(f"torch_dtype must be auto, float32, float16 or bfloat16, got {name!r}") from None


def _load_error_message(settings: ModelSettings, location: str, exc: Exception) -> str:
    import os

    # Hub ids look like "org/name"; anything else is meant as a local path.
    looks_local = os.path.isabs(location) or location.startswith(".") or location.count("/") != 1
    if looks_local and not os.path.exists(location):
        hint = f"the local path {location!r} does not exist (run scripts/setup.sh to build the tiny models)"
    elif settings.load.local_files_only or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        hint = (
            f"the weights of {location!r} are not in the local Hugging Face cache and downloads are disabled "
            "(local_files_only / HF_HUB_OFFLINE); download them first or mount a cache that has them"
        )
    else:
        hint = f"{location!r} could not be loaded from a local path or the Hugging Face Hub"
    return f"cannot load pipeline from config.pbtxt parameter pretrained_model={settings.load.pretrained_model!r}: {hint}. Cause: {type(exc).__name__}: {exc}"


# The keyword arguments ``run`` passes, per task. A pipeline whose ``__call__`` lacks a required
# one cannot be served (load error); an optional one only limits what requests it accepts.
REQUIRED_ARGUMENTS = {
    TEXT_TO_IMAGE: ("prompt", "num_inference_steps", "guidance_scale", "generator", "output_type", "height", "width",
                    "callback_on_step_end", "callback_on_step_end_tensor_inputs"),
    IMAGE_TO_IMAGE: ("prompt", "image", "strength", "num_inference_steps", "guidance_scale", "generator", "output_type",
                     "callback_on_step_end", "callback_on_step_end_tensor_inputs"),
}
# negative_prompt: requests with one are rejected where it is missing. height/width for
# image-to-image: pipelines without them (SD) produce the size of the resized source image.
OPTIONAL_ARGUMENTS = {TEXT_TO_IMAGE: ("negative_prompt", "max_sequence_length"),
                      IMAGE_TO_IMAGE: ("negative_prompt", "height", "width", "max_sequence_length")}


def call_arguments(pipe, task: str) -> frozenset[str]:
    """The keyword arguments ``run`` will pass to ``pipe`` for ``task``; raises ``ModelLoadError``
    when the pipeline lacks one it needs (rather than dropping it at call time)."""
    family = family_of(pipe)
    accepted = set(inspect.signature(pipe.__call__).parameters)
    required = [family.guidance_argument if name == "guidance_scale" else name for name in REQUIRED_ARGUMENTS[task]]
    if family.video:
        required.append("num_frames")
    missing = [name for name in required if name not in accepted]
    if missing:
        raise ModelLoadError(f"{type(pipe).__name__}.__call__ does not take {missing}, which {task} needs")
    return frozenset(required) | {name for name in OPTIONAL_ARGUMENTS[task] if name in accepted}


def check_output(pipe, settings: ModelSettings, declared_output: str) -> None:
    """The model's declared output (IMAGE or VIDEO) and ``default_num_frames`` fit what the pipeline makes."""
    family = family_of(pipe)
    if family.output != declared_output:
        raise ModelLoadError(f"{type(pipe).__name__} makes {family.output.lower()}s: config.pbtxt must declare output "
                             f"{family.output} (it declares {declared_output})")
    if family.video != bool(settings.defaults.default_num_frames):
        need = "a video model needs default_num_frames > 0" if family.video else "an image model takes no default_num_frames"
        raise ModelLoadError(f"config.pbtxt parameters: {need}")


def call_kwargs(pipe, family: Family, settings: ModelSettings, arguments: frozenset, params: CallParams,
                items: Sequence[GenerationItem], generators: list) -> dict:
    """The keyword arguments of one pipeline call for rows sharing ``params`` (images as tensors in [0, 1])."""
    from PIL import Image

    kwargs = {
        "prompt": [item.prompt for item in items],
        "num_inference_steps": params.num_inference_steps,
        family.guidance_argument: params.guidance_scale,
        "generator": generators,
        "output_type": "pt",
    }
    if params.with_negative_prompt:
        kwargs["negative_prompt"] = [item.negative_prompt for item in items]
    elif family.cfg_negative_prompt is not None and family.guided(params.guidance_scale):
        kwargs["negative_prompt"] = [family.cfg_negative_prompt] * len(items)
    if params.num_frames:
        kwargs["num_frames"] = params.num_frames
    if settings.load.max_sequence_length and "max_sequence_length" in arguments:
        kwargs["max_sequence_length"] = settings.load.max_sequence_length
    size = (params.height, params.width)
    if params.task == IMAGE_TO_IMAGE:
        kwargs["image"] = [
            Image.fromarray(item.image).convert("RGB").resize(size[::-1], Image.LANCZOS)
            if item.image.shape[:2] != size
            else Image.fromarray(item.image)
            for item in items
        ]
        kwargs["strength"] = params.strength
    if "height" in arguments:
        kwargs["height"], kwargs["width"] = size
    return kwargs


# Warm-up passes at most (while a pass records CUDA graphs, the plan runs again).
_MAX_WARMUP_PASSES = 4

# The fidelity guard's call (quantization.py): one image at the default size, steps and guidance.
FIDELITY_PROMPT = "a lighthouse on a rocky coast at dusk, photograph"
FIDELITY_SEED = 0


def latents_probe(pipe, settings: ModelSettings) -> Callable[[], object]:
    """A call that returns the final latents of one fixed-seed request at the model's defaults (before
    the VAE), on the CPU in float32: what the fidelity guard compares."""
    import torch

    family = family_of(pipe)
    defaults = settings.defaults
    item = text_to_image(FIDELITY_PROMPT, FIDELITY_SEED, defaults.default_steps, defaults.default_guidance_scale,
                         defaults.default_height, defaults.default_width, num_frames=defaults.default_num_frames)
    params = item.params
    arguments = call_arguments(pipe, TEXT_TO_IMAGE)

    def probe():
        kwargs = call_kwargs(pipe, family, settings, arguments, params, [item],
                             [torch.Generator("cpu").manual_seed(FIDELITY_SEED)])
        kwargs["output_type"] = "latent"
        with torch.inference_mode():
            output = pipe(**kwargs)
        latents = output.frames if family.video else output.images
        return latents.float().cpu()

    return probe


def pair_guidance_passes(pipe, settings: ModelSettings) -> tuple[Optional[PairedGuidance], str]:
    """Install batched guidance on the denoiser where the family runs CFG as two calls per step;
    returns it (or None) and what to log (empty where the family has nothing to pair)."""
    family = family_of(pipe)
    if family.cfg_pairing is None:
        return None, ""
    reason = why_unpaired(family.cfg_pairing, settings.calls.batched_cfg, settings.speed.step_cache, settings.speed.compile)
    if reason:
        return None, f"guidance passes run apart ({reason})"
    return install_pairing(denoiser_of(pipe), family.cfg_pairing), "guidance passes batched into one denoiser call"


@dataclass(frozen=True)
class WarmupReport:
    """What a warm-up (``PipelineRunner.warm_up``, a step adapter's ``warm_up``) ran before READY."""

    calls: int
    seconds: float
    compiled_graphs: int  # graphs torch.compile built during the warm-up
    cuda_graphs: int = 0  # CUDA graphs recorded during the warm-up (compile_mode: reduce-overhead)


# Warm-up prompts per round (row i takes round[i % len(round)]). Where a family's text length is
# the prompt's own (``Family.text_length_varies``: Z-Image, Qwen-Image), a compiled denoiser sees a
# new shape per length, a new graph once a batch mixes lengths (an attention mask), and another for
# the next masked length; after rounds that show all three, its graphs are dynamic in the text
# length and serving compiles nothing for it. Other families run the first round only.
_WARMUP_ROUNDS = (("warm-up",),
                  ("a long warm-up prompt: a red bicycle leaning against a brick wall on a rainy night, puddles "
                   "reflecting neon signs, a cat watching from a window above, cinematic light, shallow depth of "
                   "field, highly detailed, 35mm film photograph", "warm-up"),
                  ("a warm-up prompt of middling length: two dogs on a beach at sunset", "warm-up"))


def warm_up_rows(params: CallParams, rows: int, prompts: Sequence[str] = _WARMUP_ROUNDS[0]) -> list[GenerationItem]:
    """``rows`` warm-up rows of ``params``, row i with ``prompts[i % len(prompts)]``."""
    return [GenerationItem(prompts[row % len(prompts)], row, params) for row in range(rows)]


def run_warm_up(plan: Sequence[tuple[CallParams, int]], run: Callable[[list[GenerationItem]], object],
                text_length_varies: bool = False) -> WarmupReport:
    """``run`` once per (params, rows) of ``plan`` on that many warm-up rows (and, where the text
    length varies, the whole plan again per further round of ``_WARMUP_ROUNDS``); timed, and the
    graphs torch.compile built and the CUDA graphs it recorded meanwhile counted.

    CUDA-graph trees (``compile_mode: reduce-overhead``) run a new shape once un-recorded and record
    it on its next call, so a module called once per call (the VAE decoder) records only in a second
    pass: while a pass records CUDA graphs, the plan runs again, so that serving records none."""
    calls, seconds, graphs, recordings = 0, 0.0, 0, 0
    rounds = _WARMUP_ROUNDS if text_length_varies else _WARMUP_ROUNDS[:1]
    for _ in range(_MAX_WARMUP_PASSES):
        started, graphs_before, recordings_before = time.perf_counter(), compiled_graphs(), cuda_graph_recordings()
        for prompts in rounds:
            for params, rows in plan:
                run(warm_up_rows(params, rows, prompts))
        recorded = cuda_graph_recordings() - recordings_before
        calls, seconds = calls + len(rounds) * len(plan), seconds + time.perf_counter() - started
        graphs, recordings = graphs + compiled_graphs() - graphs_before, recordings + recorded
        if not recorded:
            break
    return WarmupReport(calls, seconds, graphs, recordings)


class PipelineRunner:
    """Holds the loaded pipelines of one model instance and runs chunks through them."""

    def __init__(self, text_to_image, image_to_image, device: str, settings: Optional[ModelSettings] = None,
                 speed: Sequence[str] = (), warnings: Sequence[str] = (), pairing: Optional[PairedGuidance] = None):
        self.text_to_image = text_to_image
        self.image_to_image = image_to_image
        self.device = device
        self.settings = settings or ModelSettings.build(pretrained_model="(in memory)")
        self.speed = tuple(speed)  # the speed knobs applied at load, for the log
        self.warnings = tuple(warnings)  # what the load gave up on (a quantization that failed its guard), for the log
        self.family: Family = family_of(text_to_image)
        self.pipelines = {TEXT_TO_IMAGE: text_to_image, IMAGE_TO_IMAGE: image_to_image}
        self.arguments = {task: call_arguments(pipe, task) for task, pipe in self.pipelines.items() if pipe is not None}
        # A static batch size (buckets, or graphs compiled with dynamic=False) must not shrink mid-call.
        # So must one that runs on several ranks (parallel.py: they all run the same rows).
        self.can_shrink = not self.settings.calls.batch_buckets and not (
            self.settings.speed.compiles and self.settings.speed.compile_dynamic == "false") and (
            self.settings.calls.parallel_plan.world == 1)
        self.group = None  # parallel.Group: rank 0 of an instance on several devices (parallel.py)
        self.padded_rows = 0  # filler rows run so far to reach a bucket
        self.pairing = pairing  # batched guidance passes (paired_cfg.py), where installed
        self.adapters: Optional[AdapterLibrary] = None  # LoRA adapters per request (lora_dir), where configured
        adapters = self.settings.adapters
        if adapters.enabled:
            self.adapters = AdapterLibrary(text_to_image, denoiser_of(text_to_image), adapters.lora_dir,
                                           adapters.max_loaded_loras, adapters.max_lora_rank,
                                           compiled=self.settings.speed.compiles)

    @classmethod
    def load(cls, settings: ModelSettings, device: Optional[str] = None, output: Optional[str] = None,
             worker: bool = False) -> "PipelineRunner":
        """``device``: where Triton placed the instance (None: ``settings.load.device`` resolved here);
        ``output``: what the model's config declares (IMAGE or VIDEO; None outside a server);
        ``worker``: a parallel worker's load (``parallel.py``: rank 0 starts the group, not a worker)."""
        import diffusers
        import torch

        device = device or resolve_device(settings.load.device)
        plan = settings.calls.parallel_plan
        if settings.load.torch_num_threads > 0:
            torch.set_num_threads(settings.load.torch_num_threads)
        elif plan.world > 1 and not device.startswith("cuda"):  # N processes share the cores (oversubscribed, each waits on the others)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // plan.world))
        dtype = resolve_dtype(settings.load.torch_dtype, device)
        pipeline_cls = getattr(diffusers, settings.load.pipeline_class or "DiffusionPipeline", None)
        if pipeline_cls is None:
            raise ModelLoadError(f"config.pbtxt parameter pipeline_class={settings.load.pipeline_class!r} is not a diffusers class")
        location = settings.load.model_location
        kwargs = {"torch_dtype": dtype, "local_files_only": settings.load.local_files_only}
        if settings.load.variant:
            kwargs["variant"] = settings.load.variant
        if location.startswith(RANDOM_PREFIX):
            try:
                pipe = build_random_pipeline(location[len(RANDOM_PREFIX):], device, dtype)
            except ValueError as exc:
                raise ModelLoadError(f"config.pbtxt parameter pretrained_model: {exc}") from None
        else:
            try:
                pipe = pipeline_cls.from_pretrained(location, **kwargs)
            except Exception as exc:  # diffusers raises many types here; all mean "not loadable"
                raise ModelLoadError(_load_error_message(settings, location, exc)) from exc
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        check_output(pipe, settings, output or family_of(pipe).output)
        effective = settings.for_device(device)
        probe = latents_probe(pipe, effective) if effective.speed.quantization else None
        failed_guard = None
        try:
            family = family_of(pipe)
            speed = apply_speed_settings(pipe, effective.speed, probe, family.fp8_skip, family.cache_block_arguments)
        except SpeedSettingError as exc:
            raise ModelLoadError(f"config.pbtxt speed parameters: {exc}") from None
        except QuantizationRefused as exc:
            if not effective.speed.fp8_fallback:
                raise ModelLoadError(f"config.pbtxt speed parameters: {exc}") from None
            failed_guard = str(exc)  # (outside this block the traceback, which holds the pipeline, is gone)
        if effective.speed.quantization:
            # the replaced bf16 weights stay in torch's cache otherwise (FLUX.1-dev: ~24 GB held for nothing,
            # which a second model or process on the card cannot use)
            _free_memory()
        if failed_guard is not None:
            # The quantized layers cannot be restored in place: load again, unquantized.
            del pipe, probe
            _free_memory()
            unquantized = dataclasses.replace(settings, speed=dataclasses.replace(settings.speed, quantization=""))
            runner = cls.load(unquantized, device, output, worker)
            runner.warnings = (f"WARNING: {failed_guard}; fp8_fallback is set, so the model serves unquantized",
                               *runner.warnings)
            return runner
        if effective is not settings:
            speed = [f"speed knobs ignored on {device} (speed_devices={','.join(settings.speed.speed_devices)})"]
        pairing = None
        if not settings.calls.continuous:  # (the step models batch their guidance rows themselves)
            pairing, described = pair_guidance_passes(pipe, effective)
            if described:
                speed.append(described)
        image_to_image = None
        if settings.load.enable_image_to_image:
            try:
                image_to_image = diffusers.AutoPipelineForImage2Image.from_pipe(pipe)
                image_to_image.set_progress_bar_config(disable=True)
            except (ValueError, KeyError) as exc:
                log.warning("%s has no image-to-image variant (%s); serving text-to-image only", type(pipe).__name__, exc)
        runner = cls(pipe, image_to_image, device, effective, speed, pairing=pairing)
        if plan.world > 1 and not worker:  # rank 0: the workers load the same model, then every call runs on all
            from . import parallel

            if plan.ulysses > 1 and not runner.family.sequence_parallel:
                raise ModelLoadError(f"config.pbtxt parameter parallel={settings.calls.parallel!r}: the {runner.family.name} "
                                     "family is not served with sequence parallelism (families.*.sequence_parallel)")
            try:
                runner.group = parallel.Group(settings, device, runner).start()
            except parallel.ParallelError as exc:
                raise ModelLoadError(f"config.pbtxt parameter parallel={settings.calls.parallel!r}: {exc}") from None
            runner.speed += (f"parallel: {settings.calls.parallel} on {', '.join(runner.group.devices)}",)
        return runner

    def warm_up(self) -> WarmupReport:
        """Run every (clip length,) batch size, size and guidance of ``settings.warmup_plan()`` once, two steps each,
        so that the shapes serving will use are compiled (and allocated) before READY."""
        batch_sizes, sizes, guidance_scales = self.settings.warmup_plan()
        for frames in self.settings.warmup_frames():
            problem = self._frames_problem(TEXT_TO_IMAGE, frames)
            if problem:
                raise ModelLoadError(f"config.pbtxt parameter warmup_num_frames: {frames} frames: {problem}")
        plan = [(CallParams(TEXT_TO_IMAGE, height, width, 2, guidance_scale, num_frames=frames), batch)
                for frames in self.settings.warmup_frames()
                for height, width in sizes for guidance_scale in guidance_scales for batch in batch_sizes]
        report = run_warm_up(plan, lambda items: self.run(items[0].params, items), self.family.text_length_varies)
        self.padded_rows = 0
        return report

    def unsupported(self, item: GenerationItem) -> Optional[str]:
        """Why this pipeline cannot serve ``item``, or None."""
        accepted = self.arguments.get(item.task)
        if accepted is None:
            return f"this model ({type(self.text_to_image).__name__}) does not serve {item.task}"
        if item.negative_prompt is not None and "negative_prompt" not in accepted:
            return f"this model ({type(self.text_to_image).__name__}) does not take NEGATIVE_PROMPT"
        if item.negative_prompt is not None and self.family.negative_prompt_refusal:
            return self.family.negative_prompt_refusal
        problem = self._frames_problem(item.task, item.params.num_frames)
        if problem:
            return f"NUM_FRAMES={item.params.num_frames}: {problem}"
        if item.lora:  # a name with no file fails this request alone now; the file is read in the background
            return self.adapters.prepare(item.lora) if self.adapters else "this model takes no LoRA adapters (no lora_dir)"
        return None

    def ready(self, item: GenerationItem) -> bool:
        """Whether a call can run ``item`` now (False while its adapter is being read)."""
        return not item.lora or self.adapters is None or self.adapters.ready(item.lora)

    def _adapter_parts(self, items: Sequence[GenerationItem]) -> list[tuple[int, int]]:
        """(start, end) of consecutive parts of ``items`` that each name at most ``max_loaded_loras`` adapters."""
        if self.adapters is None:
            return [(0, len(items))]
        parts, start, names = [], 0, set()
        for index, item in enumerate(items):
            if item.lora and item.lora not in names and len(names) == self.adapters.bank.max_loaded:
                parts.append((start, index))
                start, names = index, set()
            if item.lora:
                names.add(item.lora)
        return parts + [(start, len(items))]

    def _frames_problem(self, task: str, frames: int) -> Optional[str]:
        """Why the pipeline cannot make a clip of ``frames`` frames (0: an image), or None."""
        step = frame_step(self.pipelines[task])
        if frames and (frames - 1) % step:
            return f"{type(self.text_to_image).__name__} makes {step}k+1 frames (1, {1 + step}, {1 + 2 * step}, ...)"
        return None

    def run(
        self,
        params: CallParams,
        items: Sequence[GenerationItem],
        cancelled_rows: Callable[[Sequence[int]], set] = never_cancelled,
    ) -> list[Optional[np.ndarray]]:
        """One pipeline call for rows sharing ``params``; returns uint8 HxWx3 images (FxHxWx3 videos) in order.

        Scalars come from ``params`` alone (never from a row), so rows that differ in one cannot
        share a call. ``cancelled_rows`` is asked once per denoising step which rows' requests were
        cancelled; those rows leave the call where the pipeline allows it, and their output is None.
        On several ranks (``parallel``) the call goes to every worker first and runs everywhere.
        """
        if self.group is None:
            return self.run_here(params, items, cancelled_rows)
        self.group.announce((params, list(items)))
        try:
            return self.run_here(params, items, cancelled_rows)
        except BaseException as exc:
            dead = self.group.dead(settle_s=0 if is_out_of_memory(exc) else 2.0)
            self.group.failed()  # (a worker may wait in this call's collectives: the next call starts new ones)
            if dead and isinstance(exc, Exception):
                from .parallel import ParallelError

                raise ParallelError(f"a parallel worker died during the call ({dead}; the next call starts it "
                                    f"again): {type(exc).__name__}: {exc}") from None
            raise

    def run_here(
        self,
        params: CallParams,
        items: Sequence[GenerationItem],
        cancelled_rows: Callable[[Sequence[int]], set] = never_cancelled,
    ) -> list[Optional[np.ndarray]]:
        """``run`` on this rank alone."""
        import torch

        parts = self._adapter_parts(items)
        if len(parts) > 1:  # more adapters than the bank holds: one call per part, in order
            outputs = []
            for start, end in parts:
                outputs += self.run(params, items[start:end],
                                    lambda rows, start=start: {row - start for row in cancelled_rows([r + start for r in rows])})
            return outputs
        pipe = self.pipelines[params.task]
        arguments = self.arguments[params.task]
        requested = len(items)
        fillers = bucket_for(requested, self.settings.calls.batch_buckets) - requested
        # Filler rows repeat the last row: a warmed batch size costs less than compiling a new one.
        items = list(items) + [items[-1]] * fillers
        if self.adapters is not None:  # each row's adapter (slot 0: none); AdaptersUnavailable before anything runs
            self.adapters.use(items)
        self.padded_rows += fillers
        # One CPU generator per row: its noise does not depend on its batch-mates or the device.
        generators = [torch.Generator("cpu").manual_seed(item.seed) for item in items]
        rows = RowCancellation(len(items), cancelled_rows, generators, fillers, self.can_shrink)
        kwargs = call_kwargs(pipe, self.family, self.settings, arguments, params, items, generators)
        kwargs.update(callback_on_step_end=rows, callback_on_step_end_tensor_inputs=rows.tensor_inputs(pipe))
        unexpected = set(kwargs) - arguments
        if unexpected:  # a request the backend should have rejected in parsing (unsupported())
            raise ValueError(f"{type(pipe).__name__} does not take {sorted(unexpected)}")
        reset_step_cache(pipe)
        row_cache.allow(denoiser_of(pipe), [item.step_cache for item in items])  # STEP_CACHE=1 rows may skip
        try:
            with torch.inference_mode():
                output = pipe(**kwargs)
                images = output.frames if self.family.video else output.images  # [B, (F,) C, H, W] in [0, 1]
        finally:
            rows.close()
            if self.pairing is not None:
                self.pairing.reset()  # the next call records its own conditioning; drops this call's tensors
            if self.adapters is not None:
                self.adapters.done()
        wanted = rows.wanted()
        outputs: list[Optional[np.ndarray]] = [None] * requested
        if wanted:
            positions = torch.tensor([position for _, position in wanted], device=images.device)
            for (row, _), image in zip(wanted, to_uint8(images[positions])):
                outputs[row] = image
        return outputs
