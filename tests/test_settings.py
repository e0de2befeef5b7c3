"""config.pbtxt parameters -> typed settings; unknown keys and contradictory limits are errors."""

import pytest

from triton_diffusion import model_config
from dataclasses import fields

from triton_diffusion.settings import ModelSettings, SettingsError, resolve_model_location


def test_parameters_are_typed():
    settings = ModelSettings.from_model_config(
        {"parameters": {
            "pretrained_model": {"string_value": "org/model"},
            "default_steps": {"string_value": "4"},
            "default_guidance_scale": {"string_value": "0.0"},
            "local_files_only": {"string_value": "true"},
            "allowed_sizes": {"string_value": "512x512, 768x512"},
        }}
    )
    assert settings.defaults.default_steps == 4 and settings.defaults.default_guidance_scale == 0.0
    assert settings.load.local_files_only is True
    assert settings.limits.allowed_sizes == ((512, 512), (768, 512))


def test_an_unknown_parameter_is_an_error_naming_it():
    with pytest.raises(SettingsError, match="'max_step' is not a known parameter \\(did you mean 'max_steps'\\?\\)"):
        ModelSettings.from_parameters({"pretrained_model": "x", "max_step": "5"})
    with pytest.raises(SettingsError, match="'colour' is not a known parameter; known parameters: pretrained_model"):
        ModelSettings.from_parameters({"pretrained_model": "x", "colour": "blue"})


def test_missing_model_and_bad_values_are_reported_with_the_key():
    with pytest.raises(ValueError, match="pretrained_model"):
        ModelSettings.from_parameters({})
    with pytest.raises(ValueError, match="'default_steps'"):
        ModelSettings.from_parameters({"pretrained_model": "x", "default_steps": "many"})


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"max_side": "512", "max_pixels": "262144"}, "max_pixels=262144 can never reject a request"),
        ({"max_side": "512", "max_pixels": "300000"}, "max_pixels=300000 can never reject a request"),
        ({"default_height": "100"}, "default_height/default_width 100x512 breaks"),
        ({"allowed_sizes": "512x512,1004x1004"}, "allowed_sizes 1004x1004 breaks"),
        ({"allowed_sizes": "256x256"}, "default size 512x512 is not in allowed_sizes"),
        ({"default_steps": "60", "max_steps": "50"}, "default_steps=60 is outside"),
        ({"min_side": "1024", "max_side": "512"}, "allow no size"),
        ({"compile": "yes"}, "compile='yes' must be one of off, regional, full"),
        ({"compile_dynamic": "maybe"}, "compile_dynamic='maybe' must be one of auto, true, false"),
        ({"batch_buckets": "1,2,4,8"}, "max_images_per_call=16 exceeds the largest of batch_buckets=\\[1, 2, 4, 8\\]"),
        ({"batch_buckets": "4,16", "warmup_batch_sizes": "2"}, "warmup_batch_sizes must be among batch_buckets"),
        ({"allowed_sizes": "512x512", "warmup_sizes": "256x256"}, "warmup_sizes must be among allowed_sizes"),
        ({"warmup_sizes": "4096x4096"}, "warmup_sizes 4096x4096 breaks"),
        ({"vae_slicing": "true", "compile_vae": "true"}, "vae_slicing decodes one image at a time"),
        ({"batching": "continuous", "batch_buckets": "16"}, "batching=continuous takes neither batch_buckets"),
        ({"batching": "continuous", "step_cache": "TaylorSeerCache"}, "nor a step cache that decides for the whole batch"),
        ({"lora_dir": "/loras", "lora_batching": "by-name"}, "lora_batching='by-name' must be one of mixed, grouped"),
        ({"lora_dir": "/loras", "max_lora_rank": "0"}, "max_loaded_loras and max_lora_rank must be 1 or more"),
        ({"lora_dir": "/loras", "fuse_qkv": "true"}, "lora_dir with fuse_qkv: an adapter of the query"),
        ({"lora_dir": "/loras", "batching": "continuous", "max_images_per_call": "8", "max_loaded_loras": "4"},
         "needs max_loaded_loras >= max_images_per_call \\(4 < 8\\)"),
        ({"batching": "continuous", "compile": "full", "compile_dynamic": "false"},
         "compile_dynamic=false would compile a graph per row count"),
        ({"warmup_num_frames": "17"}, "warmup_num_frames is for video models"),
        ({"default_num_frames": "17", "max_num_frames": "33", "warmup_num_frames": "17,81"},
         "warmup_num_frames must be within \\[1, max_num_frames=33\\]"),
    ],
)
def test_contradictory_limits_fail(parameters, message):
    with pytest.raises(SettingsError, match=message):
        ModelSettings.from_parameters({"pretrained_model": "x", **parameters})


def test_a_running_batch_takes_the_step_cache_that_decides_per_row():
    settings = ModelSettings.from_parameters({"pretrained_model": "x", "batching": "continuous",
                                              "step_cache": "FirstBlockCache threshold=0.1"})
    assert settings.speed.step_cache == "FirstBlockCache threshold=0.1"


def test_a_batch_larger_than_one_call_is_warned_about():
    settings = ModelSettings.from_parameters({"pretrained_model": "x", "max_images_per_call": "16"})
    assert settings.batching_warnings(16) == []
    warning = settings.batching_warnings(32)[0]
    assert "max_batch_size=32 exceeds max_images_per_call=16" in warning and "2 pipeline calls" in warning


@pytest.mark.parametrize("model", ["stable_diffusion_tiny", "sd_turbo", "sdxl", "flux_dev", "qwen_image", "z_image_turbo",
                                   "sd35_large", "wan_t2v", "flux_tiny", "sdxl_tiny", "sd3_tiny", "qwen_image_tiny",
                                   "z_image_tiny", "wan_tiny"])
def test_shipped_configs_are_consistent(model):
    config = model_config.shipped(model)
    settings = ModelSettings.from_parameters(model_config.parameters(config))
    assert settings.batching_warnings(config.max_batch_size) == []
    assert settings.limits.pixel_limit < settings.limits.max_side ** 2  # max_pixels can fire


def test_the_warm_up_plan_covers_what_serving_can_form():
    plain = ModelSettings.from_parameters({"pretrained_model": "x"})
    assert plain.warmup_plan()[0] == ()  # eager and no buckets: nothing to warm
    compiled = ModelSettings.from_parameters(
        {"pretrained_model": "x", "compile": "full", "allowed_sizes": "512x512,768x512", "default_guidance_scale": "5"})
    # 1 (its own graph), 2 (makes the batch dimension dynamic) and the largest call
    assert compiled.warmup_plan() == ((1, 2, 16), ((512, 512), (768, 512)), (5.0,))
    buckets = ModelSettings.from_parameters({"pretrained_model": "x", "batch_buckets": "1,4,16"})
    assert buckets.warmup_plan()[0] == (1, 4, 16)


def test_speed_knobs_apply_only_on_the_listed_device_types():
    settings = ModelSettings.from_parameters({"pretrained_model": "x", "compile": "full", "fuse_qkv": "true", "batch_buckets": "16"})
    assert settings.for_device("cuda:1") is settings
    on_cpu = settings.for_device("cpu")
    assert (on_cpu.speed.compile, on_cpu.speed.fuse_qkv, on_cpu.calls.batch_buckets) == ("off", False, (16,))  # buckets are not a speed knob
    assert ModelSettings.from_parameters({"pretrained_model": "x", "speed_devices": "cpu, cuda"}).speed.speed_devices == ("cpu", "cuda")


def test_cache_placeholder_and_env_vars_expand(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_DIFFUSION_CACHE", str(tmp_path))
    monkeypatch.setenv("MY_MODELS", "/models")
    assert resolve_model_location("{cache}/tiny-sd") == f"{tmp_path}/tiny-sd"
    assert resolve_model_location("$MY_MODELS/sd") == "/models/sd"
    assert resolve_model_location("stabilityai/sd-turbo") == "stabilityai/sd-turbo"


def test_every_parameter_is_documented_and_the_readme_table_is_current():
    from pathlib import Path

    from triton_diffusion.settings import PARAMETER_DOCS, PARAMETERS, RECORDS, parameters_markdown

    assert set(PARAMETER_DOCS) == set(PARAMETERS) == {field.name for cls in RECORDS.values() for field in fields(cls)}
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("<!-- parameters:begin -->\n", 1)[1].split("\n<!-- parameters:end -->", 1)[0]
    assert table == parameters_markdown(), "README's parameter table is stale: python -m triton_diffusion.settings"
