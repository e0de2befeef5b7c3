"""Quantization of the denoiser's linear layers (torchao), and the fidelity guard that decides at load
whether the quantized model may serve.

- ``fp8``: torchao's ``Float8DynamicActivationFloat8WeightConfig`` with per-row scales: weights and
  activations in float8 e4m3, GEMMs on the tensor cores' fp8 path. Needs CUDA compute capability
  8.9 or more (Ada, Hopper, Blackwell); the speed knob.
- ``fp8_weight_only``: torchao's ``Float8WeightOnlyConfig``: weights stored in float8 and computed in
  the model's dtype. Runs on any device (the CPU tests use it); saves weight memory, not time.

A layer is quantized when it is an ``nn.Linear`` whose in and out features are multiples of 16 (what
the fp8 kernels take) and whose qualified name contains none of the skip patterns (the family's
``fp8_skip``, which names layers measured to overflow, plus the model's ``fp8_skip`` parameter).

The guard: before quantizing, one fixed-seed call at the model's default size and steps returns its
latents; after quantizing, the same call again. ``Fidelity`` judges the pair: non-finite latents, or
a relative L2 difference above ``fp8_max_relative_error``, fail the load with a message naming the
number. A device that cannot run the method fails it too. With ``fp8_fallback`` either becomes a
WARNING and the model loads unquantized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

QUANTIZATION_CHOICES = ("", "fp8", "fp8_weight_only")
# What the fp8 GEMM kernels take: both dimensions of a weight multiples of 16.
_FP8_MULTIPLE = 16


@dataclass(frozen=True)
class Fidelity:
    """How far a quantized call's latents are from the unquantized call's, for the same seed."""

    relative_error: float  # ||quantized - reference|| / ||reference||; nan or inf when not finite
    bound: float  # fp8_max_relative_error

    @property
    def finite(self) -> bool:
        return math.isfinite(self.relative_error)

    def problem(self, method: str) -> Optional[str]:
        """Why the quantized model must not serve, or None."""
        advice = ("keep quantization off, add the layers that overflow to fp8_skip, or set fp8_fallback to serve "
                  "unquantized with a warning")
        if not self.finite:
            return (f"quantization={method} failed its fidelity check: a fixed-seed call gave non-finite (NaN/inf) "
                    f"latents; {advice}")
        if self.relative_error > self.bound:
            return (f"quantization={method} failed its fidelity check: the latents of a fixed-seed call differ from "
                    f"the unquantized model's by {self.relative_error:.2%} (relative L2), above "
                    f"fp8_max_relative_error={self.bound:g}; {advice}")
        return None

    def describe(self) -> str:
        return f"relative error {self.relative_error:.2%} (bound {self.bound:.2%})"


class QuantizationRefused(ValueError):
    """The quantized model cannot serve: it failed the fidelity guard (``fidelity`` holds the
    measurement), or this device cannot run the method (``fidelity`` is None). ``fp8_fallback``
    turns either into a warning and an unquantized model."""

    def __init__(self, message: str, fidelity: Optional[Fidelity] = None):
        super().__init__(message)
        self.fidelity = fidelity


def relative_error(reference, candidate) -> float:
    """Relative L2 difference of two latent tensors, in float64; inf where ``candidate`` is not finite."""
    import torch

    reference, candidate = reference.double(), candidate.double()
    if not bool(torch.isfinite(candidate).all()):
        return math.inf
    norm = float(reference.norm())
    return float((candidate - reference).norm()) / norm if norm else float((candidate - reference).norm())


def skipped(name: str, skip: Iterable[str]) -> bool:
    """Whether the layer named ``name`` (its qualified name in the denoiser) stays unquantized."""
    return any(pattern and pattern in name for pattern in skip)


def quantizable_layers(denoiser, skip: Sequence[str]) -> list[str]:
    """Qualified names of the linear layers ``quantize`` would convert."""
    import torch

    return [name for name, module in denoiser.named_modules()
            if isinstance(module, torch.nn.Linear) and not skipped(name, skip)
            and module.in_features % _FP8_MULTIPLE == 0 and module.out_features % _FP8_MULTIPLE == 0]


def torchao_config(method: str):
    """The torchao config object of ``method``."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow

    # set_inductor_config=False: torchao's default turns on inductor's coordinate-descent tuning for
    # the whole process, which autotunes every kernel of every graph: most of an fp8 warm-up
    # (docs/benchmarks.md, "Prompt lengths and the warm-up"). TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1
    # turns it back on for whoever wants to pay that at start-up.
    if method == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    if method == "fp8_weight_only":
        return Float8WeightOnlyConfig(set_inductor_config=False)
    raise ValueError(f"quantization={method!r} must be one of {', '.join(repr(c) for c in QUANTIZATION_CHOICES)}")


def quantize(denoiser, method: str, skip: Sequence[str]) -> int:
    """Quantize ``denoiser``'s qualifying linear layers in place; returns how many."""
    try:
        from torchao.quantization import quantize_
    except ImportError as exc:
        raise ValueError(f"quantization={method} needs torchao (pinned in requirements.txt): {exc}") from None
    names = set(quantizable_layers(denoiser, skip))
    if not names:
        raise ValueError(f"quantization={method}: no linear layer of {type(denoiser).__name__} qualifies "
                         f"(features multiples of {_FP8_MULTIPLE}, not matched by fp8_skip={list(skip)})")
    try:
        quantize_(denoiser, torchao_config(method), filter_fn=lambda module, name: name in names)
    except (AssertionError, RuntimeError, NotImplementedError) as exc:  # torchao's hardware checks are asserts
        raise QuantizationRefused(f"quantization={method} cannot run here: {exc}") from None
    return len(names)
