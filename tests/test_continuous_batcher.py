"""The continuous batcher's rules, without a server: admission under the budget and in arrival
order, out-of-memory (rows wait again, the cap drops), failures and cancellations kept to their
own requests. The step model here counts steps; the real ones are checked in test_continuous.py."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pytest

from triton_diffusion.batching import CallBudget
from triton_diffusion.continuous import ContinuousBatcher, Job
from triton_diffusion.core import AdaptersUnavailable, Cancelled, Failed, Images, Rejected
from triton_diffusion.requests import text_to_image


class OutOfMemory(RuntimeError):
    pass


@dataclass(eq=False)
class CountingRow:
    item: object
    steps: int
    step: int = 0

    @property
    def size(self):
        return self.item.params.height, self.item.params.width

    @property
    def finished(self):
        return self.step >= self.steps


class CountingSteps:
    """Each step adds one to every row; records the rows of every call; fails on demand."""

    def __init__(self, memory_rows: int = 100, failing_prompt: str = ""):
        self.calls: list[list[str]] = []
        self.memory_rows = memory_rows
        self.failing_prompt = failing_prompt

    def step(self, rows):
        prompts = [row.item.prompt for row in rows]
        if any(row.finished for row in rows):  # as a real step model, which indexes its schedule
            raise IndexError(f"stepped past the last step: {prompts}")
        if len(rows) > self.memory_rows:
            raise OutOfMemory(f"{len(rows)} rows")
        if self.failing_prompt in prompts:
            raise ValueError("a broken row")
        self.calls.append(prompts)
        for row in rows:
            row.step += 1

    def decode(self, rows):
        return [np.full((2, 2, 3), row.step, np.uint8) for row in rows]


def job(prompt: str, steps: int, outcomes: dict, size: int = 64, cancelled=lambda: False) -> Job:
    row = CountingRow(text_to_image(prompt, 0, steps, 1.0, size, size), steps)
    return Job([row], (0,), cancelled, lambda outcome: outcomes.__setitem__(prompt, outcome))


def run_until_answered(batcher: ContinuousBatcher, jobs: list[Job], outcomes: dict) -> None:
    done = threading.Event()
    for one in jobs:
        respond = one.respond
        one.respond = lambda outcome, respond=respond: (respond(outcome), len(outcomes) == len(jobs) and done.set())
    batcher.start()
    batcher.submit(jobs)
    assert done.wait(30), outcomes
    batcher.stop()


def test_rows_join_in_arrival_order_up_to_the_image_budget():
    steps, outcomes = CountingSteps(), {}
    batcher = ContinuousBatcher(steps, CallBudget(max_images=2, max_pixels=10**9), lambda exc: isinstance(exc, OutOfMemory))
    run_until_answered(batcher, [job("a", 3, outcomes), job("b", 1, outcomes), job("c", 2, outcomes)], outcomes)
    # a and b start together; c takes b's place at the step after b finished, next to a
    assert steps.calls == [["a", "b"], ["a", "c"], ["a", "c"]]
    assert all(isinstance(outcome, Images) for outcome in outcomes.values())


def test_rows_of_different_sizes_step_in_separate_calls_under_the_pixel_budget():
    steps, outcomes = CountingSteps(), {}
    batcher = ContinuousBatcher(steps, CallBudget(max_images=8, max_pixels=64 * 64 + 32 * 32), lambda exc: False)
    run_until_answered(batcher, [job("big", 2, outcomes), job("small", 2, outcomes, size=32),
                                 job("big2", 1, outcomes)], outcomes)
    assert steps.calls[:2] == [["big"], ["small"]]  # one denoiser call per size; big2 does not fit yet
    assert ["big2"] in steps.calls[2:]


def test_out_of_memory_puts_the_newest_rows_back_and_caps_admission():
    steps, outcomes, caps = CountingSteps(memory_rows=2), {}, []
    batcher = ContinuousBatcher(steps, CallBudget(max_images=4, max_pixels=10**9), lambda exc: isinstance(exc, OutOfMemory),
                                on_out_of_memory=caps.append)
    run_until_answered(batcher, [job(name, 2, outcomes) for name in "abcd"], outcomes)
    assert caps == [2]
    assert all(len(call) <= 2 for call in steps.calls)
    assert all(isinstance(outcomes[name], Images) and outcomes[name].images[0][0, 0, 0] == 2 for name in "abcd")


def test_out_of_memory_evicts_from_the_call_that_failed_not_from_another_size():
    """Two sizes live, the newest row a small one: when the big call runs out of memory, its own
    newest row waits again. (Evicting the newest of all live rows parked the small row while its
    call, already formed, still stepped it: it finished parked and, re-admitted, was stepped past
    its end and answered as failed.)"""
    steps, outcomes = CountingSteps(memory_rows=1), {}
    batcher = ContinuousBatcher(steps, CallBudget(max_images=4, max_pixels=10**9), lambda exc: isinstance(exc, OutOfMemory))
    run_until_answered(batcher, [job("big", 2, outcomes), job("big2", 2, outcomes), job("small", 1, outcomes, size=32)],
                       outcomes)
    assert {name: type(outcome).__name__ for name, outcome in outcomes.items()} == dict.fromkeys(outcomes, "Images")
    assert all(outcomes[name].images[0][0, 0, 0] == steps for name, steps in [("big", 2), ("big2", 2), ("small", 1)])
    assert steps.calls.count(["small"]) == 1


def test_a_failing_step_fails_only_the_requests_in_that_call():
    steps, outcomes = CountingSteps(failing_prompt="broken"), {}
    batcher = ContinuousBatcher(steps, CallBudget(max_images=4, max_pixels=10**9), lambda exc: False)
    run_until_answered(batcher, [job("broken", 2, outcomes, size=32), job("fine", 2, outcomes)], outcomes)
    assert isinstance(outcomes["broken"], Failed) and "a broken row" in outcomes["broken"].message
    assert isinstance(outcomes["fine"], Images)


def test_a_row_whose_adapter_cannot_be_read_any_more_leaves_and_its_batch_mates_step_on():
    """An adapter file removed after its request was admitted: the step refuses that row before
    anything runs (lora.AdapterLibrary.use); the row is INVALID_ARG, the others are not held back."""
    import dataclasses

    class Adapters(CountingSteps):
        def step(self, rows):
            if any(row.item.lora == "gone" for row in rows):
                raise AdaptersUnavailable({"gone": "no adapter named 'gone' in lora_dir"})
            super().step(rows)

    steps, outcomes = Adapters(), {}
    batcher = ContinuousBatcher(steps, CallBudget(max_images=4, max_pixels=10**9), lambda exc: False)
    refused = job("b", 2, outcomes)
    refused.rows[0].item = dataclasses.replace(refused.rows[0].item, lora="gone")
    run_until_answered(batcher, [job("a", 2, outcomes), refused, job("c", 2, outcomes)], outcomes)
    assert outcomes["b"] == Rejected("no adapter named 'gone' in lora_dir")
    assert isinstance(outcomes["a"], Images) and isinstance(outcomes["c"], Images)
    assert steps.calls == [["a", "c"], ["a", "c"]]


def test_a_row_waiting_for_its_adapter_lets_later_rows_join_first_and_joins_once_ready():
    """A row whose adapter is being read (``ready`` false) stays waiting while rows behind it join and
    step; it joins once ready, and nobody waited for it."""
    import dataclasses

    reads_done = threading.Event()

    class Reading(CountingSteps):
        def step(self, rows):
            super().step(rows)
            if len(self.calls) == 2:
                reads_done.set()  # the adapter's read ends while the others run

    steps, outcomes = Reading(), {}
    batcher = ContinuousBatcher(steps, CallBudget(max_images=4, max_pixels=10**9), lambda exc: False,
                                ready=lambda item: item.lora != "new" or reads_done.is_set())
    waiting = job("b", 2, outcomes)
    waiting.rows[0].item = dataclasses.replace(waiting.rows[0].item, lora="new")
    run_until_answered(batcher, [waiting, job("a", 3, outcomes), job("c", 3, outcomes)], outcomes)
    assert steps.calls[:2] == [["a", "c"], ["a", "c"]] and ["a", "c", "b"] in steps.calls
    assert all(isinstance(outcome, Images) for outcome in outcomes.values())


def test_a_row_whose_adapter_is_read_while_nothing_runs_joins_without_a_notification():
    """Only a row waiting for its adapter: the loop looks again until the read is done, then runs it."""
    import dataclasses

    import itertools

    asked = itertools.count()  # ready at the fifth look: no notification comes when a read ends
    steps, outcomes = CountingSteps(), {}
    batcher = ContinuousBatcher(steps, CallBudget(max_images=4, max_pixels=10**9), lambda exc: False,
                                ready=lambda item: next(asked) >= 5)
    waiting = job("b", 1, outcomes)
    waiting.rows[0].item = dataclasses.replace(waiting.rows[0].item, lora="new")
    run_until_answered(batcher, [waiting], outcomes)
    assert steps.calls == [["b"]] and isinstance(outcomes["b"], Images)


def test_a_cancelled_request_leaves_at_the_next_step():
    steps, outcomes = CountingSteps(), {}
    flag = threading.Event()
    batcher = ContinuousBatcher(steps, CallBudget(max_images=4, max_pixels=10**9), lambda exc: False,
                                on_step=lambda report: len(steps.calls) == 2 and flag.set())
    run_until_answered(batcher, [job("stays", 5, outcomes), job("goes", 5, outcomes, cancelled=flag.is_set)], outcomes)
    assert isinstance(outcomes["goes"], Cancelled)
    assert sum("goes" in call for call in steps.calls) == 2
    assert isinstance(outcomes["stays"], Images)


def test_a_stopped_batcher_answers_what_it_still_holds():
    outcomes = {}
    batcher = ContinuousBatcher(CountingSteps(), CallBudget(4, 10**9), lambda exc: False)
    batcher.submit([job("never started", 3, outcomes)])  # no loop thread: it stays waiting
    batcher.stop()
    assert isinstance(outcomes["never started"], Failed)


@pytest.mark.parametrize("rows", [1, 3])
def test_wait_for_room_returns_once_rows_are_admitted(rows):
    batcher = ContinuousBatcher(CountingSteps(), CallBudget(8, 10**9), lambda exc: False)
    outcomes = {}
    batcher.start()
    batcher.submit([job(f"r{index}", 50, outcomes) for index in range(rows)])
    batcher.wait_for_room()
    assert batcher.live_rows + len(outcomes) == rows
    batcher.stop()


def test_a_bug_in_the_loop_fails_the_requests_it_holds_and_the_loop_goes_on():
    class BrokenDecode(CountingSteps):
        def decode(self, rows):
            return None  # not a list: the loop itself trips over it

    steps, outcomes = BrokenDecode(), {}
    batcher = ContinuousBatcher(steps, CallBudget(4, 10**9), lambda exc: False)
    run_until_answered(batcher, [job("first", 1, outcomes)], outcomes)
    assert isinstance(outcomes["first"], Failed) and "continuous batcher error" in outcomes["first"].message


def test_progress_ticks_until_the_answer_and_never_after_it():
    """A slow step model (each step waits for the test): the ticker reports each row's steps while
    the job runs; the final answer is the job's last message."""
    gate, messages, lock = threading.Semaphore(0), [], threading.Lock()

    class GatedSteps(CountingSteps):
        def step(self, rows):
            gate.acquire()  # one step per release
            super().step(rows)

    row = CountingRow(text_to_image("p", 0, 3, 1.0, 64, 64), 3)
    answered = threading.Event()

    def respond(outcome):
        with lock:
            messages.append(("final", outcome))
        answered.set()

    def progress(counts):
        with lock:
            messages.append(("progress", counts))

    one = Job([row], (0,), lambda: False, respond, progress=progress)
    batcher = ContinuousBatcher(GatedSteps(), CallBudget(4, 10**9), lambda exc: False, progress_interval_s=0.01)
    batcher.start()
    batcher.submit([one])
    for done in range(1, 4):
        before = len(messages)
        harness_wait(lambda: len(messages) > before + 1)  # ticks while the step waits
        gate.release()
        harness_wait(lambda: ("progress", [(done, 3)]) in messages or answered.is_set())
    assert answered.wait(30)
    final_at = next(i for i, (kind, _) in enumerate(messages) if kind == "final")
    settled = len(messages)
    batcher.stop()
    assert final_at == settled - 1 == len(messages) - 1, messages[-3:]  # nothing after the answer
    counts = [value for kind, value in messages if kind == "progress"]
    assert counts[0] == [(0, 3)] and [(2, 3)] in counts
    assert counts == sorted(counts)  # steps only go up
    assert isinstance(messages[-1][1], Images)


def harness_wait(check, timeout: float = 30.0) -> None:
    from testing.harness import wait_until

    wait_until(check, "the batcher", timeout=timeout, interval=0.002)
