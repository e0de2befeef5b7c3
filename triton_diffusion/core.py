"""What both serving modes share, each written once and pure (no Triton, no torch): a request's
outcome and the response it becomes, the checks a parsed request must pass before it is served,
and how often a running call asks Triton whether its requests were cancelled.

``executor.py`` (dynamic batching: one execution's requests through pipeline calls) and
``continuous.py`` (continuous batching: rows joining a running batch) produce these outcomes;
``backend.py`` turns them into Triton responses with ``response_error``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np

from .requests import GenerationItem, ParsedRequest, ParseResult, RequestError


@dataclass(frozen=True)
class Images:
    """The request succeeded: one image per row, with the seed each was made with."""

    images: tuple[np.ndarray, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Rejected:
    """The request is invalid (INVALID_ARG); nothing ran for it."""

    message: str


@dataclass(frozen=True)
class Failed:
    """A call holding the request's rows failed (INTERNAL); the message names the cause."""

    message: str


@dataclass(frozen=True)
class Cancelled:
    """The client cancelled the request before its images were finished."""


Outcome = Union[Images, Rejected, Failed, Cancelled]
CANCELLED = Cancelled()


class AdaptersUnavailable(Exception):
    """Adapters a call's rows name could not be read when the call was about to run (a file removed
    after the request was admitted): the rows naming them are refused (INVALID_ARG), their
    batch-mates run without them. ``reasons``: adapter name -> why."""

    def __init__(self, reasons: dict[str, str]):
        super().__init__("; ".join(reasons.values()))
        self.reasons = dict(reasons)

    def refusal(self, item: GenerationItem) -> Optional[Rejected]:
        """The row's refusal, or None where its adapter (or none) is fine."""
        return Rejected(self.reasons[item.lora]) if item.lora in self.reasons else None


def guidance_passes(batch: int, rows: int) -> Optional[int]:
    """How many times a denoiser call of ``batch`` rows holds each of ``rows`` request rows: 1, or 2
    where both guidance passes run in one call (each half in request order); None for another size.
    (Per-row state of a call, a row's step-cache opt-in or its adapter, is laid over the call's rows
    by this rule.)"""
    if batch == rows:
        return 1
    if batch == 2 * rows:
        return 2
    return None

# Names of Triton's error codes (``pb_utils.TritonError.<name>``), the same for both modes: the
# stream of a continuous model carries the codes a dynamic model's unary answer does.
INVALID_ARG, CANCELLED_CODE, INTERNAL = "INVALID_ARG", "CANCELLED", "INTERNAL"


def response_error(outcome: Outcome) -> Optional[tuple[str, str]]:
    """``(code, message)`` of the error response ``outcome`` becomes; None for images."""
    if isinstance(outcome, Images):
        return None
    if isinstance(outcome, Rejected):
        return INVALID_ARG, outcome.message
    if isinstance(outcome, Cancelled):
        return CANCELLED_CODE, "request cancelled"
    assert isinstance(outcome, Failed), outcome
    return INTERNAL, outcome.message


def admit(result: ParseResult, *checks: Callable[[GenerationItem], Optional[str]]) -> ParseResult:
    """``result``, or a ``RequestError`` with the first reason a check gives for one of its items
    (what the pipeline, or the step adapter, cannot serve)."""
    if isinstance(result, ParsedRequest):
        for item in result.items:
            for check in checks:
                reason = check(item)
                if reason:
                    return RequestError(reason)
    return result


class PollClock:
    """Asking Triton whether a request was cancelled costs IPC per request, on the thread that
    launches the GPU work: ``due()`` is true at most once per ``interval_s`` (0: every time)."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.perf_counter, start_due: bool = False):
        self.interval_s = interval_s
        self.clock = clock
        self.last = float("-inf") if start_due else clock()

    def due(self) -> bool:
        now = self.clock()
        if now - self.last < self.interval_s:
            return False
        self.last = now
        return True
