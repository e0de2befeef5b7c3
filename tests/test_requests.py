"""Request parsing and validation: pure logic, no server."""

import numpy as np
import pytest

from triton_diffusion.requests import IMAGE_TO_IMAGE, TEXT_TO_IMAGE, ParsedRequest, RequestError, parse_request
from triton_diffusion.settings import ModelSettings

SETTINGS = ModelSettings.build(
    pretrained_model="x", default_height=128, default_width=128, default_steps=10, max_steps=50,
    max_side=768, max_pixels=512 * 512, max_prompt_bytes=100,
)


def text(*values):
    return np.array([[v if isinstance(v, bytes) else v.encode()] for v in values], dtype=object)


def scalar(value, dtype):
    return np.array([[value]], dtype=dtype)


def parse(**inputs):
    return parse_request(inputs, SETTINGS, random_seed=lambda: 42)


def test_defaults_fill_missing_inputs_and_a_random_seed_is_drawn():
    result = parse(PROMPT=text("a cat"))
    assert isinstance(result, ParsedRequest)
    (item,) = result.items
    assert (item.prompt, item.params.height, item.params.width, item.params.num_inference_steps, item.seed) == ("a cat", 128, 128, 10, 42)
    assert item.task == TEXT_TO_IMAGE and item.negative_prompt is None and item.params.strength is None


def test_a_negative_seed_or_zero_size_means_the_default():
    (item,) = parse(PROMPT=text("a"), SEED=scalar(-1, np.int64), HEIGHT=scalar(0, np.int32), WIDTH=scalar(0, np.int32)).items
    assert item.seed == 42 and (item.params.height, item.params.width) == (128, 128)
    (item,) = parse(PROMPT=text("a"), SEED=scalar(2**63 - 1, np.int64)).items
    assert item.seed == 2**63 - 1


def test_explicit_values_are_used():
    result = parse(
        PROMPT=text("a"), SEED=scalar(7, np.int64), NUM_INFERENCE_STEPS=scalar(3, np.int32),
        GUIDANCE_SCALE=scalar(2.5, np.float32), HEIGHT=scalar(64, np.int32), WIDTH=scalar(256, np.int32),
        NEGATIVE_PROMPT=text("blurry"),
    )
    (item,) = result.items
    p = item.params
    assert (item.seed, p.num_inference_steps, p.guidance_scale, p.height, p.width) == (7, 3, 2.5, 64, 256)
    assert item.negative_prompt == "blurry" and p.with_negative_prompt


def test_multi_row_request_becomes_one_item_per_row():
    result = parse(PROMPT=text("a", "b"), SEED=np.array([[1], [2]], dtype=np.int64))
    assert [(i.prompt, i.seed) for i in result.items] == [("a", 1), ("b", 2)]


def test_empty_negative_prompt_means_none_and_empty_image_means_text_to_image():
    result = parse(PROMPT=text("a"), NEGATIVE_PROMPT=text(""), IMAGE=np.zeros((1, 0, 0, 3), np.uint8),
                   STRENGTH=scalar(0.5, np.float32))
    (item,) = result.items
    assert item.negative_prompt is None and item.task == TEXT_TO_IMAGE and item.params.strength is None


def test_image_to_image_defaults_to_source_size():
    image = np.zeros((1, 64, 96, 3), np.uint8)
    (item,) = parse(PROMPT=text("a"), IMAGE=image, STRENGTH=scalar(0.5, np.float32)).items
    assert item.task == IMAGE_TO_IMAGE and (item.params.height, item.params.width) == (64, 96) and item.params.strength == 0.5


def test_a_source_image_size_that_breaks_the_limits_is_reported_as_the_image_s():
    odd = parse(PROMPT=text("a"), IMAGE=np.zeros((1, 68, 64, 3), np.uint8))
    assert isinstance(odd, RequestError)
    assert "HEIGHT=68 (the size of the 68x64 source IMAGE) must be a multiple of 8; send HEIGHT and WIDTH" in str(odd)
    resized = parse(PROMPT=text("a"), IMAGE=np.zeros((1, 68, 64, 3), np.uint8), HEIGHT=scalar(64, np.int32), WIDTH=scalar(64, np.int32))
    assert isinstance(resized, ParsedRequest)
    sent = parse(PROMPT=text("a"), IMAGE=np.zeros((1, 64, 64, 3), np.uint8), HEIGHT=scalar(68, np.int32))
    assert str(sent).startswith("HEIGHT=68 must be a multiple of 8")


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({}, "PROMPT is required"),
        ({"PROMPT": text("")}, "PROMPT is empty"),
        ({"PROMPT": text("   ")}, "PROMPT is empty"),
        ({"PROMPT": text("x" * 101)}, "101 bytes; the limit is 100"),
        ({"PROMPT": text(b"\xff\xfe")}, "not valid UTF-8"),
        ({"PROMPT": text("a\x00b")}, "NUL"),
        ({"PROMPT": np.array([[1]], np.int32)}, "PROMPT must be BYTES"),
        ({"PROMPT": text("a"), "NUM_INFERENCE_STEPS": scalar(0, np.int32)}, "NUM_INFERENCE_STEPS=0 is outside"),
        ({"PROMPT": text("a"), "NUM_INFERENCE_STEPS": scalar(51, np.int32)}, "NUM_INFERENCE_STEPS=51 is outside"),
        ({"PROMPT": text("a"), "NUM_INFERENCE_STEPS": scalar(2.5, np.float32)}, "must be an integer"),
        ({"PROMPT": text("a"), "HEIGHT": scalar(100, np.int32)}, "HEIGHT=100 must be a multiple of 8"),
        ({"PROMPT": text("a"), "WIDTH": scalar(-8, np.int32)}, "WIDTH=-8 is outside"),
        ({"PROMPT": text("a"), "WIDTH": scalar(100000, np.int32)}, "WIDTH=100000 is outside"),
        ({"PROMPT": text("a"), "GUIDANCE_SCALE": scalar(np.nan, np.float32)}, "GUIDANCE_SCALE must be finite"),
        ({"PROMPT": text("a"), "GUIDANCE_SCALE": scalar(np.inf, np.float32)}, "GUIDANCE_SCALE must be finite"),
        ({"PROMPT": text("a"), "GUIDANCE_SCALE": scalar(-1, np.float32)}, "GUIDANCE_SCALE=-1.0 is outside"),
        ({"PROMPT": text("a"), "SEED": scalar(1.5, np.float32)}, "SEED must be an integer"),
        ({"PROMPT": text("a"), "STRENGTH": scalar(1.5, np.float32)}, "STRENGTH=1.5 is outside"),
        ({"PROMPT": text("a"), "IMAGE": np.zeros((1, 64, 64, 4), np.uint8)}, "IMAGE must have shape"),
        ({"PROMPT": text("a"), "IMAGE": np.zeros((1, 64, 64, 3), np.float32)}, "IMAGE must be UINT8"),
        ({"PROMPT": text("a"), "IMAGE": np.zeros((1, 4, 4, 3), np.uint8)}, "at least 8x8"),
        ({"PROMPT": text("a"), "IMAGE": np.zeros((1, 64, 64, 3), np.uint8), "STRENGTH": scalar(0.05, np.float32)},
         "runs no denoising step"),
        ({"PROMPT": text("a"), "FOO": scalar(1, np.int32)}, "unknown input(s) ['FOO']"),
        ({"PROMPT": text("a", "b"), "SEED": scalar(1, np.int64)}, "SEED has batch dimension 1, but PROMPT has 2"),
        ({"PROMPT": text("a", "b"), "HEIGHT": np.array([[64], [128]], np.int32)}, "must share HEIGHT and WIDTH"),
        ({"PROMPT": text("a"), "HEIGHT": scalar(512, np.int32), "WIDTH": scalar(512, np.int32)}, None),
    ],
)
def test_invalid_requests_get_a_specific_error(inputs, message):
    result = parse(**inputs)
    if message is None:
        assert isinstance(result, ParsedRequest)
        return
    assert isinstance(result, RequestError), result
    assert message in str(result)


def test_pixel_limit_and_allowed_sizes():
    settings = ModelSettings.build(pretrained_model="x", max_pixels=64 * 64, allowed_sizes=((64, 64),), min_side=8)
    big = parse_request({"PROMPT": text("a"), "HEIGHT": scalar(64, np.int32), "WIDTH": scalar(72, np.int32)}, settings)
    assert "4608 pixels; the limit is 4096" in str(big)
    odd = parse_request({"PROMPT": text("a"), "HEIGHT": scalar(32, np.int32), "WIDTH": scalar(32, np.int32)}, settings)
    assert "allowed sizes: 64x64" in str(odd)


VIDEO = ModelSettings.build(pretrained_model="x", default_num_frames=5, max_num_frames=33, size_multiple=16)


def test_num_frames_belongs_to_video_models_and_splits_groups():
    error = parse(PROMPT=text("a"), NUM_FRAMES=scalar(9, np.int32))
    assert isinstance(error, RequestError) and "NUM_FRAMES=9: this model makes images, not videos" in str(error)
    (item,) = parse(PROMPT=text("a"), NUM_FRAMES=scalar(0, np.int32)).items  # 0: the default (an image)
    assert item.params.num_frames == 0 and item.params.pixels == 128 * 128
    (clip,) = parse_request({"PROMPT": text("a")}, VIDEO).items
    (longer,) = parse_request({"PROMPT": text("a"), "NUM_FRAMES": scalar(9, np.int32)}, VIDEO).items
    assert (clip.params.num_frames, longer.params.num_frames) == (5, 9)
    assert clip.params != longer.params and longer.params.pixels == 9 * 512 * 512  # the call budget counts frames
    error = parse_request({"PROMPT": text("a"), "NUM_FRAMES": scalar(65, np.int32)}, VIDEO)
    assert "NUM_FRAMES=65 is outside the allowed range [1, 33]" in str(error)
    error = parse_request({"PROMPT": text("a", "b"), "NUM_FRAMES": np.array([[5], [9]], np.int32)}, VIDEO)
    assert "must share NUM_FRAMES" in str(error)


def test_step_cache_is_a_per_row_opt_in_of_zero_or_one():
    rows = np.array([[1], [0]], dtype=np.int32)
    result = parse(PROMPT=text("a cat", "a dog"), STEP_CACHE=rows)
    assert [item.step_cache for item in result.items] == [True, False]
    assert result.items[0].params == result.items[1].params  # an exact row and a cached row share a call
    assert not parse(PROMPT=text("a cat")).items[0].step_cache  # default: exact
    error = parse(PROMPT=text("a cat"), STEP_CACHE=scalar(2, np.int32))
    assert isinstance(error, RequestError) and "STEP_CACHE must be 0 (exact) or 1" in str(error)


def test_lora_names_an_adapter_per_row_and_its_scale_is_bounded():
    import dataclasses

    rows = parse(PROMPT=text("a cat", "a dog"), LORA=text("ink-sketch_v2", ""),
                 LORA_SCALE=np.array([[0.5], [1.5]], dtype=np.float32)).items
    assert [(item.lora, item.lora_scale) for item in rows] == [("ink-sketch_v2", 0.5), ("", 1.0)]
    assert rows[0].params == rows[1].params  # mixed: rows with different adapters share a call
    assert parse(PROMPT=text("a cat")).items[0].lora == ""
    for name in ("../etc/passwd", "a/b", ".hidden", "x" * 200, "a..b"):
        error = parse(PROMPT=text("a cat"), LORA=text(name))
        assert isinstance(error, RequestError) and "is not an adapter name" in str(error), name
    error = parse(PROMPT=text("a cat"), LORA=text("x"), LORA_SCALE=scalar(2.5, np.float32))
    assert isinstance(error, RequestError) and "LORA_SCALE=2.5 is outside the allowed range [0.0, 2.0]" in str(error)
    error = parse(PROMPT=text("a cat"), LORA=scalar(3, np.int32))
    assert isinstance(error, RequestError) and "LORA must be BYTES" in str(error)
    grouped = dataclasses.replace(SETTINGS, adapters=dataclasses.replace(SETTINGS.adapters, lora_batching="grouped"))
    rows = parse_request({"PROMPT": text("a cat", "a dog"), "LORA": text("x", "y")}, grouped, random_seed=lambda: 1).items
    assert rows[0].params != rows[1].params  # grouped: one adapter per call
