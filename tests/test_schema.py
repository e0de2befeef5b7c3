"""What config.pbtxt declares is what the backend accepts: inputs, call arguments, device placement."""

import inspect

import pytest

from triton_diffusion import model_config
from triton_diffusion.pipeline import ModelLoadError, call_arguments, resolve_device
from triton_diffusion.requests import IMAGE_TO_IMAGE, TEXT_TO_IMAGE
from triton_diffusion.schema import Schema, SchemaError


def shipped_dict(model="stable_diffusion_tiny"):
    return model_config.as_dict(model_config.shipped(model))


@pytest.mark.parametrize("model", ["stable_diffusion_tiny", "sd_turbo", "sdxl", "flux_dev"])
def test_the_shipped_schemas_are_accepted(model):
    schema = Schema.from_model_config(shipped_dict(model))
    assert schema.names[0] == "PROMPT" and "IMAGE" in schema and not schema.inputs["PROMPT"].optional


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["input"].append({"name": "COLOUR", "data_type": "TYPE_STRING"}), "declares input 'COLOUR'"),
        (lambda c: c["input"][2].update(data_type="TYPE_FP32"), "input SEED has data_type TYPE_FP32"),
        (lambda c: c["input"].pop(0), "must declare input PROMPT"),
        (lambda c: c["input"][0].update(optional=True), "input PROMPT is required"),
        (lambda c: c["output"].pop(1), "must declare output SEED"),
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
