"""The client library (sync + asyncio, gRPC + HTTP) and the tdiff CLI against live servers."""

import asyncio
import subprocess
import sys
import time

import pytest
from PIL import Image

from client import AsyncDiffusionClient, DiffusionClient, GenerationRequest, RetryPolicy, ServerError
from perf.variants import render_config, write_variant

from .conftest import TINY, assert_same_image, metric, start_server


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
    long = GenerationRequest("a very long request", seed=1, height=512, width=512, steps=50)
    before = metric(server, "diffusion_requests_cancelled_total")

    async def run():
        async with AsyncDiffusionClient(f"grpc://{server.grpc_url}", TINY) as client:
            await client.defaults()
            task = asyncio.create_task(client.generate(long))
            await asyncio.sleep(2.0)  # it is now denoising (a full run takes ~25 s here)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            started = time.perf_counter()
            quick = await client.generate("right after", seed=2, height=64, width=64)
            return quick, time.perf_counter() - started

    quick, seconds = asyncio.run(run())
    assert quick.array.shape == (64, 64, 3)
    # The instance was freed within a step or two, not after the remaining ~45 steps.
    assert seconds < 10, f"the next request waited {seconds:.1f}s: the cancelled call kept running"
    deadline = time.time() + 10
    while metric(server, "diffusion_requests_cancelled_total") <= before and time.time() < deadline:
        time.sleep(0.2)
    assert metric(server, "diffusion_requests_cancelled_total") == before + 1


def test_an_http_client_that_gives_up_does_not_cancel_its_request(server):
    """Pins a Triton 2.51 limitation (README, Reliability): only gRPC propagates cancellation.

    If a Triton upgrade starts cancelling on HTTP disconnects, this fails and the docs change.
    """
    images, cancelled = metric(server, "diffusion_images_total"), metric(server, "diffusion_requests_cancelled_total")
    impatient = DiffusionClient(f"http://{server.http_url}", TINY, timeout_s=1.5)
    started = time.perf_counter()
    with pytest.raises(TimeoutError):
        impatient.generate(GenerationRequest("abandoned over HTTP", seed=3, height=256, width=256, steps=30))
    assert time.perf_counter() - started < 5, "the client did not give up on its own deadline"
    deadline = time.time() + 60
    while metric(server, "diffusion_images_total") <= images and time.time() < deadline:
        time.sleep(0.5)
    assert metric(server, "diffusion_images_total") == images + 1, "the abandoned request was not run to the end"
    assert metric(server, "diffusion_requests_cancelled_total") == cancelled


@pytest.fixture(scope="module")
def small_queue_server(tmp_path_factory):
    """A variant of the tiny model whose queue holds one request: the rest are rejected at once."""
    root = tmp_path_factory.mktemp("queue")
    name = "tiny_queue1"
    write_variant(root / "repo", name, render_config(
        name, {}, "max_queue_delay_microseconds: 1000 default_queue_policy { max_queue_size: 1 }", max_batch_size=1))
    server = start_server(root, [name], repository=root / "repo")
    yield server, name
    server.stop()


def test_queue_full_is_unavailable_and_the_client_retries_until_it_succeeds(small_queue_server):
    server, name = small_queue_server
    requests = [GenerationRequest(f"p{i}", seed=i, steps=20, height=256, width=256) for i in range(5)]
    no_retry = DiffusionClient(f"grpc://{server.grpc_url}", name, retry=RetryPolicy(attempts=1))
    rejected = [r for r in no_retry.generate_many(requests, concurrency=5) if isinstance(r, ServerError)]
    assert rejected, "five concurrent requests on a queue of one must see rejections"
    assert all(r.retryable and "queue" in str(r).lower() for r in rejected), [str(r) for r in rejected]

    patient = DiffusionClient(f"grpc://{server.grpc_url}", name, retry=RetryPolicy(attempts=60, initial_backoff_s=0.1, max_backoff_s=1.0))
    results = patient.generate_many(requests, concurrency=5)
    assert all(not isinstance(r, ServerError) for r in results), [str(r) for r in results]
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
    done = run_cli("--url", f"http://{server.http_url}", "generate", "fine", "--size", "100x100", "--out", str(tmp_path), "--quiet")
    assert done.returncode == 1
    assert "HEIGHT=100 must be a multiple of 8" in done.stdout + done.stderr


def test_cli_health_and_stats(server):
    health = run_cli("--url", f"grpc://{server.grpc_url}", "health")
    assert health.returncode == 0 and "ready=True" in health.stdout and "PROMPT" in health.stdout
    down = run_cli("--url", f"grpc://{server.grpc_url}", "--model", "sd_turbo", "health")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stdout
    stats = run_cli("--url", f"http://{server.http_url}", "stats", "--metrics-url", server.metrics_url)
    assert stats.returncode == 0 and "executions" in stats.stdout and "diffusion_pipeline_calls_total" in stats.stdout
