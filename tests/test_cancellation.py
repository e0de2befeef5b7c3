"""Dropping a cancelled row from a running pipeline call (in-process, the tiny SD pipeline).

The claim under test: after a row is dropped at step k, every batch-mate's image equals the image
it gets when served alone, for schedulers with per-row history (PNDM, DPM-Solver++, UniPC) or
per-row noise (Euler ancestral), for text-to-image and image-to-image, and for FLUX (whose
guidance and pooled embeddings are sliced by a hook on the transformer).
"""

from __future__ import annotations

import numpy as np
import pytest

from testing.rows import CancelAfter
from triton_diffusion.cancellation import per_row_checks, shrink_spec
from triton_diffusion.pipeline import PipelineRunner
from triton_diffusion.requests import GenerationItem, image_to_image, text_to_image
from triton_diffusion.settings import ModelSettings
from triton_diffusion.tiny import ensure_tiny_model

from .conftest import FLUX_ROUNDING_SHARE, assert_same_image

SIZE, STEPS = 64, 8
SCHEDULERS = ["PNDMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "EulerAncestralDiscreteScheduler"]


@pytest.fixture(scope="module")
def runner() -> PipelineRunner:
    location = ensure_tiny_model()
    return PipelineRunner.load(
        ModelSettings.build(pretrained_model=str(location), device="cpu", torch_dtype="float32", torch_num_threads=2)
    )


@pytest.fixture
def scheduler(runner, request):
    """Swap the scheduler of both pipelines (they share components) for one test."""
    import diffusers

    original = runner.text_to_image.scheduler
    swapped = getattr(diffusers, request.param).from_config(original.config)
    for pipe in (runner.text_to_image, runner.image_to_image):
        pipe.scheduler = swapped
    yield request.param
    for pipe in (runner.text_to_image, runner.image_to_image):
        pipe.scheduler = original


def items(task: str, count: int = 4, guidance: float = 7.5) -> list[GenerationItem]:
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    prompts = [(f"a lighthouse at dusk, view {index}", 100 + index) for index in range(count)]
    if task == "image-to-image":
        return [image_to_image(prompt, seed, image, 0.8, STEPS, guidance) for prompt, seed in prompts]
    return [text_to_image(prompt, seed, STEPS, guidance, SIZE, SIZE) for prompt, seed in prompts]


def run(runner, batch, checks=None):
    """One call over ``batch``; ``checks[row]()`` says whether that row is cancelled (asked once per step)."""
    return runner.run(batch[0].params, batch, per_row_checks(checks) if checks else per_row_checks([lambda: False] * len(batch)))


@pytest.mark.parametrize("scheduler", SCHEDULERS, indirect=True)
@pytest.mark.parametrize("task", ["text-to-image", "image-to-image"])
def test_batch_mates_of_a_dropped_row_equal_their_solo_images(runner, scheduler, task):
    batch = items(task)
    never = lambda: False  # noqa: E731
    # Rows 1 and 3 are cancelled after steps 2 and 4 (the check runs once per step per live row).
    cancelled = [never, CancelAfter(2), never, CancelAfter(4)]
    outputs = run(runner, batch, cancelled)
    assert outputs[1] is None and outputs[3] is None
    for row in (0, 2):
        solo = run(runner, [batch[row]])[0]
        assert_same_image(outputs[row], solo)
    # Sanity: a different batch-mate's image is not within tolerance (the check can fail).
    with pytest.raises(AssertionError):
        assert_same_image(outputs[0], outputs[2])


@pytest.fixture(scope="module")
def flux_runner() -> PipelineRunner:
    return PipelineRunner.load(ModelSettings.build(pretrained_model="random:flux-dev-tiny", device="cpu", torch_dtype="float32"))


@pytest.mark.parametrize("task", ["text-to-image", "image-to-image"])
def test_flux_batch_mates_of_a_dropped_row_equal_their_solo_images(flux_runner, task):
    batch = items(task, guidance=3.5)
    never = lambda: False  # noqa: E731
    outputs = run(flux_runner, batch, [CancelAfter(1), never, CancelAfter(3), never])
    assert outputs[0] is None and outputs[2] is None
    for row in (1, 3):
        assert_same_image(outputs[row], run(flux_runner, [batch[row]])[0], FLUX_ROUNDING_SHARE)
    with pytest.raises(AssertionError):  # the check can fail: neighbours are not within rounding
        assert_same_image(outputs[1], outputs[3], FLUX_ROUNDING_SHARE)
    # The hook is gone after the call: a full batch runs again.
    assert all(output is not None for output in run(flux_runner, batch[:2], [never, never]))


def test_every_row_cancelled_interrupts_the_call(runner):
    batch = items("text-to-image", 2)
    checks = [CancelAfter(1), CancelAfter(1)]
    outputs = run(runner, batch, checks)
    assert outputs == [None, None]
    assert max(check.calls for check in checks) <= 2, "the call went on after every row was cancelled"


def test_rows_of_unshrinkable_pipelines_ride_to_the_end():
    """A family that declares no row drop (SDXL, real classes at tiny widths) keeps the cancelled row
    to the end of the call and still serves the others their solo images."""
    sdxl = PipelineRunner.load(ModelSettings.build(pretrained_model="random:sdxl-tiny", device="cpu", torch_dtype="float32",
                                             torch_num_threads=2))
    assert shrink_spec(sdxl.text_to_image) is None
    batch = items("text-to-image", 2)
    batch_sizes = []
    hook = sdxl.text_to_image.unet.register_forward_pre_hook(lambda _module, args: batch_sizes.append(args[0].shape[0]))
    try:
        outputs = run(sdxl, batch, [lambda: False, CancelAfter(2)])
    finally:
        hook.remove()
    assert outputs[1] is None  # computed to the end, then dropped
    assert batch_sizes == [4] * STEPS  # two rows (negative and positive each) at every step: never shrank
    assert_same_image(outputs[0], run(sdxl, [batch[0]])[0])