"""Run one Triton execution's requests: plan calls, run them, halve on out-of-memory, map outcomes.

Pure (no ``pb_utils``, no torch): it is given the parsed requests, a pipeline-call function and a
"was this request cancelled?" check per request, and returns one ``Outcome`` per request, in order.
Every actual pipeline call is reported once through ``on_call`` (an out-of-memory attempt and
each retry of its halves are separate calls).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from .batching import CallBudget, Chunk, plan_batches
from .core import CANCELLED, AdaptersUnavailable, Failed, Images, Outcome, PollClock, Rejected
from .requests import CallParams, GenerationItem, ParsedRequest, ParseResult, RequestError

log = logging.getLogger(__name__)

RowRef = tuple[int, int]  # (request index in the execution, row inside that request)


OK, OUT_OF_MEMORY, FAILED = "ok", "out_of_memory", "failed"


@dataclass(frozen=True)
class CallReport:
    """One actual pipeline call."""

    params: CallParams
    rows: int
    seconds: float
    result: str  # OK, OUT_OF_MEMORY or FAILED
    rows_dropped: int = 0  # rows that left the call mid-denoise because their request was cancelled
    steps: int = 0  # denoising steps the call ran (cancellation polls)
    poll_seconds: float = 0.0  # time spent asking whether requests were cancelled


class PipelineCall(Protocol):
    """Runs rows of equal ``params`` in one call; None marks a row dropped because it was cancelled.

    ``cancelled_rows(live)`` (call it once per denoising step) returns which of the ``live`` row
    positions belong to cancelled requests.
    """

    def __call__(
        self, params: CallParams, items: Sequence[GenerationItem], cancelled_rows: Callable[[Sequence[int]], set]
    ) -> Sequence[Optional[np.ndarray]]: ...


class RequestPoll:
    """``cancelled_rows`` for one call: asks each live *request* (however many rows it has) at most
    once per ``interval_s`` (0: every step); asking Triton costs IPC per request, on the CPU thread
    that launches the GPU work."""

    def __init__(self, row_requests: Sequence[int], is_cancelled: Sequence[Callable[[], bool]], on_step: Callable[[], None],
                 interval_s: float = 0.0):
        self.row_requests = list(row_requests)
        self.is_cancelled = is_cancelled
        self.on_step = on_step
        self.clock = PollClock(interval_s)
        self.steps = 0
        self.seconds = 0.0

    def __call__(self, live_rows: Sequence[int]) -> set[int]:
        started = time.perf_counter()
        self.steps += 1
        self.on_step()
        if not self.clock.due():
            return set()
        requests = dict.fromkeys(self.row_requests[row] for row in live_rows)
        gone = {request for request in requests if self.is_cancelled[request]()}
        self.seconds += time.perf_counter() - started
        return {row for row in live_rows if self.row_requests[row] in gone}


def _no_op(*_args) -> None:
    return None


class Executor:
    """Plans and runs the pipeline calls of one execution; see the module docstring."""

    def __init__(
        self,
        call: PipelineCall,
        budget: CallBudget,
        is_out_of_memory: Callable[[BaseException], bool],
        on_call: Callable[[CallReport], None] = _no_op,
        on_step: Callable[[], None] = _no_op,
        on_plan: Callable[[list[Chunk]], None] = _no_op,
        poll_interval_s: float = 0.0,
        ready: Callable[[GenerationItem], bool] = lambda item: True,
    ):
        self.call = call
        self.budget = budget
        self.is_out_of_memory = is_out_of_memory
        self.on_call = on_call
        self.on_step = on_step
        self.on_plan = on_plan
        self.poll_interval_s = poll_interval_s
        self.ready = ready  # False: the row waits for something (its adapter being read): its call runs last

    def run(self, parsed: Sequence[ParseResult], is_cancelled: Sequence[Callable[[], bool]],
            on_outcome: Callable[[int, Outcome], None] = _no_op) -> list[Outcome]:
        """One outcome per request, in order. ``is_cancelled[i]()`` asks whether request i was cancelled.
        ``on_outcome(i, outcome)`` is called once per request as soon as its outcome is known (a request
        whose rows all ran in an execution's first call need not wait for the other calls)."""
        rows = [
            (item.params, (index, row))
            for index, result in enumerate(parsed)
            if isinstance(result, ParsedRequest)
            for row, item in enumerate(result.items)
        ]
        # Calls holding a row whose adapter is still being read run after the others (the read goes on
        # meanwhile). Such rows are not split off their batch-mates: a call of their own would cost
        # everyone queued behind this execution a whole call, waiting for the read costs them at most
        # the read.
        waiting = {ref for _, ref in rows if not self.ready(parsed[ref[0]].items[ref[1]])}
        chunks = sorted(plan_batches(rows, self.budget), key=lambda chunk: any(ref in waiting for ref in chunk.rows))
        self.on_plan(chunks)
        results: dict[RowRef, object] = {}
        outcomes: dict[int, Outcome] = {}

        def answer_finished() -> None:
            for index, result in enumerate(parsed):
                if index not in outcomes and (isinstance(result, RequestError) or all(
                        (index, row) in results for row in range(len(result.items)))):
                    outcomes[index] = self._outcome(index, result, results)
                    on_outcome(index, outcomes[index])

        answer_finished()  # the rejected ones at once
        for chunk in chunks:
            items = [parsed[request].items[row] for request, row in chunk.rows]
            results.update(zip(chunk.rows, self._run_rows(chunk.params, list(chunk.rows), items, is_cancelled)))
            answer_finished()
        return [outcomes[index] for index in range(len(parsed))]

    def _run_rows(self, params: CallParams, refs: list[RowRef], items: list[GenerationItem], is_cancelled) -> list:
        """Results of one chunk: an image, ``CANCELLED``, a ``Failed`` or a ``Rejected`` per row."""
        requests = dict.fromkeys(request for request, _ in refs)
        if all(is_cancelled[request]() for request in requests):
            return [CANCELLED] * len(refs)  # nobody is waiting: do not run it
        poll = RequestPoll([request for request, _ in refs], is_cancelled, self.on_step, self.poll_interval_s)
        started = time.perf_counter()
        try:
            outputs = list(self.call(params, items, poll))
            if len(outputs) != len(items):
                raise RuntimeError(f"the pipeline returned {len(outputs)} images for {len(items)} rows")
        except AdaptersUnavailable as exc:  # nothing ran: refuse the rows naming them, run their batch-mates
            refusals = [exc.refusal(item) for item in items]
            keep = [index for index, refusal in enumerate(refusals) if refusal is None]
            rest = iter(self._run_rows(params, [refs[i] for i in keep], [items[i] for i in keep], is_cancelled)
                        if keep else ())
            return [refusal if refusal is not None else next(rest) for refusal in refusals]
        except Exception as exc:  # one failed call must not fail the other chunks of this execution
            out_of_memory = self.is_out_of_memory(exc)
            self._report(params, len(items), started, OUT_OF_MEMORY if out_of_memory else FAILED, poll)
            if not out_of_memory:
                log.exception("pipeline call of %d rows failed", len(items))
                return [Failed(f"pipeline failed: {type(exc).__name__}: {exc}")] * len(items)
            if len(items) == 1:
                return [Failed(f"out of memory even for a single {params.height}x{params.width} image: {exc}")]
            # Halve and retry: no request fails because of its batch-mates.
            middle = len(items) // 2
            return self._run_rows(params, refs[:middle], items[:middle], is_cancelled) + self._run_rows(
                params, refs[middle:], items[middle:], is_cancelled
            )
        dropped = sum(output is None for output in outputs)
        self._report(params, len(items), started, OK, poll, dropped)
        return [CANCELLED if output is None else output for output in outputs]

    def _report(self, params, rows: int, started: float, result: str, poll: RequestPoll, dropped: int = 0) -> None:
        self.on_call(CallReport(params, rows, time.perf_counter() - started, result, dropped, poll.steps, poll.seconds))

    @staticmethod
    def _outcome(index: int, parsed: ParseResult, results: dict) -> Outcome:
        if isinstance(parsed, RequestError):
            return Rejected(str(parsed))
        outputs = [results[(index, row)] for row in range(len(parsed.items))]
        failures = [output for output in outputs if isinstance(output, (Failed, Rejected))]
        if failures:
            return failures[0]
        if any(output is CANCELLED for output in outputs):
            return CANCELLED
        return Images(tuple(outputs), tuple(item.seed for item in parsed.items))
