"""Write model-repository variants of one model (other name, parameters, batching) for benchmarks."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Mapping, Optional

from triton_diffusion.launcher import DEFAULT_MODEL_REPOSITORY
from triton_diffusion.overrides import find_block

BASE_MODEL = "stable_diffusion_tiny"


def _strip_block(text: str, keyword: str) -> str:
    """Remove a top-level ``keyword { ... }`` block (braces balanced)."""
    block = find_block(text, keyword)
    return text if block is None else text[: block[0]] + text[block[2] + 1 :]


def render_config(
    name: str,
    parameters: Mapping[str, str],
    dynamic_batching: Optional[str],
    max_batch_size: int = 16,
    base_model: str = BASE_MODEL,
) -> str:
    """The base model's config with another name, parameters and ``dynamic_batching`` body.

    ``dynamic_batching=None`` serves without batching: every request is its own execution.
    """
    text = (DEFAULT_MODEL_REPOSITORY / base_model / "config.pbtxt").read_text()
    text = re.sub(r'^name: ".*"$', f'name: "{name}"', text, flags=re.M)
    text = re.sub(r"^max_batch_size: \d+$", f"max_batch_size: {max_batch_size}", text, flags=re.M)
    text = _strip_block(text, "dynamic_batching")
    base_parameters = dict(re.findall(r'parameters \{ key: "([^"]+)", value: \{ string_value: "([^"]*)" \} \}', text))
    text = re.sub(r"^parameters \{.*\}\n?", "", text, flags=re.M)
    text = re.sub(r"^#.*\n", "", text, flags=re.M)
    merged = {**base_parameters, **parameters}
    text = text.rstrip() + "\n"
    if dynamic_batching is not None:
        text += f"dynamic_batching {{ {dynamic_batching} }}\n"
    text += "".join(f'parameters {{ key: "{k}", value: {{ string_value: "{v}" }} }}\n' for k, v in merged.items())
    return text


def write_variant(repository: Path, name: str, config_text: str, base_model: str = BASE_MODEL) -> Path:
    model_dir = repository / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(DEFAULT_MODEL_REPOSITORY / base_model / "1" / "model.py", model_dir / "1" / "model.py")
    (model_dir / "config.pbtxt").write_text(config_text)
    return model_dir
