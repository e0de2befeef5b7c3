"""Batched guidance passes (paired_cfg.py): the pairing rules with a fake denoiser, then the real
tiny Qwen-Image and Wan pipelines, whose images must equal the two-call pipeline's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from triton_diffusion.families import qwen_image, wan
from triton_diffusion.paired_cfg import CfgPairing, PairedGuidance, why_unpaired
from triton_diffusion.pipeline import PipelineRunner
from triton_diffusion.requests import text_to_image
from triton_diffusion.settings import ModelSettings

from .conftest import assert_same_image

PAIRING = CfgPairing(("encoder_hidden_states",))


class FakeDenoiser:
    """Row-wise: output = latents + the caption's sum + timestep; records the batch of every call it runs."""

    def __init__(self):
        self.batches: list[int] = []

    def __call__(self, hidden_states, timestep, encoder_hidden_states, img_shapes, return_dict=False):
        assert len(img_shapes) == hidden_states.shape[0] == encoder_hidden_states.shape[0]
        self.batches.append(hidden_states.shape[0])
        return (hidden_states + encoder_hidden_states.sum(dim=1, keepdim=True) + timestep[:, None],)


def pipeline_loop(pairing: PairedGuidance, denoiser, steps: int, positive, negative, other_latents=False):
    """A two-pass guidance loop as Qwen-Image's ``__call__`` writes it. Checks each pass's output
    against the row-wise formula (what the two unpaired calls return)."""
    latents = torch.zeros(positive.shape[0], 1)
    for step in range(steps):
        shared = {"hidden_states": latents, "timestep": torch.full((latents.shape[0],), float(step)),
                  "img_shapes": [(1, 2, 2)] * latents.shape[0]}
        cond = pairing.forward(denoiser, "cond", (), {**shared, "encoder_hidden_states": positive})[0]
        if other_latents:  # a pipeline that hands the second pass other latents
            shared["hidden_states"] = latents + 100
        uncond = pairing.forward(denoiser, "uncond", (), {**shared, "encoder_hidden_states": negative})[0]
        assert torch.equal(cond, latents + positive.sum(dim=1, keepdim=True) + step)
        assert torch.equal(uncond, shared["hidden_states"] + negative.sum(dim=1, keepdim=True) + step)
        latents = latents + cond - uncond


def test_the_passes_run_as_one_call_from_the_second_step_and_give_the_same_outputs():
    positive, negative = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[-1.0], [-2.0], [-3.5]])
    denoiser, pairing = FakeDenoiser(), PairedGuidance(PAIRING)
    pipeline_loop(pairing, denoiser, 4, positive, negative)
    assert denoiser.batches == [3, 3, 6, 6, 6]  # the first step records the negative conditioning
    assert (pairing.stats.paired, pairing.stats.served, pairing.stats.unpaired) == (3, 3, 2)
    # The next pipeline call records its own negatives (reset), and pairs from its second step again.
    pairing.reset()
    pipeline_loop(pairing, denoiser, 2, positive[:2], negative[:2] * 7)
    assert denoiser.batches[5:] == [2, 2, 4]


def test_without_an_unconditional_pass_nothing_is_paired():
    denoiser, pairing = FakeDenoiser(), PairedGuidance(PAIRING)
    for step in range(3):
        pairing.forward(denoiser, "cond", (), {"hidden_states": torch.zeros(2, 1), "timestep": torch.zeros(2),
                                               "encoder_hidden_states": torch.ones(2, 1), "img_shapes": [0, 0]})
    assert denoiser.batches == [2, 2, 2] and pairing.stats.paired == 0


def test_a_second_pass_on_other_latents_runs_itself_and_outputs_stay_right():
    denoiser, pairing = FakeDenoiser(), PairedGuidance(PAIRING)
    pipeline_loop(pairing, denoiser, 3, torch.tensor([[1.0]]), torch.tensor([[-1.0]]), other_latents=True)
    # paired calls ran, but their halves were never used: each second pass ran on its own latents
    assert pairing.stats.served == 0 and denoiser.batches == [1, 1, 2, 1, 2, 1]


def test_the_pairing_stands_aside_where_it_cannot_apply():
    # captions of different lengths: the default merge cannot concatenate them, so the passes run apart
    assert PAIRING.merged({"encoder_hidden_states": torch.ones(1, 3)}, {"encoder_hidden_states": torch.ones(1, 5)}) is None
    denoiser, pairing = FakeDenoiser(), PairedGuidance(PAIRING)
    pipeline_loop(pairing, denoiser, 3, torch.ones(2, 3), torch.ones(2, 5))
    assert denoiser.batches == [2] * 6 and pairing.stats.paired == 0
    # no pass name (a step model calls the denoiser outside cache_context): straight through
    other = FakeDenoiser()
    pairing.forward(other, None, (), {"hidden_states": torch.zeros(1, 1), "timestep": torch.zeros(1),
                                      "encoder_hidden_states": torch.zeros(1, 1), "img_shapes": [0]})
    assert other.batches == [1]
    assert why_unpaired(None, True, "", "regional")
    assert "step cache" in why_unpaired(PAIRING, True, "FirstBlockCache threshold=0.1", "regional")
    assert "compile=full" in why_unpaired(PAIRING, True, "", "full")
    assert why_unpaired(PAIRING, False, "", "off") == "batched_cfg is off"
    assert why_unpaired(PAIRING, True, "", "regional") is None


# -- the real pipelines ----------------------------------------------------------------------------

def tiny_runner(family, batched_cfg: bool) -> PipelineRunner:
    architecture = next(a for a in family.FAMILY.architectures if a.tiny)
    return PipelineRunner.load(ModelSettings.build(
        pretrained_model=f"random:{architecture.name}", device="cpu", torch_dtype="float32", torch_num_threads=2,
        default_num_frames=5 if family.FAMILY.video else 0, batched_cfg=batched_cfg))


@pytest.mark.parametrize("family", [qwen_image, wan], ids=["qwen-image", "wan"])
def test_paired_passes_give_the_two_call_pipelines_images(family):
    """Two rows whose prompts differ in length from each other and from the negative prompt (Qwen-Image
    pads the captions of one paired call under a mask): the same images as the pipeline's two calls."""
    paired, apart = tiny_runner(family, True), tiny_runner(family, False)
    assert paired.pairing is not None and apart.pairing is None
    frames = 5 if family.FAMILY.video else 0
    items = [text_to_image(prompt, seed, 4, 4.0, 64, 64, negative_prompt="blurry, low quality", num_frames=frames)
             for prompt, seed in (("a red circle", 1), ("a large blue square on a green background, photograph", 2))]
    params = items[0].params
    images = paired.run(params, items)
    assert (paired.pairing.stats.paired, paired.pairing.stats.served) == (3, 3)  # every step but the first
    for image, reference in zip(images, apart.run(params, items)):
        assert_same_image(image, reference)
    # and the family's own default negative prompt (Qwen-Image: one token) when a request sends none
    plain = [dataclasses.replace(one, negative_prompt=None) for one in items]
    plain_params = dataclasses.replace(params, with_negative_prompt=False)
    for image, reference in zip(paired.run(plain_params, plain), apart.run(plain_params, plain)):
        assert_same_image(image, reference)
