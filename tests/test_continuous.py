"""Continuous batching through the real server (``batching: continuous``, decoupled models).

Every image is compared with the same request served alone by the dynamic-batching model of the
same family (same random weights), i.e. by the diffusers pipeline's own ``__call__``: the step
loop must reproduce it, whatever joined or left the running batch meanwhile. Tests wait on the
server's metrics (steps run, rows admitted, requests cancelled), never on sleeps.
"""

from __future__ import annotations

import asyncio
import random
import shutil

import numpy as np
import pytest

from client import DiffusionClient, GenerationRequest, RetryPolicy, ServerError
from client.aio import AsyncDiffusionClient
from testing import harness
from triton_diffusion import model_config
from triton_diffusion.families import FAMILIES
from triton_diffusion.launcher import DEFAULT_MODEL_REPOSITORY
from triton_diffusion.settings import ModelSettings

from .conftest import STEPS, assert_same_image, metric, pending, start_server

# continuous model -> the dynamic-batching model with the same weights: each family with a step adapter
PAIRS = {f"{family.test_model}_continuous": family.test_model for family in FAMILIES if family.steps is not None}
LONG_STEPS = 300  # a long request: many steps of the tiny model, so others can join it mid-flight


def settings_of(model: str) -> ModelSettings:
    return ModelSettings.from_parameters(model_config.parameters(model_config.shipped(model)))


def long_steps(model: str) -> int:
    """A long request within the model's step limit (the tiny SD model allows 50, at a default size
    where 50 of its steps take as long as 300 of the others')."""
    return min(LONG_STEPS, settings_of(model).limits.max_steps)


def sides(model: str) -> list[int]:
    """Two heights the model accepts, so rows of two sizes share the running batch."""
    low = max(48, settings_of(model).limits.min_side)
    return [low, 2 * low if low >= 64 else 64]


ADMITTED = "diffusion_continuous_admissions_total"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = list(PAIRS) + list(PAIRS.values())
    server = start_server(tmp_path_factory.mktemp("continuous"), models, name="continuous", require_ready=True)
    yield server
    server.stop()


def served_alone(server, model: str, requests: list[GenerationRequest]) -> list[np.ndarray]:
    with DiffusionClient(f"grpc://{server.grpc_url}", PAIRS[model], timeout_s=300) as client:
        return [client.generate(request).array for request in requests]


def admitted(server, model: str, when: str) -> float:
    return harness.metric(server, ADMITTED, model, when=when)


def wait_for_admitted(server, model: str, rows: float) -> None:
    harness.wait_until(lambda: admitted(server, model, "idle") + admitted(server, model, "mid_flight") >= rows,
                       f"{rows} rows admitted to {model}'s running batch")


async def timed(client: AsyncDiffusionClient, request: GenerationRequest, finished: list, label: str):
    result = await client.generate(request)
    finished.append(label)
    return result


def join_mid_flight(server, model: str, long: GenerationRequest, short: GenerationRequest):
    """Send ``long``; once it is denoising, send ``short``. (labels in the order they finished,
    long's result, short's result)."""
    async def scenario():
        finished: list[str] = []
        async with AsyncDiffusionClient(f"grpc://{server.grpc_url}", model, timeout_s=300) as client:
            steps_before = metric(server, STEPS, model)
            long_task = asyncio.create_task(timed(client, long, finished, "long"))
            # the long request is denoising: the short one arrives mid-flight
            await asyncio.to_thread(harness.wait_for_metric, server, STEPS, model, steps_before + 1)
            short_result = await timed(client, short, finished, "short")
            return finished, await long_task, short_result

    return asyncio.run(scenario())


def test_batching_continuous_alone_makes_a_decoupled_model_with_progress(server):
    """The continuous configs say only ``batching: continuous``; the backend's auto_complete_config
    declares the decoupled policy, the PROGRESS output and no image-to-image inputs."""
    import tritonclient.http as httpclient

    for model in PAIRS:
        served = httpclient.InferenceServerClient(server.http_url).get_model_config(model)
        assert served["model_transaction_policy"]["decoupled"], model
        assert [entry["name"] for entry in served["output"]] == ["IMAGE", "SEED", "PROGRESS"], model
        assert "IMAGE" not in {entry["name"] for entry in served["input"]}, model


@pytest.mark.parametrize("model", PAIRS)
def test_a_short_request_joins_a_running_long_one_finishes_first_and_equals_its_solo_image(server, model):
    long = GenerationRequest("a long walk along a grey beach at dawn", seed=21, steps=long_steps(model))
    short = GenerationRequest("a red circle", seed=22, steps=3, guidance_scale=1.5)
    mid_flight_before = admitted(server, model, "mid_flight")
    finished, long_result, short_result = join_mid_flight(server, model, long, short)
    assert finished == ["short", "long"], "the short request must not wait for the long one"
    assert admitted(server, model, "mid_flight") == mid_flight_before + 1
    long_alone, short_alone = served_alone(server, model, [long, short])
    assert_same_image(short_result.array, short_alone)
    assert_same_image(long_result.array, long_alone)
    assert (short_result.seed, long_result.seed) == (22, 21)


@pytest.mark.parametrize("model", PAIRS)
def test_ten_requests_arriving_at_random_times_each_equal_their_solo_image(server, model):
    rng = random.Random(7)
    requests = [GenerationRequest(f"shape {index}: a {rng.choice(['red', 'blue', 'green'])} square " * rng.randint(1, 20),
                                  seed=100 + index, steps=rng.randint(2, 24), guidance_scale=rng.choice([0.0, 1.0, 3.5]),
                                  height=rng.choice(sides(model)), width=64)
                for index in range(10)]
    delays = [rng.uniform(0, 0.3) for _ in requests]  # arrival times (load shape, not synchronisation)
    admitted_before = admitted(server, model, "idle") + admitted(server, model, "mid_flight")

    async def scenario():
        async with AsyncDiffusionClient(f"grpc://{server.grpc_url}", model, timeout_s=300) as client:
            async def arrive(delay, request):
                await asyncio.sleep(delay)
                return await client.generate(request)
            return await asyncio.gather(*(arrive(d, r) for d, r in zip(delays, requests)))

    results = asyncio.run(scenario())
    for result, alone, request in zip(results, served_alone(server, model, requests), requests):
        assert result.seed == request.seed
        assert_same_image(result.array, alone)
    # each request's one row was admitted once (whether mid-flight depends on timing; that rows do
    # join mid-flight is shown by the test above)
    assert admitted(server, model, "idle") + admitted(server, model, "mid_flight") - admitted_before == len(requests)


def test_a_cancelled_row_leaves_the_running_batch_and_its_neighbours_unchanged(server):
    model = "flux_tiny_continuous"
    # the middle one, cancelled, is the longest: it is still running whenever the cancel lands
    requests = [GenerationRequest(f"neighbour {index}", seed=300 + index, steps=steps)
                for index, steps in enumerate([LONG_STEPS // 2, 400, LONG_STEPS // 2])]
    cancelled_before = metric(server, "diffusion_requests_cancelled_total", model)
    rows_before = admitted(server, model, "idle") + admitted(server, model, "mid_flight")

    async def scenario():
        async with AsyncDiffusionClient(f"grpc://{server.grpc_url}", model, timeout_s=300) as client:
            tasks = [asyncio.create_task(client.generate(request)) for request in requests]
            await asyncio.to_thread(wait_for_admitted, server, model, rows_before + 3)
            steps = metric(server, STEPS, model)
            await asyncio.to_thread(harness.wait_for_metric, server, STEPS, model, steps + 1)  # all three denoising
            tasks[1].cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return results

    results = asyncio.run(scenario())
    assert isinstance(results[1], asyncio.CancelledError)
    harness.wait_for_metric(server, "diffusion_requests_cancelled_total", model, cancelled_before + 1)
    kept = [requests[0], requests[2]]
    for result, alone in zip([results[0], results[2]], served_alone(server, model, kept)):
        assert_same_image(result.array, alone)


def test_bad_requests_get_their_own_error_and_batch_mates_are_served(server):
    model = "flux_tiny_continuous"
    with DiffusionClient(f"grpc://{server.grpc_url}", model, timeout_s=120, retry=RetryPolicy(attempts=1)) as client:
        with pytest.raises(ServerError, match="NUM_INFERENCE_STEPS"):
            client.generate(GenerationRequest("too many steps", steps=100_000))
        with pytest.raises(ServerError, match="NEGATIVE_PROMPT"):
            client.generate(GenerationRequest("flux takes none", negative_prompt="blurry"))
        with pytest.raises(ValueError, match="text-to-image only"):
            client.generate(GenerationRequest("no source images", init_image=np.zeros((64, 64, 3), np.uint8)))
        assert client.generate(GenerationRequest("still serving", seed=1, steps=2)).array.shape == (64, 64, 3)
    with pytest.raises(ServerError, match="gRPC"):
        with DiffusionClient(f"http://{server.http_url}", model) as client:
            client.generate(GenerationRequest("over http", steps=2))
    assert metric(server, "diffusion_request_errors_total", model) >= 2


def test_priority_decides_which_waiting_request_joins_first(tmp_path_factory):
    """A running batch of one row: the high-priority request sent last is admitted before the
    normal one sent first (they wait in Triton's priority queue, not in the model)."""
    repository = tmp_path_factory.mktemp("one-row")
    shutil.copytree(DEFAULT_MODEL_REPOSITORY / "flux_tiny_continuous", repository / "flux_tiny_continuous")
    config = repository / "flux_tiny_continuous" / "config.pbtxt"
    config.write_text(config.read_text().replace('key: "max_images_per_call", value: { string_value: "8" }',
                                                 'key: "max_images_per_call", value: { string_value: "1" }')
                      .replace("max_batch_size: 8", "max_batch_size: 1"))
    model = "flux_tiny_continuous"
    server = start_server(tmp_path_factory.mktemp("priority"), [model], name="priority", repository=repository,
                          require_ready=True)
    try:
        async def scenario():
            finished: list[str] = []
            async with AsyncDiffusionClient(f"grpc://{server.grpc_url}", model, timeout_s=300) as client:
                steps = metric(server, STEPS, model)
                first = asyncio.create_task(timed(client, GenerationRequest("running", seed=1, steps=LONG_STEPS // 2),
                                                  finished, "running"))
                await asyncio.to_thread(harness.wait_for_metric, server, STEPS, model, steps + 1)
                normal = asyncio.create_task(timed(client, GenerationRequest("normal", seed=2, steps=2), finished, "normal"))
                await asyncio.to_thread(harness.wait_until, lambda: pending(server, model) >= 1, "the normal request queued")
                high = asyncio.create_task(timed(client, GenerationRequest("high", seed=3, steps=2, priority=1),
                                                 finished, "high"))
                await asyncio.to_thread(harness.wait_until, lambda: pending(server, model) >= 2, "both requests queued")
                await asyncio.gather(first, normal, high)
            return finished

        assert asyncio.run(scenario()) == ["running", "high", "normal"]
    finally:
        server.stop()


def test_a_compiled_running_batch_is_warmed_before_ready_and_compiles_nothing_while_serving(server, tmp_path_factory):
    """torch.compile (its ``eager`` backend: dynamo's tracing, guards and graph counting at CPU test
    speed) of the FLUX denoiser and VAE in continuous mode: the warm-up runs the step loop itself at
    1, 2 and 4 rows before READY, so rows joining and leaving (any count, mixed guidance) reuse
    its graphs, and the images still equal the plain pipeline's."""
    model = "flux_tiny_continuous_compiled"
    repository = tmp_path_factory.mktemp("compiled-continuous")
    parameters = {"compile": "regional", "compile_vae": "true", "compile_backend": "eager", "speed_devices": "cpu",
                  "max_images_per_call": "4"}
    model_config.write_model(repository, model_config.variant(model, parameters, max_batch_size=4,
                                                              base="flux_tiny_continuous"),
                             base="flux_tiny_continuous")
    compiled = start_server(tmp_path_factory.mktemp("compiled"), [model], name="compiled-continuous",
                            repository=repository, require_ready=True)
    try:
        assert metric(compiled, "diffusion_warmup_seconds", model) > 0
        long = GenerationRequest("a lighthouse in fog", seed=31, steps=LONG_STEPS // 2)
        joiners = [GenerationRequest(f"joiner {index}", seed=32 + index, steps=2 + 3 * index, guidance_scale=scale)
                   for index, scale in enumerate([1.0, 3.5, 5.0])]

        async def scenario():
            async with AsyncDiffusionClient(f"grpc://{compiled.grpc_url}", model, timeout_s=300) as client:
                long_task = asyncio.create_task(client.generate(long))
                await asyncio.to_thread(harness.wait_for_metric, compiled, STEPS, model, 1)
                return await asyncio.gather(long_task, *(client.generate(request) for request in joiners))

        results = asyncio.run(scenario())
        assert admitted(compiled, model, "mid_flight") >= 1
        assert metric(compiled, "diffusion_compilations_while_serving_total", model) == 0
        for result, alone in zip(results, served_alone(server, "flux_tiny_continuous", [long, *joiners])):
            assert_same_image(result.array, alone)
    finally:
        compiled.stop()
