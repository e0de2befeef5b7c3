"""Every tiny family through the real server: batched equals alone, mixed families, family errors.

The tiny entries (``model_repository/*_tiny``) are random weights of the real architectures at
tiny widths, served by the same backend as every other model; only ``config.pbtxt`` differs.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from client import DiffusionClient, GenerationRequest, ServerError
from triton_diffusion.families import wan

from .conftest import assert_same_image, batch_histogram, metric, start_server

IMAGE_FAMILIES = ["flux_tiny", "sdxl_tiny", "sd3_tiny", "qwen_image_tiny", "z_image_tiny"]
VIDEO_FAMILIES = ["wan_tiny"]
FAMILIES = IMAGE_FAMILIES + VIDEO_FAMILIES
# Longer than every tokenizer's limit (CLIP 77, T5 256/512, Qwen 1058 tokens; one token per character).
LONGEST_PROMPT = ("a very long prompt about a red circle on a blue background " * 40)[:2000]
BATCH = 4


@pytest.fixture(scope="module")
def family_server(tmp_path_factory):
    """All tiny families (and the SD tiny model) on one server; each model's first batch waits
    for four requests (TRITONSERVER_DELAY_SCHEDULER), so four sent together form one execution."""
    server = start_server(tmp_path_factory.mktemp("families"), FAMILIES + ["stable_diffusion_tiny"],
                          {"TRITONSERVER_DELAY_SCHEDULER": str(BATCH)}, name="families",
                          extra_args=("--exit-timeout-secs=5",), require_ready=True)
    yield server
    server.stop()


def together(server, model, requests):
    """Send ``requests`` at once; results (or ServerErrors) in order."""
    with DiffusionClient(f"grpc://{server.grpc_url}", model, timeout_s=300) as client:
        def one(request):
            try:
                return client.generate(request)
            except ServerError as exc:
                return exc
        with ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(one, requests))


def alone(server, model, requests):
    with DiffusionClient(f"grpc://{server.grpc_url}", model) as client:
        return [client.generate(request).array for request in requests]


def mixed_batch(model):
    """Four rows of very different prompt lengths and seeds: two text-to-image rows, then two
    image-to-image rows with different source images (video: two clips of another length)."""
    rng = np.random.default_rng(0)
    requests = [GenerationRequest("a", seed=11), GenerationRequest(LONGEST_PROMPT, seed=12)]
    if model in VIDEO_FAMILIES:
        return requests + [GenerationRequest("a", seed=13, num_frames=9),
                           GenerationRequest(LONGEST_PROMPT, seed=14, num_frames=9)]
    sources = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    return requests + [GenerationRequest("a", seed=13, init_image=sources[0], strength=0.75),
                       GenerationRequest(LONGEST_PROMPT, seed=14, init_image=sources[1], strength=0.75)]


@pytest.mark.parametrize("model", FAMILIES)
def test_a_batch_of_distinct_prompts_and_seeds_equals_each_request_served_alone(family_server, model):
    requests = mixed_batch(model)
    results = together(family_server, model, requests)
    assert not [r for r in results if isinstance(r, ServerError)], results

    assert batch_histogram(family_server, model) == {BATCH: 1}, "the four requests must share one execution"
    # Two groups (text-to-image / image-to-image, or two clip lengths): two pipeline calls of two rows.
    assert metric(family_server, "diffusion_pipeline_calls_total", model) == 2
    assert [r.seed for r in results] == [11, 12, 13, 14]
    if model in VIDEO_FAMILIES:
        assert [r.array.shape for r in results] == [(5, 64, 64, 3)] * 2 + [(9, 64, 64, 3)] * 2
    else:
        assert [r.array.shape for r in results] == [(64, 64, 3)] * 4
    # A 1-token prompt beside a maximum-length one: padding and attention masks of a batch-mate
    # must not change a row.
    for result, solo in zip(results, alone(family_server, model, requests)):
        assert_same_image(result.array, solo)
    # The comparison above could not pass for a permutation: rows are far apart.
    assert np.abs(results[0].array.astype(int) - results[1].array.astype(int)).mean() > 1


def test_all_families_serve_at_once_on_one_server(family_server):
    models = FAMILIES + ["stable_diffusion_tiny"]
    with ThreadPoolExecutor(len(models)) as pool:
        outcomes = dict(zip(models, pool.map(
            lambda m: together(family_server, m, [GenerationRequest(f"{m} {i}", seed=i) for i in range(BATCH)]), models)))
    for model, results in outcomes.items():
        assert all(not isinstance(r, ServerError) for r in results), (model, results)
        assert len({r.array.tobytes() for r in results}) == BATCH, f"{model}: four seeds, four different outputs"
    assert outcomes["wan_tiny"][0].array.ndim == 4 and outcomes["flux_tiny"][0].array.ndim == 3
    assert outcomes["stable_diffusion_tiny"][0].array.shape == (128, 128, 3)


@pytest.mark.parametrize("model, bad, reason", [
    ("wan_tiny", GenerationRequest("clip", num_frames=6), f"NUM_FRAMES=6: {wan.FAMILY.pipelines[0]} makes 4k+1 frames"),
    ("wan_tiny", GenerationRequest("clip", num_frames=33), "NUM_FRAMES=33 is outside the allowed range [1, 17]"),
    ("wan_tiny", GenerationRequest("clip", height=72, width=64), "HEIGHT=72 must be a multiple of 16"),
    ("flux_tiny", GenerationRequest("a cat", negative_prompt="blurry"), "a NEGATIVE_PROMPT would be ignored"),
])
def test_a_request_its_family_cannot_serve_fails_alone_with_the_reason(family_server, model, bad, reason):
    good = [GenerationRequest(f"good {i}", seed=i) for i in range(BATCH - 1)]
    results = together(family_server, model, [good[0], bad, *good[1:]])
    error = results[1]
    assert isinstance(error, ServerError) and error.status == "StatusCode.INVALID_ARGUMENT", error
    assert reason in str(error)
    assert all(not isinstance(r, ServerError) for r in results[:1] + results[2:])


@pytest.mark.parametrize("video_format", ["mp4", "gif"])
def test_tdiff_saves_videos_a_player_can_read(family_server, tmp_path, video_format):
    import imageio_ffmpeg
    from PIL import Image

    from client.cli import main

    # Four prompts: the model's first execution waits for four requests.
    argv = ["--url", f"grpc://{family_server.grpc_url}", "--model", "wan_tiny", "generate", "one", "two", "three", "four",
            "--frames", "9", "--seed", "5", "--video-format", video_format, "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    files = sorted(tmp_path.glob(f"*.{video_format}"))
    assert len(files) == 4
    if video_format == "gif":
        with Image.open(files[0]) as gif:
            assert (gif.n_frames, gif.size) == (9, (64, 64))
    else:
        reader = imageio_ffmpeg.read_frames(str(files[0]))
        meta = next(reader)
        assert meta["size"] == (64, 64) and sum(1 for _ in reader) == 9
