"""Batched classifier-free guidance for pipelines that run it as two denoiser calls per step.

Qwen-Image's and Wan's ``__call__`` call the transformer twice per step: once under
``cache_context("cond")`` with the prompts, then under ``cache_context("uncond")`` with the negative
prompts, on the same latents. Two calls of B rows cost more than one of 2B (each launches every
kernel; at small sizes a step is launch-bound). A diffusers hook on the transformer pairs them:

- at the first step it lets both calls through and keeps references to the unconditional call's
  conditioning (the arguments the family names: the negative prompt embeddings, their mask);
- from then on the "cond" call runs the transformer once on ``[cond rows; uncond rows]`` (the family
  merges the two conditionings, e.g. captions of different lengths padded under one mask; every
  other batch-sized argument is repeated) and returns the first half; the "uncond" call that follows
  gets the second half without running anything, provided it is the same step's call (the same
  latents object, the same conditioning objects as recorded). Anything else runs as the pipeline
  wrote it, so a surprise costs time, never a wrong image.

The pairs equal the pipeline's own passes within floating-point noise (``tests/test_paired_cfg.py``).
Not under a step cache (its per-pass state is keyed by the cond/uncond context) nor under
``compile: full`` (dynamo would trace this hook's bookkeeping). ``batched_cfg`` is off by default:
eager Qwen-Image at 512x512 halves its step time paired, but compiled Qwen-Image measured slower
paired at 512 and 1024 (docs/benchmarks.md, "Batched guidance passes").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

HOOK_NAME = "triton_diffusion.paired_cfg"


@dataclass(frozen=True)
class CfgPairing:
    """What a family declares for its two-pass guidance: the denoiser arguments that differ between the
    conditional and unconditional calls, and how two sets of them become one batch."""

    conditioning: tuple[str, ...]
    # (cond values, uncond values) by name -> the values of one call over [cond rows; uncond rows];
    # default: each concatenated along the batch (equal shapes)
    merge: Optional[Callable[[dict, dict], dict]] = None

    def merged(self, cond: dict, uncond: dict) -> Optional[dict]:
        """One call's conditioning for [cond rows; uncond rows]; None where the default merge cannot
        concatenate them (the passes then run apart)."""
        if self.merge is not None:
            return self.merge(cond, uncond)
        import torch

        if any((cond[name] is None) != (uncond[name] is None)
               or (cond[name] is not None and cond[name].shape != uncond[name].shape) for name in self.conditioning):
            return None
        return {name: None if cond[name] is None else torch.cat([cond[name], uncond[name]]) for name in self.conditioning}


def _batch_of(kwargs: dict) -> int:
    return kwargs["hidden_states"].shape[0]


def _doubled(value, rows: int):
    """A batch-sized argument for [cond rows; uncond rows]: tensors and lists of ``rows`` repeated."""
    import torch

    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return torch.cat([value, value])
    if isinstance(value, list) and len(value) == rows:
        return value * 2
    return value


def _halves(output, rows: int):
    """The paired call's output -> (cond output, uncond output), each shaped as a single call's."""
    if isinstance(output, tuple):
        return (output[0][:rows], *output[1:]), (output[0][rows:], *output[1:])
    return type(output)(sample=output.sample[:rows]), type(output)(sample=output.sample[rows:])


@dataclass
class _Pending:
    """The unconditional half of a paired call, waiting for the step's "uncond" call."""

    hidden_states: Any
    conditioning: dict
    output: Any


@dataclass
class PairingStats:
    paired: int = 0  # denoiser calls that ran both passes
    served: int = 0  # "uncond" calls answered from a paired call
    unpaired: int = 0  # calls let through (the first step, or anything unexpected)


class PairedGuidance:
    """The pairing decisions, per call of the denoiser; ``install`` puts them behind a diffusers hook
    (``forward`` gets the running pass's name from ``cache_context``: "cond", "uncond" or None)."""

    def __init__(self, pairing: CfgPairing):
        self.pairing = pairing
        self.stats = PairingStats()
        self._negative: Optional[dict] = None  # the uncond pass's conditioning, recorded at the first step
        self._negative_rows = 0
        self._pending: Optional[_Pending] = None

    def reset(self) -> None:
        """Forget the recorded conditioning: each pipeline call records its own."""
        self._negative, self._negative_rows, self._pending = None, 0, None

    def forward(self, original: Callable, pass_name: Optional[str], args: tuple, kwargs: dict):
        if args or pass_name not in ("cond", "uncond") or "hidden_states" not in kwargs:
            return original(*args, **kwargs)
        if pass_name == "cond":
            self._pending = None
            if self._negative is not None and self._negative_rows == _batch_of(kwargs):
                merged = self.pairing.merged({key: kwargs.get(key) for key in self.pairing.conditioning}, self._negative)
                if merged is not None:
                    return self._paired(original, kwargs, merged)
        elif self._pending is not None and self._answers(kwargs):
            output, self._pending = self._pending.output, None
            self.stats.served += 1
            return output
        else:  # an unconditional pass that was not paired: run it, and pair from the next step on
            self._pending = None
            self._negative = {key: kwargs.get(key) for key in self.pairing.conditioning}
            self._negative_rows = _batch_of(kwargs)
        self.stats.unpaired += 1
        return original(**kwargs)

    def _answers(self, kwargs: dict) -> bool:
        """Whether this uncond pass is the one the pending half was computed for."""
        pending = self._pending
        return kwargs["hidden_states"] is pending.hidden_states and all(
            kwargs.get(key) is value for key, value in pending.conditioning.items())

    def _paired(self, original: Callable, kwargs: dict, merged: dict):
        rows = _batch_of(kwargs)
        paired = {key: _doubled(value, rows) for key, value in kwargs.items() if key not in self.pairing.conditioning}
        paired.update(merged)
        cond_output, uncond_output = _halves(original(**paired), rows)
        self._pending = _Pending(kwargs["hidden_states"], self._negative, uncond_output)
        self.stats.paired += 1
        return cond_output


def install(denoiser, pairing: CfgPairing) -> PairedGuidance:
    """Register the pairing on ``denoiser`` (a diffusers model with ``cache_context``) as a diffusers hook."""
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.hooks.hooks import BaseState, StateManager

    class _NoState(BaseState):
        def reset(self, *args, **kwargs) -> None:
            pass

    decisions = PairedGuidance(pairing)

    class _Hook(ModelHook):
        _is_stateful = True  # so that diffusers' cache_context sets the StateManager below

        def __init__(self):
            super().__init__()
            self.passes = StateManager(_NoState)

        def new_forward(self, module, *args, **kwargs):
            context = self.passes._context
            return decisions.forward(self.fn_ref.original_forward, None if context is None else context.name, args, kwargs)

        def reset_state(self, module):
            decisions.reset()
            return module

    HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(_Hook(), HOOK_NAME)
    return decisions


def why_unpaired(pairing: Optional[CfgPairing], enabled: bool, step_cache: str, compile: str) -> Optional[str]:
    """Why a model runs its guidance passes as the pipeline wrote them; None: they are paired."""
    if pairing is None:
        return "its pipeline batches the guidance passes itself, or has none"
    if not enabled:
        return "batched_cfg is off"
    if step_cache:
        return "a step cache keeps separate state per guidance pass"
    if compile == "full":
        return "compile=full would trace the pairing hook (compile=regional does not)"
    return None
