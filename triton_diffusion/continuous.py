"""Step-level continuous batching: one running batch of rows; newcomers join at the next step.

Pure (no ``pb_utils``, no torch): it is given a ``StepModel`` (``stepwise.py``) and jobs, each a
request's prepared rows with "was it cancelled?" and "answer it" callables. A thread runs the loop:

    admit waiting rows (arrival order) while the memory budget allows
    -> drop the rows of cancelled requests
    -> one denoiser call per image size for all live rows (each at its own step)
    -> decode the rows that took their last step; answer every request whose rows are all done

Backpressure keeps Triton's queue in charge of who comes next: ``wait_for_room`` blocks the
``execute`` that handed jobs over until they are admitted and a row's room is free again, so
requests wait in Triton's queue (priorities, queue timeouts, max queue size) rather than here.
An out-of-memory step puts the newest half of that call's rows back at the head of the queue
(their state kept) and lowers the row cap, so admission stops before memory runs out next time.

Progress: a job may carry a ``progress`` callable; every ``progress_interval_s`` a ticker thread
calls it with each row's (steps done, steps in all) until the job is answered, so a client sees
signs of life even through a long step or decode (and a stalled server by their absence). The
final answer is always the job's last message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from .batching import CallBudget
from .core import CANCELLED, AdaptersUnavailable, Failed, Images, Outcome, PollClock
from .requests import GenerationItem

log = logging.getLogger(__name__)

_READY_POLL_S = 0.05  # how often the loop looks again at rows waiting for their adapter while nothing runs


class StepRow(Protocol):
    item: object
    step: int

    @property
    def steps(self) -> int: ...

    @property
    def size(self) -> tuple[int, int]: ...

    @property
    def finished(self) -> bool: ...


class Steps(Protocol):
    def step(self, rows: Sequence[StepRow]) -> None: ...

    def decode(self, rows: Sequence[StepRow]) -> list[np.ndarray]: ...


@dataclass(eq=False)
class Job:
    """One request's rows, and how to reach its client."""

    rows: list
    seeds: tuple[int, ...]
    is_cancelled: Callable[[], bool]
    respond: Callable[[Outcome], None]
    images: dict = field(default_factory=dict)  # id(row) -> image
    answered: bool = False
    progress: Optional[Callable[[list], None]] = None  # [(steps done, steps in all)] per row

    def counts(self) -> list[tuple[int, int]]:
        return [(min(row.step, row.steps), row.steps) for row in self.rows]


@dataclass(frozen=True)
class StepReport:
    """One loop iteration: the denoiser calls for all live rows."""

    live_rows: int
    sizes: int  # denoiser calls (one per image size among the live rows)
    seconds: float


class ContinuousBatcher:
    """See the module docstring. ``start()`` the loop thread; ``submit`` + ``wait_for_room`` per execute."""

    def __init__(
        self,
        model: Steps,
        budget: CallBudget,
        is_out_of_memory: Callable[[BaseException], bool],
        poll_interval_s: float = 0.0,
        on_step: Callable[[StepReport], None] = lambda report: None,
        on_admit: Callable[[int, bool], None] = lambda rows, mid_flight: None,
        on_out_of_memory: Callable[[int], None] = lambda cap: None,
        progress_interval_s: float = 1.0,
        ready: Callable[[GenerationItem], bool] = lambda item: True,
    ):
        self.model = model
        self.ready = ready  # False: the row waits for something (its adapter being read); others join first
        self.budget = budget
        self.is_out_of_memory = is_out_of_memory
        self.poll_interval_s = poll_interval_s
        self.on_step = on_step
        self.on_admit = on_admit
        self.on_out_of_memory = on_out_of_memory
        self.progress_interval_s = progress_interval_s
        self.row_cap = budget.max_images  # lowered after an out-of-memory step
        self._waiting: deque = deque()  # (job, row), arrival order
        self._live: list = []  # (job, row), admission order
        self._unanswered: set = set()  # every submitted job until it is answered
        self._condition = threading.Condition()
        # Held while a message goes to a client: a progress message never follows the final answer.
        self._send_lock = threading.Lock()
        self._stopped = False
        self._thread: Optional[threading.Thread] = None
        self._ticker: Optional[threading.Thread] = None
        self._poll = PollClock(poll_interval_s, start_due=True)

    # -- called from Triton's execute() --------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="continuous-batcher", daemon=True)
        self._thread.start()
        self._ticker = threading.Thread(target=self._tick_progress, name="continuous-progress", daemon=True)
        self._ticker.start()

    def submit(self, jobs: Sequence[Job]) -> None:
        with self._condition:
            if self._stopped:
                for job in jobs:
                    self._answer(job, Failed("the model is shutting down"))
                return
            self._waiting.extend((job, row) for job in jobs for row in job.rows)
            self._unanswered.update(jobs)
            self._condition.notify_all()

    def wait_for_room(self) -> None:
        """Return once every submitted row was admitted (or answered) and one more row would be
        admitted now: only then may Triton hand over its next requests."""
        with self._condition:
            self._condition.wait_for(lambda: self._stopped or (not self._waiting and self._fits(None)))

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self._ticker is not None:
            self._ticker.join(timeout=10)
        for job in list(self._unanswered):
            self._answer(job, Failed("the model was unloaded before this request finished"))

    @property
    def live_rows(self) -> int:
        return len(self._live)

    # -- progress -------------------------------------------------------------------------------------
    def _tick_progress(self) -> None:
        while True:
            with self._condition:
                if self._condition.wait_for(lambda: self._stopped, timeout=self.progress_interval_s):
                    return
                jobs = [job for job in self._unanswered if job.progress is not None]
            for job in jobs:
                self.send_progress(job)

    def send_progress(self, job: Job) -> None:
        """One progress message to ``job``'s client, unless it was answered."""
        with self._send_lock:
            if job.answered:
                return
            try:
                job.progress(job.counts())
            except Exception:  # noqa: BLE001 - a client gone mid-stream must not stop the ticker
                log.exception("sending progress failed")

    # -- the loop -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._condition:
                # (a waiting row becomes ready without a notification: its read finishes; hence the timeout)
                self._condition.wait_for(lambda: self._stopped or self._live or self._next_ready() is not None,
                                         timeout=_READY_POLL_S)
                if self._stopped:
                    return
                if not self._live and self._next_ready() is None:
                    continue
                self._admit()
            try:
                self._drop_cancelled()
                self._step_all()
                self._finish()
            except Exception as exc:  # noqa: BLE001 - a bug here must not leave requests (or execute) hanging
                log.exception("the continuous batcher failed; failing the requests it holds")
                with self._condition:
                    held = set(self._unanswered)
                self._remove(held, Failed(f"continuous batcher error: {type(exc).__name__}: {exc}"))
            with self._condition:
                self._condition.notify_all()  # room may have opened for a waiting execute()

    def _fits(self, row) -> bool:
        """Whether ``row`` (None: a row of the smallest kind) fits next to the live rows."""
        if not self._live:
            return True  # a row always runs alone, whatever its size (the request was validated)
        if len(self._live) >= min(self.row_cap, self.budget.max_images):
            return False
        pixels = sum(live.item.params.pixels for _, live in self._live)
        return row is None or pixels + row.item.params.pixels <= self.budget.max_pixels

    def _next_ready(self):
        """The first waiting (job, row) that is ready to join, or None."""
        return next((entry for entry in self._waiting if self.ready(entry[1].item)), None)

    def _admit(self) -> None:
        mid_flight = bool(self._live)
        admitted = 0
        while (entry := self._next_ready()) is not None and self._fits(entry[1]):
            self._waiting.remove(entry)
            self._live.append(entry)
            admitted += 1
        if admitted:
            self.on_admit(admitted, mid_flight)

    def _drop_cancelled(self) -> None:
        if not self._poll.due():
            return
        with self._condition:
            jobs = dict.fromkeys(job for job, _ in self._live + list(self._waiting))
        gone = {job for job in jobs if job.is_cancelled()}
        if gone:
            self._remove(gone, CANCELLED)

    def _remove(self, jobs: set, outcome: Outcome) -> None:
        with self._condition:
            self._live = [(job, row) for job, row in self._live if job not in jobs]
            self._waiting = deque((job, row) for job, row in self._waiting if job not in jobs)
        for job in jobs:
            self._answer(job, outcome)

    def _step_all(self) -> None:
        started = time.perf_counter()
        groups: dict[tuple[int, int], list] = {}
        for job, row in self._live:
            groups.setdefault(row.size, []).append((job, row))
        for members in groups.values():
            self._step_group(members)
        self.on_step(StepReport(len(self._live), len(groups), time.perf_counter() - started))

    def _step_group(self, members: list) -> None:
        try:
            self.model.step([row for _, row in members])
        except AdaptersUnavailable as exc:  # nothing ran: the rows naming them leave, the others step next time
            for job, row in members:
                refusal = exc.refusal(row.item)
                if refusal is not None:
                    self._remove({job}, refusal)
        except Exception as exc:  # one failed call fails only the requests in it
            if not self.is_out_of_memory(exc):
                log.exception("denoising step of %d rows failed", len(members))
                self._remove({job for job, _ in members}, Failed(f"denoising step failed: {type(exc).__name__}: {exc}"))
            elif len(members) == 1:
                self._remove({members[0][0]}, Failed(f"out of memory even for a single image alone: {exc}"))
            else:
                self._evict_newest(members[len(members) - len(members) // 2:])

    def _evict_newest(self, evicted: list) -> None:
        """Put ``evicted`` (the newest half of the call that ran out of memory, never rows of another
        size: those may already be in this iteration's next call) back at the head of the queue,
        state kept; cap admission."""
        with self._condition:
            self._live = [member for member in self._live if member not in evicted]
            self._waiting.extendleft(reversed(evicted))
            self.row_cap = max(1, len(self._live))
        log.warning("out of memory at %d live rows: %d rows wait again, at most %d rows run from now on",
                    len(self._live) + len(evicted), len(evicted), self.row_cap)
        self.on_out_of_memory(self.row_cap)

    def _finish(self) -> None:
        finished: dict[tuple[int, int], list] = {}
        for job, row in self._live:
            if row.finished:
                finished.setdefault(row.size, []).append((job, row))
        if not finished:
            return
        with self._condition:
            self._live = [(job, row) for job, row in self._live if not row.finished]
        for members in finished.values():
            try:
                images = self._decode([row for _, row in members])
            except Exception as exc:  # noqa: BLE001 - fails the requests of these rows only
                log.exception("decoding %d rows failed", len(members))
                self._remove({job for job, _ in members}, Failed(f"decoding failed: {type(exc).__name__}: {exc}"))
                continue
            for (job, row), image in zip(members, images):
                job.images[id(row)] = image
                if len(job.images) == len(job.rows):
                    self._answer(job, Images(tuple(job.images[id(r)] for r in job.rows), job.seeds))

    def _decode(self, rows: list) -> list:
        """Decode in one call, or in halves where that runs out of memory."""
        try:
            return self.model.decode(rows)
        except Exception as exc:
            if len(rows) == 1 or not self.is_out_of_memory(exc):
                raise
            middle = len(rows) // 2
            return self._decode(rows[:middle]) + self._decode(rows[middle:])

    def _answer(self, job: Job, outcome: Outcome) -> None:
        with self._send_lock:  # the flag and the send under one lock: no progress after the answer
            if job.answered:
                return
            job.answered = True
            try:
                job.respond(outcome)
            except Exception:  # noqa: BLE001 - a client gone mid-answer must not stop the loop
                log.exception("answering a request failed")
        with self._condition:
            self._unanswered.discard(job)
