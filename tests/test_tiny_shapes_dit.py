"""The trained flow-matching DiT (``tiny_shapes_dit``): its judge, its trainer's batched transformer
call, and, through the real server, a batch of different two-object captions in which each request
gets an image of its own caption, equal to the image it gets alone; and the same with continuous
batching, for a caption that joins a running batch mid-flight."""

from __future__ import annotations

import random

import pytest

from client import DiffusionClient, GenerationRequest
from testing import harness
from testing.pairs import HELD_OUT, PairScene, judge, judged_right, parse_caption, render

from .conftest import assert_same_image, batch_histogram, start_server
from .test_continuous import admitted, join_mid_flight

MODEL, CONTINUOUS = "tiny_shapes_dit", "tiny_shapes_dit_continuous"
SKIPPED = "diffusion_step_cache_skipped_rows_total"
# Captions that differ in colours, kinds, relation and background, at a seed where the model (held-out
# adherence 93-100% per attribute: docs/tiny-model.md) draws each right when served alone; batched, a
# row that got a batch-mate's prompt or noise would be judged as another scene.
CAPTIONS = [
    "a blue circle above a red triangle on a white background",
    "a blue circle left of a red triangle on a white background",
    "a green square above a blue square on a red background",
    "a red circle left of a yellow square on a black background",
    "a white triangle above a black square on a green background",
]
SEED = 7


def test_the_judge_reads_every_held_out_scene_as_rendered():
    rng = random.Random(0)
    for scene in map(lambda combination: PairScene(*combination), HELD_OUT):
        assert parse_caption(scene.caption) == scene
        assert all(judged_right(judge(render(scene, rng)), scene).values()), scene.caption


def test_the_judge_tells_a_swapped_relation_and_a_wrong_kind():
    scene = PairScene("red", "circle", "left of", "blue", "square", "white")
    image = render(scene, random.Random(1))
    assert all(judged_right(judge(image), scene).values())
    mirrored = PairScene("blue", "square", "left of", "red", "circle", "white")
    assert judged_right(judge(image), mirrored) == {"colours": True, "shapes": True, "relation": False,
                                                     "background": True}
    triangle = PairScene("red", "triangle", "left of", "blue", "square", "white")
    assert judged_right(judge(image), triangle)["shapes"] is False


def test_the_trainers_batched_transformer_call_equals_the_pipelines_own():
    """``train_pairs.batched_forward`` (what the model was trained with) computes what the served
    pipeline's per-row list call computes, so the trained weights mean the same thing when served."""
    import torch

    from testing import train_pairs

    pipe = train_pairs.build(seed=0, device="cpu")
    captions = [PairScene(*combination).caption for combination in HELD_OUT[:3]] + [""]
    with torch.no_grad():
        embeds, pads = train_pairs.encode(pipe, captions)
        latents, t = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0.1, 0.5, 0.9, 1.0])
        batched = train_pairs.batched_forward(pipe.transformer, latents, t, embeds, pads)
        listed = pipe.transformer([row.unsqueeze(1) for row in latents], t,
                                  [embed[~pad] for embed, pad in zip(embeds, pads)], return_dict=False)[0]
    torch.testing.assert_close(batched, torch.stack(listed))


@pytest.mark.parametrize("cached", [(False,) * 5, (True, False, True, True, False)], ids=["exact", "cached-and-exact"])
def test_a_batch_of_different_captions_draws_each_its_own_caption(delayed_server, cached):
    """Five captions in one execution, each judged right and equal to itself served alone; with some
    rows opted in to the shipped step cache (STEP_CACHE=1), each cached row skips where it would alone
    (the per-row cache) and the exact ones stay exact."""
    server = delayed_server(len(CAPTIONS), models=(MODEL,))
    requests = [GenerationRequest(caption, seed=SEED, step_cache=flag) for caption, flag in zip(CAPTIONS, cached)]
    skipped = harness.metric(server, SKIPPED, MODEL)
    with DiffusionClient(f"grpc://{server.grpc_url}", MODEL, timeout_s=120) as client:
        results = client.generate_many(requests, concurrency=len(requests))
        assert batch_histogram(server, MODEL) == {len(CAPTIONS): 1}, "all must share one execution"
        assert (harness.metric(server, SKIPPED, MODEL) > skipped) == any(cached)
        for request, result in zip(requests, results):
            assert result.array.shape == (64, 64, 3)
            judged = judged_right(judge(result.array), parse_caption(request.prompt))
            assert all(judged.values()), (request.prompt, judged)
            assert_same_image(result.array, client.generate(request).array)


@pytest.mark.parametrize("cached", [False, True], ids=["exact", "cached"])
def test_a_caption_joining_a_running_batch_mid_flight_gets_its_own_image(tmp_path_factory, cached):
    """Continuous batching: a caption that joins a 50-step request mid-flight finishes first, gets
    the image the dynamic-batching model gives it alone (judged right), and the long one too; with
    the step cache (both opted in), each row skips from its own residuals, kept with the row while
    the running batch changes around it."""
    server = start_server(tmp_path_factory.mktemp("dit-continuous"), [MODEL, CONTINUOUS], name="dit-continuous",
                          require_ready=True)
    try:
        long = GenerationRequest(CAPTIONS[0], seed=SEED, steps=50, step_cache=cached)
        joiner = GenerationRequest(CAPTIONS[1], seed=SEED, step_cache=cached)
        mid_flight_before = admitted(server, CONTINUOUS, "mid_flight")
        finished, long_result, joined = join_mid_flight(server, CONTINUOUS, long, joiner)
        assert finished == ["short", "long"]
        assert admitted(server, CONTINUOUS, "mid_flight") == mid_flight_before + 1
        with DiffusionClient(f"grpc://{server.grpc_url}", MODEL, timeout_s=120) as client:
            assert_same_image(joined.array, client.generate(joiner).array)
            assert_same_image(long_result.array, client.generate(long).array)
        judged = judged_right(judge(joined.array), parse_caption(joiner.prompt))
        assert all(judged.values()), (joiner.prompt, judged)
        assert (harness.metric(server, SKIPPED, CONTINUOUS) > 0) == cached
    finally:
        server.stop()
