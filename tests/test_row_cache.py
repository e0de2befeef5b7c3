"""The per-row first-block cache (row_cache.py): each row skips or computes from its own residuals,
so a cached request batched with others equals the same request served alone with the same cache.
diffusers' own FirstBlockCache, deciding for the whole batch, is the control that shows the test can
fail."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from triton_diffusion import row_cache
from triton_diffusion.acceleration import denoiser_of, reset_step_cache
from triton_diffusion.pipeline import PipelineRunner
from triton_diffusion.settings import ModelSettings

CPU = {"device": "cpu", "torch_dtype": "float32", "torch_num_threads": 2, "speed_devices": ("cpu",)}
ROWS = (("a red barn in snow", 1), ("a blue car on a road at night, photograph", 2), ("green apple", 3))
STEPS = 8
# Batched vs alone without any cache differs by float rounding of batched kernels (~1e-7 relative
# here); a different skip decision for a row moves its latents by ~1e-3.
SAME, DIFFERENT = 1e-5, 1e-4


def test_each_row_decides_from_its_own_residuals():
    kept = torch.ones(3, 4, 2)
    residual = kept.clone()
    residual[1] += 0.5  # row 1 moved 50%, the others not at all
    assert row_cache.rows_to_compute(residual, kept, 0.2).tolist() == [False, True, False]
    # the same row alone decides the same
    assert row_cache.rows_to_compute(residual[1:2], kept[1:2], 0.2).tolist() == [True]
    assert row_cache.rows_to_compute(residual, kept, 0.6).tolist() == [False, False, False]


def test_the_padding_a_batch_adds_to_a_shorter_row_does_not_count():
    kept = torch.ones(2, 4, 2)
    residual = kept.clone()
    residual[0, 3] += 10  # row 0's last position is padding to the batch's length (alone it has 3 tokens)
    tokens = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert row_cache.rows_to_compute(residual, kept, 0.2, tokens).tolist() == [False, False]
    assert row_cache.rows_to_compute(residual[:1, :3], kept[:1, :3], 0.2).tolist() == [False]  # as alone
    assert row_cache.rows_to_compute(residual, kept, 0.2).tolist() == [True, False]  # the padding counted


def runner(arch: str, step_cache: str = "", **settings) -> PipelineRunner:
    return PipelineRunner.load(ModelSettings.build(pretrained_model=f"random:{arch}", **CPU, step_cache=step_cache, **settings))


def final_latents(loaded: PipelineRunner, rows, guidance: dict) -> torch.Tensor:
    """One pipeline call over ``rows`` (indices into ROWS), reset first as the server resets."""
    pipe = loaded.text_to_image
    reset_step_cache(pipe)
    with torch.inference_mode():
        return pipe(prompt=[ROWS[i][0] for i in rows], num_inference_steps=STEPS, height=64, width=64, output_type="latent",
                    generator=[torch.Generator().manual_seed(ROWS[i][1]) for i in rows], **guidance).images.float()


def batched_against_alone(loaded: PipelineRunner, guidance: dict, guidance_alone: dict = None):
    """Relative max difference per row, batched vs alone; the row-steps skipped batched and alone."""
    denoiser = denoiser_of(loaded.text_to_image)
    before = row_cache.skipped_rows(denoiser)
    together = final_latents(loaded, range(len(ROWS)), guidance)
    skipped_together, skipped_alone, alone = row_cache.skipped_rows(denoiser) - before, [], []
    for index in range(len(ROWS)):
        before = row_cache.skipped_rows(denoiser)
        alone.append(final_latents(loaded, [index], guidance_alone or guidance)[0])
        skipped_alone.append(row_cache.skipped_rows(denoiser) - before)
    differences = [float((row - solo).abs().max() / solo.abs().max()) for row, solo in zip(together, alone)]
    return differences, skipped_together, skipped_alone


@pytest.mark.parametrize("arch, guidance, settings, threshold", [
    ("flux-dev-tiny", {"guidance_scale": 3.5}, {}, 0.3),
    # the transformer blocks compiled (the eager backend: dynamo's tracing and guards, without inductor)
    ("flux-dev-tiny", {"guidance_scale": 3.5}, {"compile": "regional", "compile_backend": "eager"}, 0.3),
    ("qwen-image-tiny", {"true_cfg_scale": 4.0, "negative_prompt": [" "] * 3}, {}, 0.3),  # two passes, each its own residuals
    # no cache context and no diffusers cache hooks; guidance rows in one call; captions of different
    # lengths padded to one sequence (the padding must not count). Its random residuals move more per step.
    ("z-image-turbo-tiny", {"guidance_scale": 4.0}, {}, 1.0),
], ids=["flux", "flux-compiled", "qwen-image", "z-image"])
def test_a_cached_row_batched_equals_the_same_request_alone(arch, guidance, settings, threshold):
    loaded = runner(arch, f"FirstBlockCache threshold={threshold}", **settings)
    assert any("decided per row" in applied for applied in loaded.speed)
    alone = {**guidance, "negative_prompt": [" "]} if "negative_prompt" in guidance else guidance
    differences, skipped_together, skipped_alone = batched_against_alone(loaded, guidance, alone)
    assert skipped_together > 0, "the cache must actually skip"
    assert skipped_together == sum(skipped_alone), (skipped_together, skipped_alone)  # every row decided as alone
    assert max(differences) < SAME, differences


def test_a_cache_applied_after_a_pipeline_call_still_keeps_the_guidance_passes_apart():
    """The fp8 guard's probe calls the pipeline before the cache is applied, and diffusers keeps the
    list of hooked modules it found then; the cache's blocks must still get the "cond" and "uncond"
    contexts (each pass its own residuals), as on a model that never ran before the cache."""
    guidance = {"true_cfg_scale": 4.0, "negative_prompt": [" "] * 3}
    late = runner("qwen-image-tiny")
    final_latents(late, range(3), guidance)  # a call before the cache exists
    row_cache.apply(denoiser_of(late.text_to_image), 0.6)
    fresh = runner("qwen-image-tiny", "FirstBlockCache threshold=0.6")
    skipped = row_cache.skipped_rows(denoiser_of(late.text_to_image))
    torch.testing.assert_close(final_latents(late, range(3), guidance), final_latents(fresh, range(3), guidance))
    assert row_cache.skipped_rows(denoiser_of(late.text_to_image)) > skipped


def test_rows_of_one_batch_decide_differently_and_diffusers_whole_batch_cache_would_not_keep_them_apart():
    """At this threshold the rows of one FLUX batch decide differently (one runs every block at every
    step, the others skip): the per-row cache keeps each equal to its solo latents; diffusers'
    FirstBlockCache, deciding from the batch's mean, moves a row by 1e-4 or more."""
    from diffusers import FirstBlockCacheConfig

    ours = runner("flux-dev-tiny", "FirstBlockCache threshold=0.3")
    differences, _, skipped_alone = batched_against_alone(ours, {"guidance_scale": 3.5})
    assert 0 in skipped_alone and max(skipped_alone) > 0, skipped_alone  # mixed decisions
    assert max(differences) < SAME, differences
    theirs = runner("flux-dev-tiny")
    denoiser_of(theirs.text_to_image).enable_cache(FirstBlockCacheConfig(threshold=0.3))
    their_differences = []
    together = final_latents(theirs, range(len(ROWS)), {"guidance_scale": 3.5})
    for index in range(len(ROWS)):
        solo = final_latents(theirs, [index], {"guidance_scale": 3.5})[0]
        their_differences.append(float((together[index] - solo).abs().max() / solo.abs().max()))
    assert max(their_differences) > DIFFERENT, their_differences


def test_exact_and_cached_requests_share_a_call_and_each_gets_its_own_image():
    """STEP_CACHE per request: rows that asked for the cache skip where it allows, a row that did not
    runs every block, in one call; each equals the same request alone (cached alone, or uncached)."""
    import numpy as np

    from triton_diffusion.requests import text_to_image

    cached, plain = runner("flux-dev-tiny", "FirstBlockCache threshold=0.5"), runner("flux-dev-tiny")
    denoiser = denoiser_of(cached.text_to_image)

    def items(indices, flags):
        return [dataclasses.replace(text_to_image(ROWS[i][0], ROWS[i][1], STEPS, 3.5, 64, 64), step_cache=flag)
                for i, flag in zip(indices, flags)]

    before = row_cache.skipped_rows(denoiser)
    mixed = items(range(3), [True, False, True])
    together = cached.run(mixed[0].params, mixed)
    assert row_cache.skipped_rows(denoiser) > before
    for index, image in enumerate(together):
        one = items([index], [mixed[index].step_cache])
        alone = (cached if mixed[index].step_cache else plain).run(one[0].params, one)[0]
        assert np.abs(image.astype(int) - alone.astype(int)).max() <= 1, index
    # nobody asked: the cache skips nothing
    before = row_cache.skipped_rows(denoiser)
    exact = items(range(3), [False] * 3)
    cached.run(exact[0].params, exact)
    assert row_cache.skipped_rows(denoiser) == before


def test_a_cancelled_batch_mate_does_not_change_a_cached_rows_decisions():
    """FLUX drops a cancelled row from the running call (cancellation.py); the row cache drops its
    residuals with it, so the cached rows left go on deciding as they would alone."""
    from testing.rows import CancelAfter
    from triton_diffusion.cancellation import per_row_checks

    loaded = runner("flux-dev-tiny", "FirstBlockCache threshold=0.5")
    denoiser = denoiser_of(loaded.text_to_image)
    before = row_cache.skipped_rows(denoiser)
    alone = [final_latents(loaded, [index], {"guidance_scale": 3.5})[0] for index in (0, 2)]
    skipped_alone = row_cache.skipped_rows(denoiser) - before
    captured = []
    original = loaded.text_to_image.vae.decode
    loaded.text_to_image.vae.decode = lambda latents, **kw: (captured.append(latents.clone()), original(latents, **kw))[1]
    try:
        from triton_diffusion.requests import text_to_image

        row_cache.allow(denoiser, None)
        items = [text_to_image(ROWS[i][0], ROWS[i][1], STEPS, 3.5, 64, 64) for i in range(3)]
        items = [dataclasses.replace(item, step_cache=True) for item in items]
        never = lambda: False  # noqa: E731
        before = row_cache.skipped_rows(denoiser)
        outputs = loaded.run(items[0].params, items, per_row_checks([never, CancelAfter(1), never]))
        assert row_cache.skipped_rows(denoiser) - before >= skipped_alone > 0  # (rows 0 and 2 skipped as alone)
    finally:
        del loaded.text_to_image.vae.decode
    assert outputs[1] is None and outputs[0] is not None and outputs[2] is not None
    pipe = loaded.text_to_image
    reference = torch.stack(alone)
    unpacked = pipe._unpack_latents(reference[:, None] if reference.dim() == 2 else reference, 64, 64, pipe.vae_scale_factor)
    kept = captured[-1].float()
    expected = (unpacked / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
    assert float((kept - expected).abs().max() / expected.abs().max()) < SAME


# -- continuous batching ----------------------------------------------------------------------------

JOINERS = {2: [1], 3: [2, 3]}  # at loop iteration 2 row 1 joins the running batch, at 3 rows 2 and 3


@pytest.mark.parametrize("arch, guidance, threshold", [
    ("z-image-turbo-tiny", 4.0, 1.0),  # single stream, captions of different lengths under one mask
    ("flux-dev-tiny", 3.5, 0.6),  # two streams, no classifier-free guidance
    ("qwen-image-tiny", 4.0, 0.6),  # two streams, captions padded per call, unconditional twins after
    ("sd35-large-tiny", 4.0, 0.6),  # unconditional twins first; its last block returns no text stream
], ids=["z-image", "flux", "qwen-image", "sd3"])
def test_rows_joining_a_running_batch_keep_their_own_residuals(arch, guidance, threshold):
    """Continuous batching with the per-row cache: rows of different step counts and guidance join a
    running batch at different steps, one of them exact (STEP_CACHE=0); each skips exactly where it
    skips alone and ends with its solo image, because its residuals travel with it (``resume``)."""
    import numpy as np

    from testing.rows import run_joining
    from triton_diffusion.families import step_model_for
    from triton_diffusion.requests import text_to_image

    cache = f"FirstBlockCache threshold={threshold}"
    rows = [(*ROWS[0], 8, guidance, True), (*ROWS[1], 5, 0.0, True), (*ROWS[2], 6, guidance, False),
            ("a cat", 4, 6, guidance, True)]
    items = [dataclasses.replace(text_to_image(prompt, seed, steps, scale, 64, 64), step_cache=flag)
             for prompt, seed, steps, scale, flag in rows]
    dynamic, plain = runner(arch, cache), runner(arch)
    alone, uncached, skipped_alone = [], [], []
    for item in items:
        before = row_cache.skipped_rows(denoiser_of(dynamic.text_to_image))
        alone.append(dynamic.run(item.params, [item])[0])
        skipped_alone.append(row_cache.skipped_rows(denoiser_of(dynamic.text_to_image)) - before)
        uncached.append(plain.run(item.params, [item])[0])
    assert skipped_alone[2] == 0 and min(skipped_alone[:2] + skipped_alone[3:]) > 0, skipped_alone

    running = runner(arch, cache)
    model = step_model_for(running.text_to_image, "cpu")
    every = run_joining(model, items, JOINERS)
    assert row_cache.skipped_rows(denoiser_of(running.text_to_image)) == sum(skipped_alone)
    for index, row in enumerate(every):
        image = model.decode([row])[0].astype(int)
        assert np.abs(image - alone[index].astype(int)).max() <= 1, index
    # (the skips show in the images: the equality above is not that of uncached images)
    assert max(np.abs(model.decode([row])[0].astype(int) - exact.astype(int)).max()
               for row, exact in zip(every, uncached)) > 1


# -- served ----------------------------------------------------------------------------------------

def test_served_exact_and_cached_requests_batch_together_and_bad_step_cache_fails_alone(tmp_path_factory):
    """Through tritonserver: a FLUX model with the per-row cache declares STEP_CACHE; three requests
    (two cached, one exact) form one execution and each equals itself served alone; STEP_CACHE=2 is
    INVALID_ARG for that request alone."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from client import DiffusionClient, GenerationRequest
    from triton_diffusion import model_config

    from .conftest import batch_histogram, start_server

    root, name = tmp_path_factory.mktemp("row_cache"), "flux_tiny_cached"
    model_config.write_model(root / "repo", model_config.variant(
        name, {"step_cache": "FirstBlockCache threshold=0.5", "default_steps": "8", "speed_devices": "cpu"},
        base="flux_tiny"))
    server = start_server(root, [name], {"TRITONSERVER_DELAY_SCHEDULER": "3"}, repository=root / "repo",
                          require_ready=True)
    try:
        url = f"grpc://{server.grpc_url}"
        requests = [GenerationRequest(prompt, seed=seed, step_cache=index != 1) for index, (prompt, seed) in enumerate(ROWS)]
        with DiffusionClient(url, name) as client:
            together = client.generate_many(requests, concurrency=3)
            assert batch_histogram(server, name) == {3: 1}
            for request, result in zip(requests, together):
                alone = client.generate(request).array
                assert np.abs(result.array.astype(int) - alone.astype(int)).max() <= 1, request
            schema = client.schema
            bad = GenerationRequest("x", seed=1).tensors(schema)
        bad["STEP_CACHE"] = np.array([[2]], dtype=np.int32)
        triton = grpcclient.InferenceServerClient(server.grpc_url)
        inputs = []
        for input_name, array in bad.items():
            datatype = {np.dtype(object): "BYTES", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
                        np.dtype(np.float32): "FP32", np.dtype(np.uint8): "UINT8"}[array.dtype]
            tensor = grpcclient.InferInput(input_name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        with pytest.raises(InferenceServerException, match="STEP_CACHE must be 0 \\(exact\\) or 1"):
            triton.infer(name, inputs)
        triton.close()
    finally:
        server.stop()
