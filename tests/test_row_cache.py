"""The per-row first-block cache (row_cache.py): each row skips or computes from its own residuals,
so a cached request batched with others equals the same request served alone with the same cache.
diffusers' own FirstBlockCache, deciding for the whole batch, is the control that shows the test can
fail."""

from __future__ import annotations

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


@pytest.mark.parametrize("arch, guidance, settings", [
    ("flux-dev-tiny", {"guidance_scale": 3.5}, {}),
    # the transformer blocks compiled (the eager backend: dynamo's tracing and guards, without inductor)
    ("flux-dev-tiny", {"guidance_scale": 3.5}, {"compile": "regional", "compile_backend": "eager"}),
    ("qwen-image-tiny", {"true_cfg_scale": 4.0, "negative_prompt": [" "] * 3}, {}),  # two passes, each its own residuals
], ids=["flux", "flux-compiled", "qwen-image"])
def test_a_cached_row_batched_equals_the_same_request_alone(arch, guidance, settings):
    loaded = runner(arch, "FirstBlockCache threshold=0.3", **settings)
    assert any("decided per row" in applied for applied in loaded.speed)
    alone = {**guidance, "negative_prompt": [" "]} if "negative_prompt" in guidance else guidance
    differences, skipped_together, skipped_alone = batched_against_alone(loaded, guidance, alone)
    assert skipped_together > 0, "the cache must actually skip"
    assert skipped_together == sum(skipped_alone), (skipped_together, skipped_alone)  # every row decided as alone
    assert max(differences) < SAME, differences


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
