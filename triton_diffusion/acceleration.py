"""Speed knobs of a loaded pipeline, read from ``config.pbtxt`` and applied once at load.

Each knob calls what diffusers or torch already offer; nothing here reimplements a kernel:

- ``channels_last``: UNet and VAE weights in channels-last memory format (convolutions without
  layout transposes).
- ``fuse_qkv``: diffusers' ``fuse_qkv_projections`` (one GEMM for query, key and value).
- ``attention_backend``: diffusers' ``set_attention_backend`` on the denoiser (``native``,
  ``_native_cudnn``, ``flash``..., whatever the installed torch and packages offer).
- ``vae_slicing`` / ``vae_tiling``: decode one image / one tile at a time (memory at 1024 and up).
- ``step_cache``: one of diffusers' step-cache configs (``FirstBlockCache``, ``MagCache``,
  ``TaylorSeerCache``...) on the denoiser. It skips computation, so images change. ``FirstBlockCache``
  runs as ``row_cache.py``'s per-row version (a batched image equals the same request alone); the
  others decide per call from the whole batch, so a batched image can differ from the request alone.
- ``quantization``: torchao fp8 on the denoiser's linear layers, kept only if a fixed-seed call
  passes the fidelity guard (quantization.py).
- ``compile``: ``torch.compile`` of the denoiser, ``regional`` (diffusers'
  ``compile_repeated_blocks``: the repeated transformer blocks, compiled once and reused) or
  ``full`` (the whole module); ``compile_vae`` adds the VAE decoder.

Compiled graphs are specialised to shapes. ``warm_up`` (pipeline.py) runs every planned batch size
and size before the model reports READY; ``compiled_graphs()`` counts graphs and
``cuda_graph_recordings()`` the CUDA graphs ``compile_mode: reduce-overhead`` records, so that either
happening while serving shows on the metrics port.
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable, Optional, Sequence

from . import row_cache
from .quantization import Fidelity, QuantizationRefused, quantize, relative_error
from .settings import SpeedSettings

log = logging.getLogger(__name__)

# Enough cached graphs for every warmed (batch, size) of a model: torch's default (8) would make
# dynamo give up compiling (and run eagerly) after the eighth shape of one function.
_RECOMPILE_LIMIT = 64


class SpeedSettingError(ValueError):
    """A speed knob cannot be applied to this pipeline; the message says which and why."""


def denoiser_name(pipe) -> str:
    """The pipeline's attribute that holds the module run once per denoising step: ``transformer`` or ``unet``
    (also the prefix of its weights in a LoRA file)."""
    for name in ("transformer", "unet"):
        if getattr(pipe, name, None) is not None:
            return name
    raise SpeedSettingError(f"{type(pipe).__name__} has neither a transformer nor a unet")


def denoiser_of(pipe):
    """The module run once per denoising step (``transformer`` or ``unet``)."""
    return getattr(pipe, denoiser_name(pipe))


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The batch size a call of ``rows`` rows runs at: the smallest bucket that holds it (no buckets: ``rows``)."""
    fitting = [bucket for bucket in buckets if bucket >= rows]
    return min(fitting) if fitting else rows


def step_cache_config(text: str):
    """``"FirstBlockCache threshold=0.05"`` -> ``diffusers.FirstBlockCacheConfig(threshold=0.05)``."""
    import diffusers

    name, *pairs = text.split()
    cls = getattr(diffusers, name if name.endswith("Config") else f"{name}Config", None)
    if cls is None or "Cache" not in cls.__name__:
        known = sorted(n.removesuffix("Config") for n in dir(diffusers) if n.endswith("CacheConfig") or n == "PyramidAttentionBroadcastConfig")
        raise SpeedSettingError(f"step_cache {name!r} is not a diffusers cache config; known: {', '.join(known)}")
    accepted = set(inspect.signature(cls).parameters)
    kwargs = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        if key not in accepted:
            raise SpeedSettingError(f"step_cache {name}: {key!r} is not one of its options {sorted(accepted)}")
        kwargs[key] = _literal(raw)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SpeedSettingError(f"step_cache {text!r}: {exc}") from None


def _literal(raw: str):
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (each new shape that does not fit an
    existing graph adds one)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


_cuda_graphs_recorded = 0
_counting_cuda_graphs = False


def cuda_graph_recordings() -> int:
    """CUDA graphs torch.compile has recorded in this process so far (``mode=reduce-overhead``: one per
    new shape or new path through the graph tree; each costs a capture and pins its memory pool).

    Counted through dynamo's compile-start callbacks, which torch's CUDA-graph trees fire with the
    ``CUDAGRAPH_RECORDING`` trigger before every recording; the count starts at the first call."""
    global _counting_cuda_graphs
    if not _counting_cuda_graphs:
        try:
            from torch._dynamo.callback import CallbackTrigger, callback_handler
        except ImportError:
            return 0

        def count(args) -> None:
            global _cuda_graphs_recorded
            if args.callback_trigger == CallbackTrigger.CUDAGRAPH_RECORDING:
                _cuda_graphs_recorded += 1

        callback_handler.register_start_callback(count)
        _counting_cuda_graphs = True
    return _cuda_graphs_recorded


def drop_unfused_projections(denoiser) -> int:
    """Delete the separate projections that ``fuse_qkv_projections`` keeps beside the fused ones
    (no forward uses them once fused: FLUX.1-dev's are ~2B parameters, 4 GB in bf16, which fp8
    would also quantize); returns the parameters freed. A self-attention's query, key and value
    live on in ``to_qkv``; a cross-attention fuses only key and value (``to_kv``), so its query stays."""
    import torch

    freed = 0
    for module in list(denoiser.modules()):
        if not getattr(module, "fused_projections", False):
            continue
        unused = []
        if getattr(module, "to_qkv", None) is not None:
            unused += ["to_q", "to_k", "to_v"]
        elif getattr(module, "to_kv", None) is not None:
            unused += ["to_k", "to_v"]
        if getattr(module, "to_added_qkv", None) is not None:
            unused += ["add_q_proj", "add_k_proj", "add_v_proj"]
        for name in unused:
            layer = getattr(module, name, None)
            if isinstance(layer, torch.nn.Module):
                freed += sum(parameter.numel() for parameter in layer.parameters())
                delattr(module, name)
    return freed


def apply_speed_settings(pipe, speed: SpeedSettings, probe: Optional[Callable[[], object]] = None,
                         fp8_skip: Sequence[str] = (), cache_block_arguments: tuple = ()) -> list[str]:
    """Apply the model's speed knobs to ``pipe`` in place; returns what was applied, for the log.

    ``probe`` runs one fixed-seed call and returns its latents (the fidelity guard of ``quantization``);
    ``fp8_skip``: the family's layers kept unquantized; ``cache_block_arguments``: its transformer
    block's hidden-states and token-mask arguments where diffusers' registry has them wrong. Raises
    ``QuantizationRefused`` when the quantized model fails the guard or the device cannot run it.

    Order matters: memory format and fused projections change the modules that quantization and
    compile see; the guard's calls run eager, before compiling; a cache hook must be in place
    before compiling so that the graphs include it.
    """
    import torch

    applied: list[str] = []
    denoiser = denoiser_of(pipe)
    vae = getattr(pipe, "vae", None)
    if speed.channels_last:
        for module in (getattr(pipe, "unet", None), vae):
            if module is not None:
                module.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if speed.fuse_qkv:
        if not hasattr(denoiser, "fuse_qkv_projections"):
            raise SpeedSettingError(f"fuse_qkv: {type(denoiser).__name__} has no fuse_qkv_projections")
        denoiser.fuse_qkv_projections()
        freed = drop_unfused_projections(denoiser)
        applied.append(f"fused QKV (separate projections dropped: {freed:,} parameters)" if freed else "fused QKV")
    if speed.attention_backend:
        if not any(hasattr(getattr(m, "processor", None), "_attention_backend") for m in denoiser.modules()):
            raise SpeedSettingError(
                f"attention_backend: {type(denoiser).__name__}'s attention does not go through diffusers' attention "
                "dispatcher, so set_attention_backend would change nothing (leave attention_backend empty)"
            )
        try:
            denoiser.set_attention_backend(speed.attention_backend)
        except (ValueError, RuntimeError) as exc:
            raise SpeedSettingError(f"attention_backend={speed.attention_backend!r}: {exc}") from None
        applied.append(f"attention {speed.attention_backend}")
    if speed.vae_slicing or speed.vae_tiling:
        if vae is None:
            raise SpeedSettingError("vae_slicing/vae_tiling: this pipeline has no vae")
        if speed.vae_slicing:
            vae.enable_slicing()
            applied.append("VAE slicing")
        if speed.vae_tiling:
            vae.enable_tiling()
            applied.append("VAE tiling")
    if speed.quantization:
        applied.append(_quantize_guarded(denoiser, speed, probe, tuple(fp8_skip) + speed.fp8_skip))
    if speed.step_cache:
        config = step_cache_config(speed.step_cache)
        per_row = row_cache.decides_per_row(speed.step_cache)
        if not per_row and not hasattr(denoiser, "enable_cache"):
            raise SpeedSettingError(f"step_cache: {type(denoiser).__name__} takes no diffusers cache hooks "
                                    f"(only the per-row FirstBlockCache applies to it)")
        try:
            if per_row:
                row_cache.apply(denoiser, config.threshold, cache_block_arguments)
            else:
                denoiser.enable_cache(config)
        except ValueError as exc:
            raise SpeedSettingError(f"step_cache={speed.step_cache!r}: {exc}") from None
        applied.append(f"step cache {speed.step_cache}" + (" (decided per row)" if per_row else ""))
    if speed.compiles:
        applied += _compile(denoiser, vae, speed)
    return applied


def _quantize_guarded(denoiser, speed: SpeedSettings, probe, skip: tuple[str, ...]) -> str:
    """Quantize the denoiser, judged by the guard when there is a probe; what was done, for the log."""
    reference = probe() if probe is not None else None
    try:
        layers = quantize(denoiser, speed.quantization, skip)
    except QuantizationRefused:
        raise
    except ValueError as exc:
        raise SpeedSettingError(str(exc)) from None
    done = (f"{speed.quantization} on {layers} linear layers of {type(denoiser).__name__}"
            + (f" (kept unquantized: {', '.join(skip)})" if skip else ""))
    if reference is None:
        return done + ", no fidelity check"
    fidelity = Fidelity(relative_error(reference, probe()), speed.fp8_max_relative_error)
    problem = fidelity.problem(speed.quantization)
    if problem:
        raise QuantizationRefused(problem, fidelity)
    return f"{done}, {fidelity.describe()}"


def _compile(denoiser, vae, speed: SpeedSettings) -> list[str]:
    import torch

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    options: dict = {"backend": speed.compile_backend,
                     "dynamic": {"auto": None, "true": True, "false": False}[speed.compile_dynamic]}
    if speed.compile_mode:
        options["mode"] = speed.compile_mode
    described = ", ".join(f"{key}={value}" for key, value in options.items())
    applied = []
    if speed.compile == "regional":
        try:
            # A step cache decides on the host whether to run a block (a graph break by design).
            denoiser.compile_repeated_blocks(fullgraph=not speed.step_cache, **options)
        except (ValueError, AttributeError) as exc:
            raise SpeedSettingError(f"compile=regional: {exc} (use compile=full for {type(denoiser).__name__})") from None
        applied.append(f"compiled repeated blocks of {type(denoiser).__name__} ({described})")
    elif speed.compile == "full":
        denoiser.compile(**options)
        applied.append(f"compiled {type(denoiser).__name__} ({described})")
    if speed.compile_vae:
        if vae is None:
            raise SpeedSettingError("compile_vae: this pipeline has no vae")
        vae.decoder.compile(**options)
        applied.append(f"compiled {type(vae).__name__} decoder")
    return applied


def reset_step_cache(pipe) -> None:
    """Forget a step cache's state: a call that raised or was interrupted never reset it, and the
    next call (another batch size) must not start from it."""
    denoiser = denoiser_of(pipe)
    row_cache.reset(denoiser)
    if getattr(denoiser, "is_cache_enabled", False) and hasattr(denoiser, "_reset_stateful_cache"):
        denoiser._reset_stateful_cache()
