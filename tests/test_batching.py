"""Batch planning: grouping by call parameters, chunking to a budget."""

import numpy as np
import pytest

from triton_diffusion.batching import CallBudget, plan_batches
from triton_diffusion.requests import image_to_image, text_to_image

UNLIMITED = CallBudget(16, 10**9)
IMAGE = np.zeros((128, 128, 3), np.uint8)


def item(prompt="p", seed=0, steps=10, size=(128, 128), guidance=7.5, negative=None):
    return text_to_image(prompt, seed, steps, guidance, size[0], size[1], negative)


def rows(items):
    return [(it.params, (index, it.prompt)) for index, it in enumerate(items)]


def test_prompt_seed_negative_text_and_source_image_do_not_split_a_group():
    a, b = item("a", 1, negative="x"), item("b", 2, negative="y")
    assert a.params == b.params
    assert len(plan_batches(rows([a, b]), UNLIMITED)) == 1
    edits = [image_to_image("e", 1, IMAGE, 0.5, 10, 7.5), image_to_image("f", 2, IMAGE + 1, 0.5, 10, 7.5)]
    assert len(plan_batches(rows(edits), UNLIMITED)) == 1


@pytest.mark.parametrize(
    "other",
    [item(steps=20), item(size=(64, 64)), item(size=(128, 64)), item(guidance=1.0), item(negative="n"),
     image_to_image("p", 0, IMAGE, 0.5, 10, 7.5), image_to_image("p", 0, IMAGE, 0.6, 10, 7.5)],
)
def test_anything_the_pipeline_takes_as_a_scalar_splits_groups(other):
    assert item().params != other.params
    assert len(plan_batches(rows([item(), other]), UNLIMITED)) == 2


def test_groups_keep_arrival_order():
    items = [item("a"), item("b", steps=5), item("c"), item("d", steps=5)]
    chunks = plan_batches(rows(items), UNLIMITED)
    assert [[prompt for _, prompt in c.rows] for c in chunks] == [["a", "c"], ["b", "d"]]
    assert [[index for index, _ in c.rows] for c in chunks] == [[0, 2], [1, 3]]
    assert [c.params.num_inference_steps for c in chunks] == [10, 5]


def test_chunks_respect_the_image_and_pixel_budget_and_are_balanced():
    items = [item(str(i)) for i in range(10)]
    by_count = plan_batches(rows(items), CallBudget(8, 10**9))
    assert [len(c) for c in by_count] == [5, 5]
    by_pixels = plan_batches(rows(items), CallBudget(16, 3 * 128 * 128))
    assert [len(c) for c in by_pixels] == [3, 3, 2, 2]
    assert [prompt for c in by_pixels for _, prompt in c.rows] == [str(i) for i in range(10)]


def test_an_item_larger_than_the_budget_still_runs_alone():
    chunks = plan_batches(rows([item(size=(512, 512))] * 2), CallBudget(16, 100))
    assert [len(c) for c in chunks] == [1, 1]
