"""The trained default (``tiny_shapes``) through the real server: each request of a batch of
different captions gets an image *of its own caption* (judged from pixels, ``shapes.judge``),
equal to the image it gets alone."""

from __future__ import annotations

from client import DiffusionClient, GenerationRequest
from testing.shapes import judge, parse_caption

from .conftest import assert_same_image, batch_histogram

MODEL = "tiny_shapes"
# Five captions that differ in colour, kind or background, at a seed where the model (whose
# adherence is well below 100%: docs/tiny-model.md) draws each of them right when served alone; batched, a
# row that got a batch-mate's prompt or noise would be judged as another scene.
CAPTIONS = [
    "a red circle on a blue background",
    "a white circle on a green background",
    "a black triangle on a red background",
    "a yellow triangle on a blue background",
    "a black circle on a yellow background",
]
SEED = 7


def test_a_batch_of_different_captions_draws_each_its_own_caption(delayed_server):
    server = delayed_server(len(CAPTIONS), models=(MODEL,))
    requests = [GenerationRequest(caption, seed=SEED) for caption in CAPTIONS]
    with DiffusionClient(f"grpc://{server.grpc_url}", MODEL, timeout_s=120) as client:
        results = client.generate_many(requests, concurrency=len(requests))
        assert batch_histogram(server, MODEL) == {len(CAPTIONS): 1}, "all must share one execution"
        for request, result in zip(requests, results):
            assert result.array.shape == (64, 64, 3)
            assert judge(result.array) == parse_caption(request.prompt), request.prompt
            assert_same_image(result.array, client.generate(request).array)


# Rows with the trained adapter "swap-red-blue" (models/tiny-shapes-loras: red and blue exchanged) and
# rows without it, at a seed where each is drawn right served alone: a row that got a batch-mate's
# adapter, or none, is judged as the other scene.
ADAPTER_ROWS = [
    ("a red circle on a blue background", "swap-red-blue", "a blue circle on a red background"),
    ("a red circle on a blue background", "", "a red circle on a blue background"),
    ("a black triangle on a red background", "swap-red-blue", "a black triangle on a blue background"),
    ("a white circle on a green background", "", "a white circle on a green background"),
    ("a yellow triangle on a blue background", "swap-red-blue", "a yellow triangle on a red background"),
]


def test_rows_with_and_without_the_trained_adapter_share_an_execution_and_each_gets_its_own(delayed_server):
    server = delayed_server(len(ADAPTER_ROWS), models=(MODEL,))
    requests = [GenerationRequest(caption, seed=1, lora=adapter or None) for caption, adapter, _ in ADAPTER_ROWS]
    with DiffusionClient(f"grpc://{server.grpc_url}", MODEL, timeout_s=120) as client:
        results = client.generate_many(requests, concurrency=len(requests))
        assert batch_histogram(server, MODEL) == {len(ADAPTER_ROWS): 1}, "all must share one execution"
        for request, result, (_, _, drawn) in zip(requests, results, ADAPTER_ROWS):
            assert judge(result.array) == parse_caption(drawn), (request.prompt, request.lora)
            assert_same_image(result.array, client.generate(request).array)
