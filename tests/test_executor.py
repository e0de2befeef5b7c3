"""The executor with fake pipelines (no server, no torch): outcomes per request, OOM halving, metrics."""

from __future__ import annotations

import numpy as np

from triton_diffusion.batching import CallBudget
from triton_diffusion.core import CANCELLED, AdaptersUnavailable, Failed, Images, Rejected
from triton_diffusion.executor import Executor
from triton_diffusion.requests import ParsedRequest, RequestError, text_to_image


class FakeOOM(Exception):
    pass


def request(*prompts, steps=10, size=64):
    return ParsedRequest(tuple(text_to_image(p, index, steps, 7.5, size, size) for index, p in enumerate(prompts)))


def image_of(item):
    """A fake image that says which row it was made for: its seed and the first letter of its prompt."""
    return np.full((2, 2, 3), [item.seed, ord(item.prompt[0]), item.params.num_inference_steps], np.uint8)


class FakePipeline:
    """Records every call; raises FakeOOM above ``max_rows``, a bug for prompts starting with "!"."""

    def __init__(self, max_rows=100, cancel_at_step=None, steps=3):
        self.calls, self.max_rows, self.cancel_at_step, self.steps = [], max_rows, cancel_at_step or {}, steps

    def __call__(self, params, items, cancelled_rows):
        self.calls.append([item.prompt for item in items])
        if len(items) > self.max_rows:
            raise FakeOOM(f"{len(items)} rows do not fit")
        if any(item.prompt.startswith("!") for item in items):
            raise ValueError("a bug in the pipeline")
        live = list(range(len(items)))
        for _ in range(self.steps):
            gone = cancelled_rows(live)
            live = [row for row in live if row not in gone]
        return [image_of(item) if row in live else None for row, item in enumerate(items)]


def executor(pipeline, budget=CallBudget(16, 10**9), poll_interval_s=0.0):
    reports, steps = [], []
    run = Executor(pipeline, budget, lambda exc: isinstance(exc, FakeOOM), on_call=reports.append,
                   on_step=lambda: steps.append(1), poll_interval_s=poll_interval_s)
    return run, reports, steps


def never(count):
    return [lambda: False] * count


def test_every_request_gets_its_own_images_in_order_across_groups():
    pipeline = FakePipeline()
    run, reports, _ = executor(pipeline)
    parsed = [request("a"), request("b", steps=5), request("c", "d"), RequestError("bad size")]
    outcomes = run.run(parsed, never(4))
    assert pipeline.calls == [["a", "c", "d"], ["b"]]
    assert isinstance(outcomes[3], Rejected) and outcomes[3].message == "bad size"
    for outcome, parsed_request in zip(outcomes[:3], parsed[:3]):
        assert isinstance(outcome, Images)
        assert [image[0, 0].tolist() for image in outcome.images] == [image_of(i)[0, 0].tolist() for i in parsed_request.items]
        assert outcome.seeds == tuple(item.seed for item in parsed_request.items)
    assert [(r.rows, r.result) for r in reports] == [(3, "ok"), (1, "ok")]


def test_a_failing_call_fails_only_its_chunk_with_the_cause():
    run, reports, _ = executor(FakePipeline())
    outcomes = run.run([request("a"), request("!boom", steps=5), request("c"), request("d", steps=5)], never(4))
    assert isinstance(outcomes[0], Images) and isinstance(outcomes[2], Images)
    for failed in (outcomes[1], outcomes[3]):  # "d" shares the failing call with "!boom"
        assert isinstance(failed, Failed) and failed.message == "pipeline failed: ValueError: a bug in the pipeline"
    assert sorted((r.rows, r.result) for r in reports) == [(2, "failed"), (2, "ok")]


def test_rows_whose_adapter_cannot_be_read_any_more_are_refused_and_their_batch_mates_run():
    """An adapter file removed after its requests were admitted: the call refuses before anything runs
    (lora.AdapterLibrary.use); those requests are INVALID_ARG naming why, the others run without them."""
    import dataclasses

    class Adapters(FakePipeline):
        def __call__(self, params, items, cancelled_rows):
            if any(item.lora == "gone" for item in items):
                self.calls.append([item.prompt for item in items])
                raise AdaptersUnavailable({"gone": "no adapter named 'gone' in lora_dir"})
            return super().__call__(params, items, cancelled_rows)

    pipeline = Adapters()
    run, reports, _ = executor(pipeline)
    gone = ParsedRequest((dataclasses.replace(request("b").items[0], lora="gone"),))
    outcomes = run.run([request("a"), gone, request("c", "d")], never(3))
    assert outcomes[1] == Rejected("no adapter named 'gone' in lora_dir")
    assert isinstance(outcomes[0], Images) and isinstance(outcomes[2], Images) and len(outcomes[2].images) == 2
    assert pipeline.calls == [["a", "b", "c", "d"], ["a", "c", "d"]]
    assert [(r.rows, r.result) for r in reports] == [(3, "ok")]  # the refused call ran nothing


def test_each_request_is_answered_once_as_soon_as_its_rows_are_done():
    """A rejected request at once; a request whose rows all ran in the first call before the second call
    starts; a request spanning two calls after the second."""
    answered = []

    class Watching(FakePipeline):
        def __call__(self, params, items, cancelled_rows):
            self.answered_before.append(list(answered))
            return super().__call__(params, items, cancelled_rows)

    pipeline = Watching()
    pipeline.answered_before = []
    run, _, _ = executor(pipeline, budget=CallBudget(2, 10**9))
    outcomes = run.run([request("a"), RequestError("bad"), request("b", "c"), request("d", steps=5)], never(4),
                       on_outcome=lambda index, outcome: answered.append(index))
    # each request answered once, as soon as it could be
    assert pipeline.calls == [["a", "b"], ["c"], ["d"]]
    assert pipeline.answered_before == [[1], [1, 0], [1, 0, 2]]
    assert answered == [1, 0, 2, 3] and isinstance(outcomes[2], Images) and len(outcomes[2].images) == 2


def test_a_call_holding_a_row_that_is_not_ready_runs_after_the_others_without_splitting_it():
    """A row whose adapter is still being read (``ready`` false): its call (with its batch-mates: not
    split off, which would cost a call) runs after the execution's other calls."""
    import dataclasses

    pipeline = FakePipeline()
    run = Executor(pipeline, CallBudget(16, 10**9), lambda exc: False, ready=lambda item: item.lora != "new")
    reading = ParsedRequest((dataclasses.replace(request("b").items[0], lora="new"),))
    outcomes = run.run([request("a"), reading, request("c", "d"), request("e", steps=5)], never(4))
    assert pipeline.calls == [["e"], ["a", "b", "c", "d"]]
    assert all(isinstance(outcome, Images) for outcome in outcomes)


def test_requests_cancelled_before_their_call_never_run():
    pipeline = FakePipeline()
    run, reports, _ = executor(pipeline)
    outcomes = run.run([request("a"), request("b")], [lambda: True, lambda: True])
    assert outcomes == [CANCELLED, CANCELLED] and pipeline.calls == [] and reports == []


def test_a_request_cancelled_mid_call_is_dropped_and_polled_once_per_step():
    polls = {"a": 0, "bc": 0}

    def cancelled_after_first_step(name):
        def check():
            polls[name] += 1
            return name == "bc" and polls[name] > 1
        return check

    run, reports, steps = executor(FakePipeline(steps=3))
    outcomes = run.run([request("a"), request("b", "c")], [cancelled_after_first_step("a"), cancelled_after_first_step("bc")])
    assert isinstance(outcomes[0], Images) and outcomes[1] is CANCELLED
    # Before the call, until one request is still wanted ("a"). Then per step each live request
    # once, however many rows it has ("bc" has two): steps 1 and 2 for "bc", all three for "a".
    assert polls == {"a": 1 + 3, "bc": 2}
    assert len(steps) == 3
    (report,) = reports
    assert report.rows_dropped == 2 and report.steps == 3 and report.poll_seconds >= 0


def test_a_poll_interval_skips_asking_between_polls():
    asked = []
    run, reports, steps = executor(FakePipeline(steps=5), poll_interval_s=3600)
    outcomes = run.run([request("a")], [lambda: asked.append(1) or False])
    assert isinstance(outcomes[0], Images)
    # once before the call; within the hour no step asks again, but every step is counted
    assert len(asked) == 1 and len(steps) == 5 and reports[0].steps == 5


def test_out_of_memory_halves_down_to_single_rows_and_reports_every_actual_call():
    pipeline = FakePipeline(max_rows=2)
    run, reports, _ = executor(pipeline)
    outcomes = run.run([request(*"abcdefg")], never(1))
    assert isinstance(outcomes[0], Images) and len(outcomes[0].images) == 7
    assert [image[0, 0, 1] for image in outcomes[0].images] == [ord(c) for c in "abcdefg"]
    assert [len(call) for call in pipeline.calls] == [7, 3, 1, 2, 4, 2, 2]  # depth first, until each fits
    assert [(r.rows, r.result) for r in reports] == [
        (7, "out_of_memory"), (3, "out_of_memory"), (1, "ok"), (2, "ok"), (4, "out_of_memory"), (2, "ok"), (2, "ok")]


def test_a_row_that_does_not_fit_alone_fails_its_request_and_no_other():
    pipeline = FakePipeline(max_rows=0)
    run, reports, _ = executor(pipeline)
    outcomes = run.run([request("a", size=64), request("b", size=128)], never(2))
    assert all(isinstance(o, Failed) and "out of memory even for a single" in o.message for o in outcomes)
    assert "64x64" in outcomes[0].message and "128x128" in outcomes[1].message
    # out of memory on the pixel budget's chunks of one: nothing left to halve
    assert [(r.rows, r.result) for r in reports] == [(1, "out_of_memory"), (1, "out_of_memory")]

    mixed = FakePipeline(max_rows=1)
    run, _, _ = executor(mixed)
    outcomes = run.run([request("a", "b")], never(1))
    assert isinstance(outcomes[0], Images) and [len(c) for c in mixed.calls] == [2, 1, 1]


def test_the_budget_cuts_calls_and_one_request_may_span_them():
    pipeline = FakePipeline()
    run, reports, _ = executor(pipeline, CallBudget(max_images=2, max_pixels=10**9))
    outcomes = run.run([request("a", "b", "c"), request("d")], never(2))
    assert [len(call) for call in pipeline.calls] == [2, 2]
    assert isinstance(outcomes[0], Images) and len(outcomes[0].images) == 3
    assert [r.rows for r in reports] == [2, 2]


def test_a_pipeline_that_returns_the_wrong_number_of_images_fails_its_chunk():
    run, _, _ = executor(lambda params, items, cancelled_rows: [None])
    outcomes = run.run([request("a"), request("b")], never(2))
    assert all(isinstance(o, Failed) and "returned 1 images for 2 rows" in o.message for o in outcomes)
