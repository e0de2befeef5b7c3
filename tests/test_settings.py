"""config.pbtxt parameters -> typed settings."""

import pytest

from triton_diffusion.settings import ModelSettings, resolve_model_location


def test_parameters_are_typed_and_unknown_keys_kept():
    settings = ModelSettings.from_model_config(
        {"parameters": {
            "pretrained_model": {"string_value": "org/model"},
            "default_steps": {"string_value": "4"},
            "default_guidance_scale": {"string_value": "0.0"},
            "local_files_only": {"string_value": "true"},
            "allowed_sizes": {"string_value": "512x512, 768x512"},
            "something_else": {"string_value": "kept"},
        }}
    )
    assert settings.default_steps == 4 and settings.default_guidance_scale == 0.0
    assert settings.local_files_only is True
    assert settings.allowed_sizes == ((512, 512), (768, 512))
    assert settings.extra == {"something_else": "kept"}


def test_missing_model_and_bad_values_are_reported_with_the_key():
    with pytest.raises(ValueError, match="pretrained_model"):
        ModelSettings.from_parameters({})
    with pytest.raises(ValueError, match="'default_steps'"):
        ModelSettings.from_parameters({"pretrained_model": "x", "default_steps": "many"})


def test_cache_placeholder_and_env_vars_expand(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_DIFFUSION_CACHE", str(tmp_path))
    monkeypatch.setenv("MY_MODELS", "/models")
    assert resolve_model_location("{cache}/tiny-sd") == f"{tmp_path}/tiny-sd"
    assert resolve_model_location("$MY_MODELS/sd") == "/models/sd"
    assert resolve_model_location("stabilityai/sd-turbo") == "stabilityai/sd-turbo"
