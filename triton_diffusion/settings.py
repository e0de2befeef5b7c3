"""A served model's knobs, read from the ``parameters`` of its ``config.pbtxt``.

Every value arrives as a string (Triton's ``string_value``); this module is the one place that
turns them into typed settings with defaults, so that a new diffusers family needs a new
``config.pbtxt``, never a new ``model.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from .quantization import QUANTIZATION_CHOICES
from .row_cache import decides_per_row


def default_cache_dir() -> Path:
    """Where generated tiny models (and other local artefacts) live."""
    env = os.environ.get("TRITON_DIFFUSION_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / ".cache" / "models"


PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve_model_location(value: str) -> str:
    """Expand ``{cache}``, ``{repo}`` (this checkout), ``~`` and ``$VARS`` in a model path; hub ids
    pass through unchanged."""
    value = value.replace("{cache}", str(default_cache_dir())).replace("{repo}", str(PROJECT_ROOT))
    return os.path.expandvars(os.path.expanduser(value))


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected a boolean, got {text!r}")


def _parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``"512x512, 768x512"`` -> ((512, 512), (768, 512)); height x width."""
    sizes = []
    for part in text.replace(";", ",").split(","):
        part = part.strip().lower()
        if not part:
            continue
        height, _, width = part.partition("x")
        sizes.append((int(height), int(width)))
    return tuple(sizes)


def _parse_ints(text: str) -> tuple[int, ...]:
    """``"1, 2, 4"`` -> (1, 2, 4)."""
    return tuple(int(part) for part in text.replace(";", ",").split(",") if part.strip())


def _parse_floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.replace(";", ",").split(",") if part.strip())


def _parse_names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


_LIST_PARSERS = {"speed_devices": _parse_names, "fp8_skip": _parse_names,
                 "allowed_sizes": _parse_sizes, "warmup_sizes": _parse_sizes, "batch_buckets": _parse_ints,
                 "warmup_batch_sizes": _parse_ints, "warmup_guidance_scales": _parse_floats,
                 "warmup_num_frames": _parse_ints}
COMPILE_CHOICES = ("off", "regional", "full")
COMPILE_DYNAMIC_CHOICES = ("auto", "true", "false")
BATCHING_CHOICES = ("dynamic", "continuous")


class SettingsError(ValueError):
    """A config.pbtxt ``parameters`` entry is unknown, malformed or inconsistent with another."""


@dataclass(frozen=True)
class LoadSettings:
    """Which weights, how they load, and how the pipeline is called."""

    pretrained_model: str = ""
    pipeline_class: str = ""  # empty: the class named in model_index.json (DiffusionPipeline)
    torch_dtype: str = "auto"  # auto: float16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: the GPU Triton assigned to the instance (KIND_GPU), else cuda if available, else cpu
    local_files_only: bool = False
    variant: str = ""
    enable_image_to_image: bool = True
    torch_num_threads: int = 0  # 0: leave torch's default (parallel on the CPU: the cores / N)
    max_sequence_length: int = 0  # text tokens the pipeline encodes (its max_sequence_length); 0: the pipeline's default

    @property
    def model_location(self) -> str:
        return resolve_model_location(self.pretrained_model)


@dataclass(frozen=True)
class RequestDefaults:
    """What a request that leaves an input out gets."""

    default_height: int = 512
    default_width: int = 512
    default_steps: int = 20
    default_guidance_scale: float = 7.5
    default_strength: float = 0.8
    default_num_frames: int = 0  # video models: frames per video (> 0 makes it a video model); 0: an image model


@dataclass(frozen=True)
class RequestLimits:
    """What a request may ask for; anything beyond is refused with INVALID_ARG."""

    size_multiple: int = 8
    min_side: int = 64
    max_side: int = 2048
    max_pixels: int = 0  # 0: no limit beyond max_side x max_side
    allowed_sizes: tuple[tuple[int, int], ...] = ()
    max_steps: int = 100
    max_num_frames: int = 129
    max_guidance_scale: float = 50.0
    max_prompt_bytes: int = 4096
    max_input_image_pixels: int = 2048 * 2048

    @property
    def pixel_limit(self) -> int:
        """The most output pixels a request may ask for."""
        return self.max_pixels or self.max_side * self.max_side


@dataclass(frozen=True)
class CallSettings:
    """How requests become calls: the memory budget of one call, the batching mode, and how often a
    running call talks to Triton."""

    max_pixels_per_call: int = 16 * 512 * 512  # images x height x width
    max_images_per_call: int = 16
    # how often a running call asks Triton whether its requests were cancelled (0: every step)
    cancellation_poll_interval_ms: int = 100
    progress_interval_ms: int = 1000  # continuous mode: progress responses to requests that ask (parameter "progress")
    # dynamic: one pipeline call per batch Triton forms; continuous: newcomers join the running batch
    # at the next denoising step (families with a step adapter; the backend makes the model decoupled)
    batching: str = "dynamic"
    # calls are padded up to the nearest bucket (warmed shapes; static compiled graphs); empty: no padding
    batch_buckets: tuple[int, ...] = ()
    # where a pipeline runs classifier-free guidance as two denoiser calls per step (Qwen-Image, Wan),
    # run them as one call of twice the rows (paired_cfg.py); off by default: compiled Qwen-Image
    # measured slower paired (docs/benchmarks.md)
    batched_cfg: bool = False
    # "cfg=N" / "ulysses=N": the instance spans N devices, each denoising part of every call's rows /
    # of every sequence (parallel.py)
    parallel: str = ""

    @property
    def continuous(self) -> bool:
        return self.batching == "continuous"

    @property
    def parallel_plan(self):
        from .parallel import ParallelPlan

        return ParallelPlan.parse(self.parallel)


@dataclass(frozen=True)
class SpeedSettings:
    """Speed knobs (acceleration.py); all off by default: the CPU tiny model gains nothing from them."""

    speed_devices: tuple[str, ...] = ("cuda",)  # device types the knobs below apply on (elsewhere: ignored, logged)
    compile: str = "off"  # off | regional (diffusers compile_repeated_blocks) | full (the whole denoiser)
    compile_mode: str = ""  # torch.compile mode: "" (default), reduce-overhead (CUDA graphs), max-autotune...
    compile_dynamic: str = "auto"  # torch.compile dynamic=: auto (None: a dim that changes becomes dynamic), true, false
    compile_vae: bool = False  # also compile the VAE decoder
    compile_backend: str = "inductor"
    channels_last: bool = False
    fuse_qkv: bool = False
    attention_backend: str = ""  # diffusers set_attention_backend on the denoiser: native, _native_cudnn, flash...
    vae_slicing: bool = False
    vae_tiling: bool = False
    step_cache: str = ""  # a diffusers cache config, e.g. "FirstBlockCache threshold=0.05" (changes images)
    quantization: str = ""  # "" | fp8 | fp8_weight_only: the denoiser's linear layers through torchao (quantization.py)
    # the fidelity guard at load: a fixed-seed call's latents, quantized against unquantized
    fp8_max_relative_error: float = 0.05
    fp8_fallback: bool = False  # failing the guard (or no fp8 on this device): load unquantized with a WARNING
    fp8_skip: tuple[str, ...] = ()  # name patterns of layers kept unquantized, beyond the family's own

    @property
    def compiles(self) -> bool:
        return self.compile != "off" or self.compile_vae


@dataclass(frozen=True)
class WarmupSettings:
    """What runs before READY: every batch size x size x guidance below (defaults in ``ModelSettings.warmup_plan``)."""

    warmup_batch_sizes: tuple[int, ...] = ()
    warmup_sizes: tuple[tuple[int, int], ...] = ()
    warmup_guidance_scales: tuple[float, ...] = ()
    warmup_num_frames: tuple[int, ...] = ()  # video models: clip lengths (default: default_num_frames)


LORA_BATCHING_CHOICES = ("mixed", "grouped")


@dataclass(frozen=True)
class AdapterSettings:
    """LoRA adapters per request (lora.py): where they are, how many stay loaded, what a request may ask."""

    lora_dir: str = ""  # a folder of adapters, by name (NAME/ or NAME.safetensors); empty: the model takes none
    max_loaded_loras: int = 8  # adapters kept on the device (least recently used evicted)
    max_lora_rank: int = 64  # an adapter of a higher rank is refused
    max_lora_scale: float = 2.0  # LORA_SCALE may be within [0, this]
    # mixed: rows with different adapters share a call; grouped: one adapter per call (for comparison)
    lora_batching: str = "mixed"

    @property
    def enabled(self) -> bool:
        return bool(self.lora_dir)


# record name -> record class; every config.pbtxt parameter key is a field of exactly one record
RECORDS = {"load": LoadSettings, "defaults": RequestDefaults, "limits": RequestLimits, "calls": CallSettings,
           "speed": SpeedSettings, "warmup": WarmupSettings, "adapters": AdapterSettings}
PARAMETERS = {field.name: (record, field) for record, cls in RECORDS.items() for field in fields(cls)}


@dataclass(frozen=True)
class ModelSettings:
    """Typed view of a model's ``config.pbtxt`` parameters, as one small record per concern (the
    field names are the parameter keys)."""

    load: LoadSettings = LoadSettings()
    defaults: RequestDefaults = RequestDefaults()
    limits: RequestLimits = RequestLimits()
    calls: CallSettings = CallSettings()
    speed: SpeedSettings = SpeedSettings()
    warmup: WarmupSettings = WarmupSettings()
    adapters: AdapterSettings = AdapterSettings()

    @classmethod
    def build(cls, **values: Any) -> "ModelSettings":
        """Settings from typed values by parameter key (tests, benchmarks); unchecked."""
        grouped: dict[str, dict[str, Any]] = {record: {} for record in RECORDS}
        for key, value in values.items():
            if key not in PARAMETERS:
                raise SettingsError(f"{key!r} is not a known parameter")
            grouped[PARAMETERS[key][0]][key] = value
        return cls(**{record: RECORDS[record](**grouped[record]) for record in RECORDS})

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> "ModelSettings":
        """Build settings from a flat ``{key: string}`` mapping; an unknown key is an error."""
        values: dict[str, Any] = {}
        for key, raw in parameters.items():
            if key not in PARAMETERS:
                close = difflib.get_close_matches(key, PARAMETERS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; known parameters: {', '.join(PARAMETERS)}"
                raise SettingsError(f"config.pbtxt parameter {key!r} is not a known parameter{hint}")
            kind = PARAMETERS[key][1].type
            try:
                if kind == "bool":
                    values[key] = _parse_bool(raw)
                elif kind == "int":
                    values[key] = int(raw)
                elif kind == "float":
                    values[key] = float(raw)
                elif key in _LIST_PARSERS:
                    values[key] = _LIST_PARSERS[key](raw)
                else:
                    values[key] = raw
            except ValueError as exc:
                raise SettingsError(f"config.pbtxt parameter {key!r}: {exc}") from exc
        if not values.get("pretrained_model"):
            raise SettingsError("config.pbtxt must set parameter 'pretrained_model' (a local path or hub id)")
        settings = cls.build(**values)
        settings.check()
        return settings

    @classmethod
    def from_model_config(cls, model_config: Mapping[str, Any]) -> "ModelSettings":
        """Build settings from Triton's model config JSON (``args['model_config']``, parsed)."""
        parameters = {
            key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()
        }
        return cls.from_parameters(parameters)

    def check(self) -> None:
        """Raise ``SettingsError`` for limits that contradict each other or the defaults."""
        problems = _problems(self)
        if problems:
            raise SettingsError("config.pbtxt parameters are inconsistent: " + "; ".join(problems))

    def for_device(self, device: str) -> "ModelSettings":
        """These settings on ``device``: the speed knobs reset where ``speed_devices`` excludes its type
        (a GPU config run on a CPU would otherwise spend many minutes compiling for no gain)."""
        if device.split(":")[0] in self.speed.speed_devices:
            return self
        return dataclasses.replace(self, speed=SpeedSettings(speed_devices=self.speed.speed_devices))

    def warmup_plan(self) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...], tuple[float, ...]]:
        """(batch sizes, sizes, guidance scales) to run before READY; empty batch sizes: no warm-up.

        Defaults: the buckets, or with no buckets 1, 2 and the largest call when compiling (with
        ``compile_dynamic=auto`` the second size makes the batch dimension dynamic, so every larger
        batch reuses that graph), or every row count in continuous mode (its running batch visits
        them all); the default size and every allowed size; the default guidance.
        """
        calls, defaults = self.calls, self.defaults
        batch_sizes = self.warmup.warmup_batch_sizes or self.calls.batch_buckets
        if not batch_sizes and self.speed.compiles:
            if calls.continuous:  # a running batch passes through every row count
                batch_sizes = tuple(range(1, calls.max_images_per_call + 1))
            else:
                batch_sizes = tuple(sorted({1, min(2, calls.max_images_per_call), calls.max_images_per_call}))
        sizes = self.warmup.warmup_sizes or tuple(dict.fromkeys(
            ((defaults.default_height, defaults.default_width),) + self.limits.allowed_sizes))
        return tuple(batch_sizes), sizes, self.warmup.warmup_guidance_scales or (defaults.default_guidance_scale,)

    def warmup_frames(self) -> tuple[int, ...]:
        """Clip lengths the warm-up runs each plan entry at (0: an image model)."""
        return self.warmup.warmup_num_frames or (self.defaults.default_num_frames,)

    def batching_warnings(self, max_batch_size: int) -> list[str]:
        """What a ``max_batch_size`` of the same config silently does to pipeline calls."""
        calls, defaults = self.calls, self.defaults
        warnings = []
        if max_batch_size > calls.max_images_per_call:
            warnings.append(
                f"max_batch_size={max_batch_size} exceeds max_images_per_call={calls.max_images_per_call}: a full "
                f"batch from Triton runs as {-(-max_batch_size // calls.max_images_per_call)} pipeline calls"
            )
        per_call_at_default = calls.max_pixels_per_call // (defaults.default_height * defaults.default_width)
        if max_batch_size > per_call_at_default >= 1:
            warnings.append(
                f"max_batch_size={max_batch_size} exceeds what max_pixels_per_call={calls.max_pixels_per_call} fits at "
                f"the default size {defaults.default_height}x{defaults.default_width} ({per_call_at_default} images): a "
                "full batch runs as several pipeline calls"
            )
        return warnings


def _problems(settings: ModelSettings) -> list[str]:
    """The cross-checks: limits that contradict each other or the defaults, knobs that cannot go together."""
    d, lim, calls, speed, warm = settings.defaults, settings.limits, settings.calls, settings.speed, settings.warmup
    problems = []
    if lim.max_pixels and lim.max_pixels >= lim.max_side * lim.max_side:
        problems.append(
            f"max_pixels={lim.max_pixels} can never reject a request: max_side={lim.max_side} already caps "
            f"a request at {lim.max_side * lim.max_side} pixels (lower max_pixels, or remove it)"
        )
    if not 0 < lim.min_side <= lim.max_side:
        problems.append(f"min_side={lim.min_side} and max_side={lim.max_side} allow no size")
    sizes = [("default_height/default_width", d.default_height, d.default_width)]
    sizes += [("allowed_sizes", height, width) for height, width in lim.allowed_sizes]
    for what, height, width in sizes:
        sides_ok = all(lim.min_side <= side <= lim.max_side and side % lim.size_multiple == 0 for side in (height, width))
        if not sides_ok or height * width > lim.pixel_limit:
            problems.append(f"{what} {height}x{width} breaks the model's own size limits")
    if lim.allowed_sizes and (d.default_height, d.default_width) not in lim.allowed_sizes:
        problems.append(f"the default size {d.default_height}x{d.default_width} is not in allowed_sizes")
    if not 1 <= d.default_steps <= lim.max_steps:
        problems.append(f"default_steps={d.default_steps} is outside [1, max_steps={lim.max_steps}]")
    if not 0 <= d.default_guidance_scale <= lim.max_guidance_scale:
        problems.append(f"default_guidance_scale={d.default_guidance_scale} is outside [0, {lim.max_guidance_scale}]")
    if not 0 <= d.default_strength <= 1:
        problems.append(f"default_strength={d.default_strength} is outside [0, 1]")
    if d.default_num_frames and not 1 <= d.default_num_frames <= lim.max_num_frames:
        problems.append(f"default_num_frames={d.default_num_frames} is outside [1, max_num_frames={lim.max_num_frames}]")
    if d.default_num_frames < 0 or settings.load.max_sequence_length < 0:
        problems.append("default_num_frames and max_sequence_length must be 0 or more")
    if calls.max_images_per_call < 1 or calls.max_pixels_per_call < 1:
        problems.append("max_images_per_call and max_pixels_per_call must be positive")
    if calls.batching not in BATCHING_CHOICES:
        problems.append(f"batching={calls.batching!r} must be one of {', '.join(BATCHING_CHOICES)}")
    try:
        parallel = calls.parallel_plan.world > 1
    except ValueError as exc:
        problems.append(str(exc))
        parallel = False
    together = [name for name, on in (("batching=continuous", calls.continuous), ("lora_dir", settings.adapters.enabled),
                                      ("step_cache", bool(settings.speed.step_cache))) if on]
    if parallel and together:
        problems.append(f"parallel={calls.parallel!r} is not served with {', '.join(together)} yet (every rank must run "
                        "the same rows and make the same decisions)")
    elif calls.continuous and (calls.batch_buckets or (speed.step_cache and not decides_per_row(speed.step_cache))):
        # a running batch changes size at every admission and mixes steps: neither padding to a
        # bucket nor a step cache that decides for the whole batch applies (the per-row one keeps
        # its residuals with each row: row_cache.py)
        problems.append("batching=continuous takes neither batch_buckets nor a step cache that decides for the whole "
                        "batch (step_cache: FirstBlockCache decides per row and applies)")
    elif calls.continuous and speed.compiles and speed.compile_dynamic == "false":
        # every row count (and guided/unguided mix) of the running batch would be a new static graph
        problems.append("batching=continuous runs any number of rows per step, so compile_dynamic=false would "
                        "compile a graph per row count while serving; use compile_dynamic auto or true")
    if speed.compile not in COMPILE_CHOICES:
        problems.append(f"compile={speed.compile!r} must be one of {', '.join(COMPILE_CHOICES)}")
    if speed.compile_dynamic not in COMPILE_DYNAMIC_CHOICES:
        problems.append(f"compile_dynamic={speed.compile_dynamic!r} must be one of {', '.join(COMPILE_DYNAMIC_CHOICES)}")
    if speed.quantization not in QUANTIZATION_CHOICES:
        problems.append(f"quantization={speed.quantization!r} must be empty or one of "
                        f"{', '.join(choice for choice in QUANTIZATION_CHOICES if choice)}")
    if not speed.fp8_max_relative_error >= 0:
        problems.append(f"fp8_max_relative_error={speed.fp8_max_relative_error} must be 0 or more")
    if speed.vae_slicing and speed.compile_vae:
        problems.append("vae_slicing decodes one image at a time, so compile_vae would compile batch 1 only; choose one")
    if any(size < 1 for size in calls.batch_buckets + warm.warmup_batch_sizes):
        problems.append("batch_buckets and warmup_batch_sizes must be positive")
    if calls.batch_buckets and calls.max_images_per_call > max(calls.batch_buckets):
        problems.append(
            f"max_images_per_call={calls.max_images_per_call} exceeds the largest of batch_buckets="
            f"{list(calls.batch_buckets)}: such a call would have no bucket"
        )
    if calls.batch_buckets and set(warm.warmup_batch_sizes) - set(calls.batch_buckets):
        problems.append("warmup_batch_sizes must be among batch_buckets (calls are padded to a bucket)")
    if lim.allowed_sizes and set(warm.warmup_sizes) - set(lim.allowed_sizes):
        problems.append("warmup_sizes must be among allowed_sizes (no request can have another size)")
    for height, width in warm.warmup_sizes:
        if height * width > lim.pixel_limit or max(height, width) > lim.max_side:
            problems.append(f"warmup_sizes {height}x{width} breaks the model's own size limits")
    if any(not 0 <= scale <= lim.max_guidance_scale for scale in warm.warmup_guidance_scales):
        problems.append(f"warmup_guidance_scales must be within [0, max_guidance_scale={lim.max_guidance_scale}]")
    if warm.warmup_num_frames and not d.default_num_frames:
        problems.append("warmup_num_frames is for video models (default_num_frames > 0)")
    elif any(not 1 <= frames <= lim.max_num_frames for frames in warm.warmup_num_frames):
        problems.append(f"warmup_num_frames must be within [1, max_num_frames={lim.max_num_frames}]")
    if calls.cancellation_poll_interval_ms < 0:
        problems.append("cancellation_poll_interval_ms must be 0 or more")
    if calls.progress_interval_ms < 10:
        problems.append("progress_interval_ms must be 10 or more")
    adapters = settings.adapters
    if adapters.enabled:
        if adapters.max_loaded_loras < 1 or adapters.max_lora_rank < 1 or adapters.max_lora_scale <= 0:
            problems.append("max_loaded_loras and max_lora_rank must be 1 or more, and max_lora_scale above 0")
        if adapters.lora_batching not in LORA_BATCHING_CHOICES:
            problems.append(f"lora_batching={adapters.lora_batching!r} must be one of {', '.join(LORA_BATCHING_CHOICES)}")
        if settings.speed.fuse_qkv:  # the fused projection replaces to_q/to_k/to_v, which adapters adapt
            problems.append("lora_dir with fuse_qkv: an adapter of the query, key or value projection would not apply "
                            "to the fused one")
        if calls.continuous and adapters.max_loaded_loras < calls.max_images_per_call:
            # every running row's adapter must fit, or a newcomer's would evict one still denoising
            problems.append(f"batching=continuous with lora_dir needs max_loaded_loras >= max_images_per_call "
                            f"({adapters.max_loaded_loras} < {calls.max_images_per_call})")
    return problems


# One line per parameter: README's parameter table is generated from this (python -m
# triton_diffusion.settings) and a test keeps the two equal, so the documentation cannot go stale.
PARAMETER_DOCS = {
    "pretrained_model": "Local path, hub id (`org/name`), `{cache}/...` (the project's model cache: `.cache/models`, or "
                        "`$TRITON_DIFFUSION_CACHE`), `{repo}/...` (this checkout), or `random:<arch>` (random weights of a "
                        "real architecture). Required.",
    "pipeline_class": "diffusers class to load with; empty: the one named in `model_index.json`.",
    "torch_dtype": "`auto` (fp16 on CUDA, fp32 on CPU), `float32`, `float16` or `bfloat16`.",
    "device": "`auto` (the GPU Triton gave a `KIND_GPU` instance, else the first GPU, else the CPU), or `cpu`, `cuda:N`.",
    "local_files_only": "Never download: weights must be in the Hugging Face cache (`HF_HOME`) or a local path.",
    "variant": "Weight file variant to load, e.g. `fp16`.",
    "enable_image_to_image": "Also serve image-to-image (requests with `IMAGE`) through `AutoPipelineForImage2Image`.",
    "torch_num_threads": "CPU threads for torch in this instance; 0 leaves torch's default (with `parallel` on the CPU: the cores divided by the processes).",
    "default_height": "Output height when a request sends none (or 0).",
    "default_width": "Output width when a request sends none (or 0).",
    "default_steps": "Denoising steps when a request sends none.",
    "default_guidance_scale": "Guidance scale when a request sends none.",
    "default_strength": "Image-to-image strength when a request sends none.",
    "default_num_frames": "Video models: frames per video when a request sends no `NUM_FRAMES`; 0 marks an image model "
                          "(output `IMAGE`), more than 0 a video model (output `VIDEO`, input `NUM_FRAMES`).",
    "max_sequence_length": "Text tokens the pipeline encodes (its `max_sequence_length`); 0: the pipeline's default.",
    "size_multiple": "Height and width must be multiples of this.",
    "min_side": "Smallest height or width a request may ask for.",
    "max_side": "Largest height or width a request may ask for.",
    "max_pixels": "Most output pixels (height x width) per image; 0: `max_side` x `max_side`.",
    "allowed_sizes": "If set (`\"512x512,768x512\"`, height x width), the only sizes served.",
    "max_steps": "Most denoising steps a request may ask for.",
    "max_num_frames": "Video models: most frames a request may ask for.",
    "max_guidance_scale": "Largest guidance scale a request may ask for.",
    "max_prompt_bytes": "Longest prompt (UTF-8 bytes) accepted.",
    "max_input_image_pixels": "Largest image-to-image source image (pixels) accepted.",
    "max_pixels_per_call": "Memory budget of one pipeline call: images x height x width.",
    "max_images_per_call": "Most images in one pipeline call.",
    "cancellation_poll_interval_ms": "How often a running call asks Triton whether its requests were cancelled; 0: every step.",
    "progress_interval_ms": "Continuous mode: how often a request that asks for progress (request parameter `progress`) "
                            "gets a `PROGRESS` response (steps done, steps in all, per row): a progress bar, and the "
                            "sign of life a client's stall timeout waits for.",
    "parallel": "The instance spans N devices (its own and the N-1 after it; on the CPU, N processes), each running the whole pipeline: `cfg=N` divides every denoiser call's rows (with N=2, one device takes the unconditional half of a guidance call, the other the conditional half); `ulysses=N` divides every sequence (diffusers' context parallelism; FLUX.1). Not with continuous batching, `lora_dir` or `step_cache`; a cancelled row is dropped at the end of its call. Empty: one device.",
    "batching": "`dynamic`: one pipeline call per batch Triton forms. `continuous`: a running batch that requests join at "
                "the next denoising step (families with a step adapter: FLUX.1, SD3.5, Qwen-Image, Z-Image, SD 1.5/2.x; "
                "the backend declares the model decoupled).",
    "speed_devices": "Device types the speed knobs apply on (default `cuda`); elsewhere they are ignored and logged.",
    "compile": "`off`, `regional` (diffusers' `compile_repeated_blocks`) or `full` (the whole denoiser).",
    "compile_mode": "torch.compile mode: empty (default), `reduce-overhead` (CUDA graphs), `max-autotune`, ...",
    "compile_dynamic": "torch.compile `dynamic=`: `auto` (a dimension that changes becomes dynamic), `true`, `false` (static).",
    "compile_vae": "Also compile the VAE decoder.",
    "compile_backend": "torch.compile backend (`inductor`; tests use `eager`).",
    "channels_last": "UNet and VAE in channels-last memory format.",
    "fuse_qkv": "diffusers' `fuse_qkv_projections` on the denoiser (the separate projections it keeps are dropped).",
    "attention_backend": "diffusers' `set_attention_backend` on the denoiser: `native`, `_native_cudnn`, `flash`, ...",
    "vae_slicing": "Decode one image at a time (memory).",
    "vae_tiling": "Decode in tiles (memory at large sizes).",
    "step_cache": "A diffusers step cache, e.g. `\"FirstBlockCache threshold=0.05\"`; changes images. FirstBlockCache decides "
                  "per row (a batched request equals itself alone); the other caches decide per batch, so batched may differ from alone.",
    "quantization": "`fp8` (torchao float8 weights and activations, per-row scales: the denoiser's linear layers; CUDA "
                    "compute capability 8.9+), `fp8_weight_only` (float8 weights, any device; memory, not speed), or empty.",
    "fp8_max_relative_error": "The fidelity guard at load: a fixed-seed call at the default size and steps, quantized against "
                              "unquantized; a relative L2 difference of the latents above this (or NaN/inf) fails the load.",
    "fp8_fallback": "A model failing the fidelity guard, or on a device that cannot run `quantization`, loads unquantized "
                    "with a WARNING instead of failing to load.",
    "fp8_skip": "Comma-separated name patterns of denoiser layers kept unquantized, beyond the family's own list.",
    "batched_cfg": "Where the pipeline runs classifier-free guidance as two denoiser calls per step (Qwen-Image, Wan), "
                   "run them as one call of twice the rows from the second step on (not under a step cache or "
                   "`compile: full`). Off by default: measured slower for compiled Qwen-Image, see docs/benchmarks.md.",
    "batch_buckets": "Pad each call up to the nearest of these batch sizes (static or CUDA-graph shapes); empty: no padding.",
    "warmup_batch_sizes": "Batch sizes run before READY; default: `batch_buckets`, or 1, 2 and `max_images_per_call` when compiling (continuous: every row count up to `max_images_per_call`).",
    "warmup_sizes": "Sizes run before READY; default: the default size and `allowed_sizes`.",
    "warmup_guidance_scales": "Guidance scales run before READY; default: the default guidance.",
    "lora_dir": "A folder of LoRA adapters (`NAME/` as diffusers saves them, or `NAME.safetensors`, in any format "
                "diffusers' loaders read; `{repo}`, `{cache}`, `~` and `$VARS` expand as in `pretrained_model`); "
                "requests name one in `LORA`. Read on first use, so a new file serves without a restart. Empty: the "
                "model takes no adapters.",
    "max_loaded_loras": "Adapters kept loaded on the device; the least recently used is evicted beyond this.",
    "max_lora_rank": "An adapter of a higher rank is refused (the bank pads every adapter to this rank).",
    "max_lora_scale": "`LORA_SCALE` may be within [0, this].",
    "lora_batching": "`mixed`: rows with different adapters (and none) share one call, each layer adding each row's own "
                     "update; `grouped`: one adapter per call (for comparison).",
    "warmup_num_frames": "Video models: clip lengths run before READY (each a compiled shape); default: `default_num_frames`. "
                         "A request with another NUM_FRAMES compiles while serving.",
}


def parameters_markdown() -> str:
    """The README's table of every ``config.pbtxt`` parameter, its default and what it does."""
    def shown(value) -> str:
        if isinstance(value, tuple):
            return ",".join("x".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value) or "(empty)"
        if isinstance(value, bool):
            return str(value).lower()
        return str(value) if value != "" else "(empty)"

    lines = ["| parameter | default | meaning |", "|---|---|---|"]
    for name, (_, field) in PARAMETERS.items():
        lines.append(f"| `{name}` | {shown(field.default)} | {PARAMETER_DOCS[name]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(parameters_markdown())
