"""Batching knobs set at start-up (CLI flags or environment variables, e.g. from docker compose).

The model repository stays the source of truth and may be mounted read-only: overrides are
written into a derived copy of the selected models, whose ``config.pbtxt`` differs only in the
overridden fields.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Sequence


@dataclass(frozen=True)
class BatchingOverrides:
    max_batch_size: Optional[int] = None
    preferred_batch_sizes: Optional[tuple[int, ...]] = None  # () removes preferred sizes
    max_queue_delay_us: Optional[int] = None
    max_queue_size: Optional[int] = None

    def any(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"4,8,16"`` -> (4, 8, 16); ``"none"`` (or an empty string) means no preferred sizes."""
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(int(part) for part in re.split(r"[,\s]+", text.strip()) if part)


def find_block(text: str, keyword: str) -> Optional[tuple[int, int, int]]:
    """The first ``keyword { ... }`` block of a config: where it starts, where its body starts and
    where its body ends (the index of its closing brace); None if there is none."""
    match = re.search(rf"(?m)^[ \t]*{keyword}\s*\{{", text)
    if not match:
        return None
    depth, index = 1, match.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        index += 1
    return match.start(), match.end(), index - 1


def _block_span(text: str, keyword: str) -> Optional[tuple[int, int]]:
    """Start and end (exclusive) of the body of the first ``keyword { ... }`` block."""
    block = find_block(text, keyword)
    return None if block is None else block[1:]


def _set_field(body: str, name: str, value: Optional[str], indent: str = "  ") -> str:
    """Replace (or add, or with None remove) ``name: value`` at the top of a block body."""
    pattern = rf"(?m)^[ \t]*{name}\s*:.*\n?"
    body = re.sub(pattern, "", body)
    if value is None:
        return body
    return f"\n{indent}{name}: {value}" + body


def apply_overrides(config_text: str, overrides: BatchingOverrides) -> str:
    """``config_text`` with the overridden batching fields; comments and other fields are kept."""
    text = config_text
    if overrides.max_batch_size is not None:
        text, count = re.subn(r"(?m)^max_batch_size:\s*\d+", f"max_batch_size: {overrides.max_batch_size}", text)
        if not count:
            raise ValueError("config.pbtxt has no max_batch_size to override")
    batching = {
        "preferred_batch_size": None
        if overrides.preferred_batch_sizes is None
        else (f"[ {', '.join(map(str, overrides.preferred_batch_sizes))} ]" if overrides.preferred_batch_sizes else ""),
        "max_queue_delay_microseconds": None if overrides.max_queue_delay_us is None else str(overrides.max_queue_delay_us),
    }
    if any(value is not None for value in batching.values()) or overrides.max_queue_size is not None:
        span = _block_span(text, "dynamic_batching")
        if span is None:
            text = text.rstrip() + "\ndynamic_batching {\n}\n"
            span = _block_span(text, "dynamic_batching")
        start, end = span
        body = text[start:end]
        for name, value in batching.items():
            if value == "":  # preferred sizes cleared
                body = _set_field(body, name, None)
            elif value is not None:
                body = _set_field(body, name, value)
        if overrides.max_queue_size is not None:
            policy = _block_span(body, "default_queue_policy")
            if policy is None:
                body = f"\n  default_queue_policy {{ max_queue_size: {overrides.max_queue_size} }}" + body
            else:
                p_start, p_end = policy
                body = body[:p_start] + _set_field(body[p_start:p_end], "max_queue_size", str(overrides.max_queue_size), "    ") + body[p_end:]
        text = text[:start] + body + text[end:]
    if overrides.any():
        set_fields = ", ".join(f"{f.name}={getattr(overrides, f.name)}" for f in fields(overrides) if getattr(overrides, f.name) is not None)
        text = f"# Derived by triton-diffusion serve with start-up overrides: {set_fields}\n" + text
    return text


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
