"""Quantization and its fidelity guard (quantization.py), on the CPU.

The fast fp8 path (torchao float8 weights and activations) needs a GPU of compute capability 8.9 or
more; the guard does not. Here it runs with ``fp8_weight_only`` (torchao's float8 weights, which
run anywhere) on the tiny pipeline: the same probe calls, comparison and load decision as on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from triton_diffusion.acceleration import denoiser_of
from triton_diffusion.pipeline import ModelLoadError, PipelineRunner
from triton_diffusion.quantization import Fidelity, quantizable_layers, relative_error, skipped
from triton_diffusion.requests import text_to_image
from triton_diffusion.settings import ModelSettings, SettingsError
from triton_diffusion.tiny import ensure_tiny_model

SIZE, STEPS = 64, 4
CPU = {"device": "cpu", "torch_dtype": "float32", "torch_num_threads": 2, "speed_devices": ("cpu",),
       "default_height": SIZE, "default_width": SIZE, "default_steps": STEPS}
WEIGHT_ONLY = {**CPU, "quantization": "fp8_weight_only"}


def load(**settings) -> PipelineRunner:
    return PipelineRunner.load(ModelSettings.build(pretrained_model=str(ensure_tiny_model()), **settings))


def quantized_layers(runner) -> int:
    return sum(type(module.weight).__name__ == "Float8Tensor"
               for module in denoiser_of(runner.text_to_image).modules() if isinstance(module, torch.nn.Linear))


def test_the_verdict_names_the_error_and_the_bound_and_refuses_non_finite_latents():
    assert Fidelity(0.022, 0.05).problem("fp8") is None
    assert Fidelity(0.0, 0.0).problem("fp8") is None  # nothing changed: even a zero bound holds
    above = Fidelity(0.0734, 0.03).problem("fp8")
    assert "differ from the unquantized model's by 7.34% (relative L2), above fp8_max_relative_error=0.03" in above
    for error in (math.nan, math.inf):
        assert "non-finite (NaN/inf) latents" in Fidelity(error, 1e9).problem("fp8")


def test_relative_error_is_the_relative_l2_difference_and_infinite_for_non_finite_latents():
    reference = torch.tensor([3.0, 4.0])
    assert relative_error(reference, reference) == 0.0
    assert relative_error(reference, torch.tensor([3.0, 4.5])) == pytest.approx(0.1)
    assert relative_error(reference, torch.tensor([3.0, math.nan])) == math.inf
    assert relative_error(reference, torch.tensor([math.inf, 4.0])) == math.inf


def test_layers_that_fp8_kernels_cannot_take_or_that_are_skipped_stay_unquantized():
    model = torch.nn.ModuleDict({
        "proj": torch.nn.Linear(32, 64),
        "odd": torch.nn.Linear(24, 64),  # 24 is not a multiple of 16
        "adaLN_modulation": torch.nn.Sequential(torch.nn.Linear(32, 32)),
        "conv": torch.nn.Conv2d(16, 16, 3),
    })
    assert quantizable_layers(model, ()) == ["proj", "adaLN_modulation.0"]
    assert quantizable_layers(model, ("adaLN",)) == ["proj"]
    assert skipped("layers.3.feed_forward.w1", ("feed_forward",)) and not skipped("layers.3.attention.to_q", ("feed_forward", ""))


def test_quantization_parameters_are_checked():
    with pytest.raises(SettingsError, match="quantization='int3' must be empty or one of fp8, fp8_weight_only"):
        ModelSettings.from_parameters({"pretrained_model": "x", "quantization": "int3"})
    with pytest.raises(SettingsError, match="fp8_max_relative_error=-0.1 must be 0 or more"):
        ModelSettings.from_parameters({"pretrained_model": "x", "fp8_max_relative_error": "-0.1"})
    parsed = ModelSettings.from_parameters({"pretrained_model": "x", "fp8_skip": "img_mlp, adaLN_modulation"})
    assert parsed.speed.fp8_skip == ("img_mlp", "adaLN_modulation")


@pytest.fixture(scope="module")
def unquantized_image():
    runner = load(**CPU)
    item = text_to_image("a red circle", 7, STEPS, 5.0, SIZE, SIZE)
    return runner.run(item.params, [item])[0]


def test_a_quantized_model_within_its_bound_loads_reports_its_error_and_serves(unquantized_image):
    runner = load(**WEIGHT_ONLY, fp8_max_relative_error=0.5)
    (applied,) = runner.speed
    assert applied.startswith("fp8_weight_only on ") and "linear layers of UNet2DConditionModel, relative error " in applied
    assert quantized_layers(runner) > 0 and runner.warnings == ()
    item = text_to_image("a red circle", 7, STEPS, 5.0, SIZE, SIZE)
    image = runner.run(item.params, [item])[0]
    difference = abs(image.astype(int) - unquantized_image.astype(int))
    assert image.shape == unquantized_image.shape and difference.mean() < 8  # fp8 weights: close, not equal
    assert difference.max() > 0


def test_a_broken_bound_fails_the_load_with_the_measured_error():
    with pytest.raises(ModelLoadError, match=r"quantization=fp8_weight_only failed its fidelity check: the latents of a "
                                             r"fixed-seed call differ from the unquantized model's by \d+\.\d+% .*above "
                                             r"fp8_max_relative_error=0;"):
        load(**WEIGHT_ONLY, fp8_max_relative_error=0.0)


def test_fallback_serves_unquantized_with_a_warning(unquantized_image):
    runner = load(**WEIGHT_ONLY, fp8_max_relative_error=0.0, fp8_fallback=True)
    (warning,) = runner.warnings
    assert warning.startswith("WARNING: quantization=fp8_weight_only failed its fidelity check") and "serves unquantized" in warning
    assert quantized_layers(runner) == 0
    item = text_to_image("a red circle", 7, STEPS, 5.0, SIZE, SIZE)
    assert (runner.run(item.params, [item])[0] == unquantized_image).all()


def test_the_fast_fp8_path_names_the_hardware_it_needs_where_it_cannot_run():
    with pytest.raises(ModelLoadError, match="quantization=fp8 cannot run here: .*compute capability"):
        load(**CPU, quantization="fp8")


def test_fallback_also_covers_a_device_without_fp8(unquantized_image):
    runner = load(**CPU, quantization="fp8", fp8_fallback=True)
    (warning,) = runner.warnings
    assert "quantization=fp8 cannot run here" in warning and "serves unquantized" in warning
    item = text_to_image("a red circle", 7, STEPS, 5.0, SIZE, SIZE)
    assert (runner.run(item.params, [item])[0] == unquantized_image).all()


def test_a_family_skip_list_that_leaves_nothing_to_quantize_is_a_load_error():
    with pytest.raises(ModelLoadError, match="quantization=fp8_weight_only: no linear layer of UNet2DConditionModel qualifies"):
        load(**WEIGHT_ONLY, fp8_skip=("down_blocks", "mid_block", "up_blocks", "time_embedding", "add_embedding"))


def test_continuous_mode_steps_the_quantized_denoiser(unquantized_image):
    """The running batch (continuous mode) takes the pipeline apart but keeps its modules: a row it
    denoises with the quantized model equals the quantized pipeline's own image, not the bf16 one."""
    from triton_diffusion.families import step_model_for

    from .conftest import assert_same_image

    runner = load(**WEIGHT_ONLY, fp8_max_relative_error=0.5, batching="continuous")
    item = text_to_image("a red circle", 7, STEPS, 5.0, SIZE, SIZE)
    steps = step_model_for(runner.text_to_image, runner.device)
    rows = steps.prepare([item])
    while not rows[0].finished:
        steps.step(rows)
    (image,) = steps.decode(rows)
    assert_same_image(image, runner.run(item.params, [item])[0])
    assert (image != unquantized_image).any()


def test_quantizing_leaves_the_compilers_settings_alone():
    """torchao's configs default to switching inductor's coordinate-descent tuning on for the whole
    process (it autotuned every kernel of every graph: minutes of each fp8 warm-up); the model's own
    settings decide how it compiles."""
    import os

    import torch._inductor.config as inductor

    # what the environment asks for (TORCHINDUCTOR_*=1), and nothing else, before and after the load
    asked = tuple(os.environ.get(f"TORCHINDUCTOR_{name.upper()}") == "1"
                  for name in ("coordinate_descent_tuning", "coordinate_descent_check_all_directions"))
    runner = load(**WEIGHT_ONLY, fp8_max_relative_error=0.5)
    assert quantized_layers(runner) > 0
    assert (inductor.coordinate_descent_tuning, inductor.coordinate_descent_check_all_directions) == asked
