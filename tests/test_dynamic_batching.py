"""Dynamic batching against the real server, made deterministic with TRITONSERVER_DELAY_SCHEDULER."""

import asyncio

import numpy as np

from client import AsyncDiffusionClient, DiffusionClient, GenerationRequest, ServerError

from .conftest import (BAD_HEIGHT, BAD_HEIGHT_ERROR, STEPS, TINY, assert_same_image, batch_histogram, metric, model_stats,
                       wait_until_denoising)


def send_together(server, requests):
    with DiffusionClient(f"grpc://{server.grpc_url}", TINY, timeout_s=120) as client:
        return client.generate_many(requests, concurrency=len(requests))


def served_alone(server, requests):
    with DiffusionClient(f"grpc://{server.grpc_url}", TINY) as client:
        return [client.generate(request).array for request in requests]


def test_same_signature_requests_run_as_one_execution_and_match_their_solo_images(delayed_server):
    server = delayed_server(6)
    requests = [GenerationRequest(f"prompt number {i}", seed=100 + i) for i in range(6)]
    results = send_together(server, requests)

    assert batch_histogram(server) == {6: 1}
    assert model_stats(server).executions == 1
    assert metric(server, "diffusion_pipeline_calls_total") == 1
    assert metric(server, "diffusion_pipeline_batch_size_sum") == 6
    assert [r.seed for r in results] == [100 + i for i in range(6)]

    alone = served_alone(server, requests)
    for result, solo in zip(results, alone):
        assert_same_image(result.array, solo)
    # The check above would catch a permutation: neighbours are nowhere near equal.
    assert (results[0].array != alone[1]).mean() > 0.5


def test_mixed_signatures_in_one_batch_are_grouped_and_each_group_runs_once(delayed_server):
    server = delayed_server(7)
    source = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    requests = [
        GenerationRequest("small a", seed=1, height=64, width=64),
        GenerationRequest("big a", seed=2, height=128, width=128),
        GenerationRequest("small b", seed=3, height=64, width=64),
        GenerationRequest("big few steps", seed=4, height=128, width=128, steps=3),
        GenerationRequest("edit a", seed=5, init_image=source, strength=0.6),
        GenerationRequest("edit b", seed=6, init_image=source[:64, :64], strength=0.6, height=96, width=96),
        GenerationRequest("big b", seed=7, height=128, width=128),
    ]
    results = send_together(server, requests)

    assert batch_histogram(server) == {7: 1}, "all seven must share one Triton execution"
    # groups: 64x64 (2), 128x128/10 steps (2), 128x128/3 steps (1), i2i 96x96 strength 0.6 (2)
    assert metric(server, "diffusion_pipeline_calls_total") == 4
    assert metric(server, "diffusion_groups_per_execute_sum") == 4
    assert [r.array.shape[:2] for r in results] == [(64, 64), (128, 128), (64, 64), (128, 128), (96, 96), (96, 96), (128, 128)]
    for result, solo in zip(results, served_alone(server, requests)):
        assert_same_image(result.array, solo)


def test_an_invalid_request_fails_alone_and_its_batch_mates_succeed(delayed_server):
    server = delayed_server(4)
    requests = [
        GenerationRequest("good one", seed=1),
        GenerationRequest("bad size", seed=2, height=BAD_HEIGHT),
        GenerationRequest("good two", seed=3),
        GenerationRequest("bad steps", seed=4, steps=0),
    ]
    results = send_together(server, requests)

    assert batch_histogram(server) == {4: 1}
    assert isinstance(results[1], ServerError) and BAD_HEIGHT_ERROR in str(results[1])
    assert isinstance(results[3], ServerError) and "NUM_INFERENCE_STEPS=0 is outside" in str(results[3])
    good = [requests[0], requests[2]]
    for result, solo in zip([results[0], results[2]], served_alone(server, good)):
        assert_same_image(result.array, solo)
    assert metric(server, "diffusion_request_errors_total") == 2


def test_a_request_with_several_prompts_gets_one_image_per_prompt(server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    prompt = grpcclient.InferInput("PROMPT", [3, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[b"one"], [b"two"], [b"three"]], dtype=object))
    seed = grpcclient.InferInput("SEED", [3, 1], "INT64")
    seed.set_data_from_numpy(np.array([[1], [2], [3]], dtype=np.int64))
    result = client.infer(TINY, [prompt, seed])
    images = result.as_numpy("IMAGE")
    assert images.shape == (3, 128, 128, 3)
    assert result.as_numpy("SEED").ravel().tolist() == [1, 2, 3]
    with DiffusionClient(f"grpc://{server.grpc_url}", TINY) as typed:
        assert_same_image(images[1], typed.generate("two", seed=2).array)


def test_a_request_cancelled_mid_denoise_leaves_the_batch_and_its_batch_mates_match_solo(delayed_server):
    """gRPC cancel of one of three batched requests: it is dropped at the next step, the others finish."""
    server = delayed_server(3)
    requests = [GenerationRequest(f"batch-mate {i}", seed=10 + i, height=256, width=256, steps=20) for i in range(3)]

    async def run():
        async with AsyncDiffusionClient(f"grpc://{server.grpc_url}", TINY, timeout_s=120) as client:
            await client.schema()
            tasks = [asyncio.create_task(client.generate(request)) for request in requests]
            await asyncio.to_thread(wait_until_denoising, server, 0)
            tasks[1].cancel()
            return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(run())
    assert isinstance(results[1], asyncio.CancelledError)
    assert batch_histogram(server) == {3: 1}, "the three requests must have shared one execution"
    assert metric(server, "diffusion_cancelled_rows_dropped_total") == 1, "the cancelled row was not dropped mid-call"
    assert metric(server, STEPS) == 21  # PNDM: 21 iterations for 20 steps, run once for the batch
    assert metric(server, "diffusion_requests_cancelled_total") == 1
    assert metric(server, "diffusion_images_total") == 2
    for result, solo in zip([results[0], results[2]], served_alone(server, [requests[0], requests[2]])):
        assert_same_image(result.array, solo)
