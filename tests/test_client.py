"""The client library (sync + asyncio, gRPC + HTTP) and the tdiff CLI against live servers."""

import asyncio
import subprocess
import sys
import threading

import pytest
from PIL import Image

from client import AsyncDiffusionClient, DiffusionClient, GenerationRequest, RetryPolicy, ServerError
from testing import harness
from triton_diffusion import model_config

from .conftest import (
    BAD_HEIGHT, BAD_HEIGHT_ERROR, STEPS, TINY, assert_same_image, batch_histogram, metric, pending, start_server, wait_until_denoising,
)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_client_concurrency_8_returns_every_image_matched_to_its_prompt(server, protocol):
    url = f"{protocol}://{server.grpc_url if protocol == 'grpc' else server.http_url}"
    requests = [GenerationRequest(f"prompt {i}", seed=50 + i, height=64, width=64) for i in range(8)]

    async def run():
        async with AsyncDiffusionClient(url, TINY) as client:
            return await client.generate_many(requests, concurrency=8)

    results = asyncio.run(run())
    assert [r.seed for r in results] == [50 + i for i in range(8)]
    assert [r.request.prompt for r in results] == [f"prompt {i}" for i in range(8)]
    with DiffusionClient(f"grpc://{server.grpc_url}", TINY) as solo:
        for index in (0, 5, 7):  # a few solo replays: each result belongs to its own prompt and seed
            assert_same_image(results[index].array, solo.generate(requests[index]).array)
    assert (results[0].array != results[1].array).mean() > 0.5


def test_cancelling_a_long_grpc_request_ends_it_early(server):
    long = GenerationRequest("a very long request", seed=1, height=256, width=256, steps=50)
    steps_before, cancelled_before = metric(server, STEPS), metric(server, "diffusion_requests_cancelled_total")

    async def run():
        async with AsyncDiffusionClient(f"grpc://{server.grpc_url}", TINY) as client:
            await client.schema()
            task = asyncio.create_task(client.generate(long))
            await asyncio.to_thread(wait_until_denoising, server, steps_before)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(run())
    harness.wait_for_metric(server, "diffusion_requests_cancelled_total", TINY, cancelled_before + 1)
    # The call stopped within a few steps of the cancel, not after all 50 (PNDM runs 51).
    steps_run = metric(server, STEPS) - steps_before
    assert steps_run < 25, f"the cancelled call ran {steps_run:.0f} steps"
    assert metric(server, "diffusion_requests_cancelled_total") == cancelled_before + 1


@pytest.fixture(scope="module")
def stalled_server(tmp_path_factory):
    """A server whose batcher holds every request in its queue (the delay count is never reached)."""
    server = start_server(tmp_path_factory.mktemp("stalled"), [TINY], {"TRITONSERVER_DELAY_SCHEDULER": "1000"},
                          name="stalled", extra_args=("--exit-timeout-secs=5",), require_ready=True)
    yield server
    server.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_timeout_raises_the_clients_error_in_both_clients_and_generate_many_keeps_going(stalled_server, protocol):
    url = f"{protocol}://{stalled_server.grpc_url if protocol == 'grpc' else stalled_server.http_url}"
    request = GenerationRequest("never scheduled", seed=1, height=64, width=64, steps=2)
    no_retry = RetryPolicy(attempts=1)

    with DiffusionClient(url, TINY, timeout_s=0.5, retry=no_retry) as client:
        with pytest.raises(ServerError) as error:
            client.generate(request)
        assert error.value.timed_out, error.value
        outcomes = client.generate_many([request] * 3, concurrency=3)
    assert len(outcomes) == 3 and all(isinstance(o, ServerError) and o.timed_out for o in outcomes), outcomes

    async def run():
        async with AsyncDiffusionClient(url, TINY, timeout_s=0.5, retry=no_retry) as client:
            with pytest.raises(ServerError) as error:
                await client.generate(request)
            assert error.value.timed_out
            return await client.generate_many([request] * 3, concurrency=3)

    outcomes = asyncio.run(run())
    assert len(outcomes) == 3 and all(isinstance(o, ServerError) and o.timed_out for o in outcomes), outcomes


def test_an_http_client_that_gives_up_does_not_cancel_its_request(delayed_server):
    """Pins a Triton 2.51 limitation (docs/reliability.md): only gRPC propagates cancellation.

    The first request waits in the queue until a second one arrives (delay count 2), so the HTTP
    client certainly gives up first. If a Triton upgrade starts cancelling on HTTP disconnects,
    the abandoned request is dropped, this fails and the docs change.
    """
    server = delayed_server(2)
    impatient = DiffusionClient(f"http://{server.http_url}", TINY, timeout_s=2, retry=RetryPolicy(attempts=1))
    with pytest.raises(ServerError) as error:
        impatient.generate(GenerationRequest("abandoned over HTTP", seed=3, height=64, width=64, steps=2))
    assert error.value.timed_out
    harness.wait_until(lambda: pending(server) == 1, "the abandoned request to be queued on the server")
    with DiffusionClient(f"grpc://{server.grpc_url}", TINY) as client:
        assert client.generate("releases the batch", seed=4, height=64, width=64, steps=2).array.shape == (64, 64, 3)
    assert batch_histogram(server) == {2: 1}, "the abandoned request was not run with the second one"
    assert metric(server, "diffusion_images_total") == 2
    assert metric(server, "diffusion_requests_cancelled_total") == 0


@pytest.fixture(scope="module")
def small_queue_server(tmp_path_factory):
    """A variant of the tiny model whose queue holds one request: the rest are rejected at once."""
    root = tmp_path_factory.mktemp("queue")
    name = "tiny_queue1"
    model_config.write_model(root / "repo", model_config.variant(
        name, dynamic_batching="max_queue_delay_microseconds: 1000 default_queue_policy { max_queue_size: 1 }",
        max_batch_size=1))
    server = start_server(root, [name], repository=root / "repo", require_ready=True)
    yield server, name
    server.stop()


def test_queue_full_is_unavailable_and_the_client_retries_until_it_succeeds(small_queue_server):
    server, name = small_queue_server
    url = f"grpc://{server.grpc_url}"
    steps_before = metric(server, STEPS, name)
    blocker = threading.Thread(target=lambda: DiffusionClient(url, name).generate("blocker", seed=0, height=256, width=256, steps=40))
    blocker.start()
    wait_until_denoising(server, steps_before, name)
    # While the blocker runs, at most two of five fit (one taken for the next execution, one queued).
    requests = [GenerationRequest(f"p{i}", seed=i, steps=2, height=64, width=64) for i in range(5)]
    no_retry = DiffusionClient(url, name, retry=RetryPolicy(attempts=1))
    rejected = [r for r in no_retry.generate_many(requests, concurrency=5) if isinstance(r, ServerError)]
    assert len(rejected) >= 3, [str(r) for r in rejected]
    assert all(r.retryable and "queue" in str(r).lower() for r in rejected), [str(r) for r in rejected]
    blocker.join()

    # Retries are bounded by attempts, not by time: on a busy machine they just wait longer.
    patient = DiffusionClient(url, name, retry=RetryPolicy(attempts=10_000, initial_backoff_s=0.05, max_backoff_s=0.5))
    results = patient.generate_many(requests, concurrency=5)
    assert all(not isinstance(r, Exception) for r in results), [str(r) for r in results]
    assert [r.seed for r in results] == list(range(5))


def test_invalid_request_is_not_retried(server):
    calls = []
    client = DiffusionClient(f"grpc://{server.grpc_url}", TINY, retry=RetryPolicy(attempts=5))
    original = client._generate_once
    client._generate_once = lambda request: calls.append(1) or original(request)
    with pytest.raises(ServerError) as error:
        client.generate("x", steps=0)
    assert not error.value.retryable and len(calls) == 1


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "client.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_generate_writes_pngs_with_metadata(server, tmp_path):
    done = run_cli("--url", f"grpc://{server.grpc_url}", "generate", "a red fox", "a blue boat", "--n", "2",
                   "--seed", "7", "--size", "64x64", "--steps", "4", "--out", str(tmp_path), "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(tmp_path.glob("*.png"))
    assert len(files) == 4
    metadata = [Image.open(f).text for f in files]
    assert sorted((m["prompt"], int(m["seed"])) for m in metadata) == [
        ("a blue boat", 9), ("a blue boat", 10), ("a red fox", 7), ("a red fox", 8)]
    assert Image.open(files[0]).size == (64, 64)
    assert "4/4 images" in done.stdout and "p99" in done.stdout


def test_cli_exits_non_zero_when_a_request_fails(server, tmp_path):
    done = run_cli("--url", f"http://{server.http_url}", "generate", "fine", "--size", f"{BAD_HEIGHT}x{BAD_HEIGHT}", "--out", str(tmp_path), "--quiet")
    assert done.returncode == 1
    assert BAD_HEIGHT_ERROR in done.stdout + done.stderr


def test_cli_health_and_stats(server):
    health = run_cli("--url", f"grpc://{server.grpc_url}", "health")
    assert health.returncode == 0 and "ready=True" in health.stdout and "PROMPT" in health.stdout
    down = run_cli("--url", f"grpc://{server.grpc_url}", "--model", "sd_turbo", "health")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stdout
    stats = run_cli("--url", f"http://{server.http_url}", "stats", "--metrics-url", server.metrics_url)
    assert stats.returncode == 0 and "executions" in stats.stdout and "diffusion_pipeline_calls_total" in stats.stdout
