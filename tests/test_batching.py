"""Batch planning: grouping by signature, chunking to a budget, splitting results back."""

import numpy as np
import pytest

from triton_diffusion.batching import ItemRef, plan_batches, run_splitting_on_oom, signature, split_results
from triton_diffusion.requests import GenerationItem


def item(prompt="p", seed=0, steps=10, size=(128, 128), guidance=7.5, negative=None, image=None, strength=None):
    return GenerationItem(prompt, negative, seed, steps, guidance, size[0], size[1], image, strength)


def refs(items):
    return [(ItemRef(i, 0), it) for i, it in enumerate(items)]


def test_prompt_seed_and_negative_text_do_not_split_a_group():
    a, b = item("a", 1, negative="x"), item("b", 2, negative="y")
    assert signature(a) == signature(b)
    assert len(plan_batches(refs([a, b]), 16, 10**9)) == 1


@pytest.mark.parametrize(
    "other",
    [item(steps=20), item(size=(64, 64)), item(guidance=1.0), item(negative="n"),
     item(image=np.zeros((8, 8, 3), np.uint8), strength=0.5)],
)
def test_anything_the_pipeline_takes_as_a_scalar_splits_groups(other):
    assert signature(item()) != signature(other)
    assert len(plan_batches(refs([item(), other]), 16, 10**9)) == 2


def test_image_to_image_strength_is_part_of_the_signature():
    image = np.zeros((8, 8, 3), np.uint8)
    assert signature(item(image=image, strength=0.5)) != signature(item(image=image, strength=0.6))


def test_groups_keep_arrival_order_and_refs():
    items = [item("a"), item("b", steps=5), item("c"), item("d", steps=5)]
    chunks = plan_batches(refs(items), 16, 10**9)
    assert [[i.prompt for i in c.items] for c in chunks] == [["a", "c"], ["b", "d"]]
    assert [[r.request for r in c.refs] for c in chunks] == [[0, 2], [1, 3]]


def test_chunks_respect_the_image_and_pixel_budget_and_are_balanced():
    items = [item(str(i)) for i in range(10)]
    by_count = plan_batches(refs(items), 8, 10**9)
    assert [len(c) for c in by_count] == [5, 5]
    by_pixels = plan_batches(refs(items), 16, 3 * 128 * 128)
    assert [len(c) for c in by_pixels] == [3, 3, 2, 2]
    assert [i.prompt for c in by_pixels for i in c.items] == [str(i) for i in range(10)]


def test_an_item_larger_than_the_budget_still_runs_alone():
    chunks = plan_batches(refs([item(size=(512, 512))] * 2), 16, 100)
    assert [len(c) for c in chunks] == [1, 1]


def test_split_results_hands_each_output_to_its_item():
    chunks = plan_batches(refs([item("a"), item("b", steps=3), item("c")]), 16, 10**9)
    results = {}
    for chunk in chunks:
        split_results(chunk, [i.prompt.upper() for i in chunk.items], results)
    assert [results[ItemRef(i, 0)] for i in range(3)] == ["A", "B", "C"]
    with pytest.raises(RuntimeError, match="2 inputs"):
        split_results(chunks[0], ["only one"], {})


def test_out_of_memory_splits_the_chunk_until_it_fits_and_keeps_order():
    calls = []

    def run(items):
        calls.append(len(items))
        if len(items) > 2:
            raise MemoryError("out of memory")
        return [i * 10 for i in items]

    def is_oom(exc):
        return isinstance(exc, MemoryError)

    assert run_splitting_on_oom(run, list(range(7)), is_oom) == [i * 10 for i in range(7)]
    assert calls == [7, 3, 1, 2, 4, 2, 2]  # halves, depth first, until each call fits


def test_only_the_item_that_does_not_fit_alone_gets_the_error_and_other_errors_are_not_split():
    def run(items):
        if len(items) > 1 or items[0] == "huge":
            raise MemoryError("out of memory")
        return [items[0].upper()]

    outputs = run_splitting_on_oom(run, ["a", "huge", "b"], lambda e: isinstance(e, MemoryError))
    assert outputs[0] == "A" and outputs[2] == "B" and isinstance(outputs[1], MemoryError)
    calls = []

    def broken(items):
        calls.append(len(items))
        raise ValueError("bug")

    with pytest.raises(ValueError):
        run_splitting_on_oom(broken, [1, 2, 3, 4], lambda e: isinstance(e, MemoryError))
    assert calls == [4]
