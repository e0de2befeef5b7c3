"""A served model's knobs, read from the ``parameters`` of its ``config.pbtxt``.

Every value arrives as a string (Triton's ``string_value``); this module is the one place that
turns them into typed settings with defaults, so that a new diffusers family needs a new
``config.pbtxt``, never a new ``model.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping


def default_cache_dir() -> Path:
    """Where generated tiny models (and other local artefacts) live."""
    env = os.environ.get("TRITON_DIFFUSION_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / ".cache" / "models"


def resolve_model_location(value: str) -> str:
    """Expand ``{cache}``, ``~`` and ``$VARS`` in a model path; hub ids pass through unchanged."""
    value = value.replace("{cache}", str(default_cache_dir()))
    return os.path.expandvars(os.path.expanduser(value))


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected a boolean, got {text!r}")


def _parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``"512x512, 768x512"`` -> ((512, 512), (768, 512)); height x width."""
    sizes = []
    for part in text.replace(";", ",").split(","):
        part = part.strip().lower()
        if not part:
            continue
        height, _, width = part.partition("x")
        sizes.append((int(height), int(width)))
    return tuple(sizes)


@dataclass(frozen=True)
class ModelSettings:
    """Typed view of a model's ``config.pbtxt`` parameters (names match the parameter keys)."""

    pretrained_model: str = ""
    pipeline_class: str = ""  # empty: the class named in model_index.json (DiffusionPipeline)
    torch_dtype: str = "auto"  # auto: float16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda if available, else cpu
    local_files_only: bool = False
    variant: str = ""
    enable_image_to_image: bool = True
    torch_num_threads: int = 0  # 0: leave torch's default
    # request defaults
    default_height: int = 512
    default_width: int = 512
    default_steps: int = 20
    default_guidance_scale: float = 7.5
    default_strength: float = 0.8
    # request limits
    size_multiple: int = 8
    min_side: int = 64
    max_side: int = 2048
    max_pixels: int = 1024 * 1024
    allowed_sizes: tuple[tuple[int, int], ...] = ()
    max_steps: int = 100
    max_guidance_scale: float = 50.0
    max_prompt_bytes: int = 4096
    max_input_image_pixels: int = 2048 * 2048
    # memory budget of one pipeline call: images x height x width
    max_pixels_per_call: int = 16 * 512 * 512
    max_images_per_call: int = 16
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> "ModelSettings":
        """Build settings from a flat ``{key: string}`` mapping; unknown keys go to ``extra``."""
        known = {f.name: f for f in fields(cls) if f.name != "extra"}
        values: dict[str, Any] = {}
        extra: dict[str, str] = {}
        for key, raw in parameters.items():
            if key not in known:
                extra[key] = raw
                continue
            kind = known[key].type
            try:
                if kind == "bool":
                    values[key] = _parse_bool(raw)
                elif kind == "int":
                    values[key] = int(raw)
                elif kind == "float":
                    values[key] = float(raw)
                elif key == "allowed_sizes":
                    values[key] = _parse_sizes(raw)
                else:
                    values[key] = raw
            except ValueError as exc:
                raise ValueError(f"config.pbtxt parameter {key!r}: {exc}") from exc
        if not values.get("pretrained_model"):
            raise ValueError("config.pbtxt must set parameter 'pretrained_model' (a local path or hub id)")
        return cls(**values, extra=extra)

    @classmethod
    def from_model_config(cls, model_config: Mapping[str, Any]) -> "ModelSettings":
        """Build settings from Triton's model config JSON (``args['model_config']``, parsed)."""
        parameters = {
            key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()
        }
        return cls.from_parameters(parameters)

    @property
    def model_location(self) -> str:
        return resolve_model_location(self.pretrained_model)
