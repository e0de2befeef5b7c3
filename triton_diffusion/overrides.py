"""Batching knobs set at start-up (CLI flags or environment variables, e.g. from docker compose).

The model repository stays the source of truth and may be mounted read-only: overrides are
written into a derived copy of the selected models, whose ``config.pbtxt`` differs only in the
overridden fields (edited through Triton's ``ModelConfig`` protobuf, ``model_config.py``).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Sequence

from . import model_config


@dataclass(frozen=True)
class BatchingOverrides:
    max_batch_size: Optional[int] = None
    preferred_batch_sizes: Optional[tuple[int, ...]] = None  # () removes preferred sizes
    max_queue_delay_us: Optional[int] = None
    max_queue_size: Optional[int] = None

    def any(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    def describe(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in asdict(self).items() if value is not None)


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"4,8,16"`` -> (4, 8, 16); ``"none"`` (or an empty string) means no preferred sizes."""
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(int(part) for part in re.split(r"[,\s]+", text.strip()) if part)


def apply_overrides(config_text: str, overrides: BatchingOverrides) -> str:
    """``config_text`` with the overridden batching fields (the text itself if there are none)."""
    if not overrides.any():
        return config_text
    config = model_config.parse(config_text)
    model_config.set_batching(config, **asdict(overrides))
    return model_config.render(config, f"Derived by triton-diffusion serve with start-up overrides: {overrides.describe()}")


def derived_repository(repository: Path, models: Sequence[str], overrides: BatchingOverrides) -> Path:
    """A temporary repository holding ``models`` with ``overrides`` applied to their configs."""
    target = Path(tempfile.mkdtemp(prefix="triton-diffusion-repo-"))
    for model in models:
        source = repository / model
        if not source.is_dir():
            continue  # Triton reports the missing model by name
        shutil.copytree(source, target / model, ignore=shutil.ignore_patterns("__pycache__"))
        config = target / model / "config.pbtxt"
        config.write_text(apply_overrides(config.read_text(), overrides))
    return target
