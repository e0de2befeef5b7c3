"""What config.pbtxt declares is what the backend accepts: inputs, call arguments, device placement."""

import inspect

import pytest

from triton_diffusion import model_config
from triton_diffusion.families import flux, qwen_image, wan
from triton_diffusion.pipeline import ModelLoadError, call_arguments, check_output, resolve_device
from triton_diffusion.requests import IMAGE_TO_IMAGE, TEXT_TO_IMAGE
from triton_diffusion.schema import Schema, SchemaError


def shipped_dict(model="stable_diffusion_tiny"):
    return model_config.as_dict(model_config.shipped(model))


IMAGE_MODELS = ["stable_diffusion_tiny", "sd_turbo", "sdxl", "flux_dev", "qwen_image", "z_image_turbo", "sd35_large",
                "flux_tiny", "sdxl_tiny", "sd3_tiny", "qwen_image_tiny", "z_image_tiny"]


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_the_shipped_schemas_are_accepted(model):
    schema = Schema.from_model_config(shipped_dict(model))
    assert schema.names[0] == "PROMPT" and "IMAGE" in schema and not schema.inputs["PROMPT"].optional
    assert schema.output == "IMAGE"


@pytest.mark.parametrize("model", ["wan_tiny", "wan_t2v"])
def test_a_video_model_declares_video_out_and_frames_in(model):
    schema = Schema.from_model_config(shipped_dict(model))
    assert schema.output == "VIDEO" and "NUM_FRAMES" in schema and "IMAGE" not in schema


def test_continuous_models_declare_progress_and_dynamic_ones_do_not():
    assert Schema.from_model_config(shipped_dict("stable_diffusion_tiny_continuous")).progress
    assert not Schema.from_model_config(shipped_dict("stable_diffusion_tiny")).progress


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["input"].append({"name": "COLOUR", "data_type": "TYPE_STRING"}), "declares input 'COLOUR'"),
        (lambda c: c["input"][2].update(data_type="TYPE_FP32"), "input SEED has data_type TYPE_FP32"),
        (lambda c: c["input"].pop(0), "must declare input PROMPT"),
        (lambda c: c["input"][0].update(optional=True), "input PROMPT is required"),
        (lambda c: c["output"].pop(1), "must declare output SEED"),
        (lambda c: c["output"].pop(0), "exactly one of the outputs IMAGE and VIDEO .*neither"),
        (lambda c: c["output"].append({"name": "VIDEO", "data_type": "TYPE_UINT8"}), "exactly one of the outputs"),
        (lambda c: c["output"][0].update(data_type="TYPE_FP32"), "output IMAGE must have data_type TYPE_UINT8"),
        (lambda c: c["output"].append({"name": "LATENTS", "data_type": "TYPE_FP32"}), r"output\(s\) \['LATENTS'\]"),
        (lambda c: c["output"].append({"name": "PROGRESS", "data_type": "TYPE_FP32"}), "PROGRESS must have data_type TYPE_INT32"),
    ],
)
def test_a_schema_the_backend_cannot_serve_fails_with_the_reason(change, message):
    config = shipped_dict()
    change(config)
    with pytest.raises(SchemaError, match=message):
        Schema.from_model_config(config)


class _Pipeline:
    """Stands in for a diffusers pipeline: only its ``__call__`` signature matters here."""

    def __init__(self, *names):
        parameters = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names]
        self.__call__ = lambda **kwargs: None
        self.__call__.__signature__ = inspect.Signature(parameters)


FULL = ("prompt", "num_inference_steps", "guidance_scale", "generator", "output_type", "height", "width",
        "callback_on_step_end", "callback_on_step_end_tensor_inputs")


def test_call_arguments_are_checked_when_the_model_loads():
    assert call_arguments(_Pipeline(*FULL, "negative_prompt"), TEXT_TO_IMAGE) == frozenset(FULL) | {"negative_prompt"}
    assert "negative_prompt" not in call_arguments(_Pipeline(*FULL), TEXT_TO_IMAGE)  # requests with one are rejected
    with pytest.raises(ModelLoadError, match=r"does not take \['guidance_scale'\], which text-to-image needs"):
        call_arguments(_Pipeline(*(n for n in FULL if n != "guidance_scale")), TEXT_TO_IMAGE)
    edit = ("prompt", "image", "strength", "num_inference_steps", "guidance_scale", "generator", "output_type",
            "callback_on_step_end", "callback_on_step_end_tensor_inputs")
    assert "height" not in call_arguments(_Pipeline(*edit), IMAGE_TO_IMAGE)  # the source image's size is used


def test_device_auto_follows_the_instance_triton_placed():
    assert resolve_device("auto", "GPU", 1) == "cuda:1"
    assert resolve_device("cuda:0", "GPU", 1) == "cuda:0"  # an explicit device wins
    assert resolve_device("auto", "CPU", 0) in ("cpu", "cuda")


def _named(family, *arguments):
    """A stand-in pipeline whose class name puts it in ``family``."""
    return type(family.pipelines[0], (_Pipeline,), {})(*arguments)


QWEN, WAN, FLUX = qwen_image.FAMILY, wan.FAMILY, flux.FAMILY


def test_family_details_change_what_a_pipeline_must_take():
    # Qwen-Image: GUIDANCE_SCALE is its true CFG scale.
    qwen = tuple("true_cfg_scale" if n == "guidance_scale" else n for n in FULL)
    assert "true_cfg_scale" in call_arguments(_named(QWEN, *qwen), TEXT_TO_IMAGE)
    with pytest.raises(ModelLoadError, match=r"does not take \['true_cfg_scale'\]"):
        call_arguments(_named(QWEN, *FULL), TEXT_TO_IMAGE)
    # Wan: a video pipeline needs num_frames.
    assert "num_frames" in call_arguments(_named(WAN, *FULL, "num_frames"), TEXT_TO_IMAGE)
    with pytest.raises(ModelLoadError, match=r"does not take \['num_frames'\]"):
        call_arguments(_named(WAN, *FULL), TEXT_TO_IMAGE)


def test_a_config_whose_output_does_not_fit_the_pipeline_fails_the_load():
    from triton_diffusion.settings import ModelSettings

    video, image = ModelSettings.build(pretrained_model="x", default_num_frames=5), ModelSettings.build(pretrained_model="x")
    check_output(_named(WAN), video, "VIDEO")
    check_output(_named(FLUX), image, "IMAGE")
    with pytest.raises(ModelLoadError, match=f"{WAN.pipelines[0]} makes videos: config.pbtxt must declare output VIDEO"):
        check_output(_named(WAN), video, "IMAGE")
    with pytest.raises(ModelLoadError, match="a video model needs default_num_frames > 0"):
        check_output(_named(WAN), image, "VIDEO")
    with pytest.raises(ModelLoadError, match="makes images"):
        check_output(_named(FLUX), video, "VIDEO")


def test_a_config_without_a_schema_gets_the_declared_one_and_a_declared_one_is_kept():
    from triton_diffusion.schema import complete, declaration

    bare = {"name": "m", "parameters": {"batching": {"string_value": "continuous"}}}
    done = complete(bare)
    inputs, outputs, decoupled = declaration({"batching": "continuous"})
    assert done["input"] == inputs and done["output"] == outputs and done["model_transaction_policy"] == {"decoupled": True}
    assert Schema.from_model_config(done).progress and "IMAGE" not in Schema.from_model_config(done)
    video = Schema.from_model_config(complete({"parameters": {"default_num_frames": {"string_value": "17"}}}))
    assert video.output == "VIDEO" and "NUM_FRAMES" in video and "IMAGE" not in video
    own = {"input": [{"name": "PROMPT", "data_type": "TYPE_STRING", "dims": [1]}], "output": outputs[:2]}
    assert complete(own)["input"] == own["input"]  # nothing added to a declared list
    assert list(Schema.from_model_config(complete(own)).inputs) == ["PROMPT"]


def test_only_a_per_row_step_cache_declares_the_step_cache_input():
    from triton_diffusion.schema import declaration

    def names(**parameters):
        return [entry["name"] for entry in declaration(parameters)[0]]

    assert "STEP_CACHE" in names(step_cache="FirstBlockCache threshold=0.1")
    assert "STEP_CACHE" not in names(step_cache="TaylorSeerCache")  # decides per batch: every request uses it
    assert "STEP_CACHE" not in names()
    # a running batch keeps each row's residuals with the row (row_cache.resume): continuous models take it too
    assert "STEP_CACHE" in names(step_cache="FirstBlockCache threshold=0.1", batching="continuous")
