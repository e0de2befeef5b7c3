"""The request schema, read from the model's ``config.pbtxt`` (its ``input`` and ``output`` lists).

``config.pbtxt`` declares which inputs a model takes, their data types and which are optional;
this module checks that every declared input is one the backend understands, with a data type
that fits its meaning, so a typo in a config fails the model's load instead of being ignored.
The client reads the same declaration from the served config (``client.api.ServedSchema``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

# What each input means to the backend -> the Triton data types that can carry it.
TEXT, INTEGER, NUMBER, PIXELS = "text", "integer", "number", "pixels"
INPUT_KINDS = {
    "PROMPT": TEXT,
    "NEGATIVE_PROMPT": TEXT,
    "SEED": INTEGER,
    "NUM_INFERENCE_STEPS": INTEGER,
    "HEIGHT": INTEGER,
    "WIDTH": INTEGER,
    "GUIDANCE_SCALE": NUMBER,
    "STRENGTH": NUMBER,
    "IMAGE": PIXELS,
    "NUM_FRAMES": INTEGER,  # video models only
}
REQUIRED_INPUTS = ("PROMPT",)
# Every model returns SEED, and either IMAGE ([B, H, W, 3]) or VIDEO ([B, F, H, W, 3]).
MEDIA_OUTPUTS = {"IMAGE": "TYPE_UINT8", "VIDEO": "TYPE_UINT8"}
SEED_OUTPUT = ("SEED", "TYPE_INT64")
# Continuous models may also declare PROGRESS: [steps done, steps in all] per row, sent in the
# responses before the last to requests that ask for them (request parameter "progress").
PROGRESS_OUTPUT = ("PROGRESS", "TYPE_INT32")
KNOWN_OUTPUTS = {*MEDIA_OUTPUTS, SEED_OUTPUT[0], PROGRESS_OUTPUT[0]}
_TYPES_OF_KIND = {
    TEXT: {"TYPE_STRING"},
    INTEGER: {"TYPE_INT32", "TYPE_INT64"},
    NUMBER: {"TYPE_FP32", "TYPE_FP64"},
    PIXELS: {"TYPE_UINT8"},
}
class SchemaError(ValueError):
    """The ``input``/``output`` lists of a config.pbtxt do not fit this backend."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    data_type: str  # Triton's spelling, e.g. "TYPE_INT64"
    optional: bool


@dataclass(frozen=True)
class Schema:
    """The inputs a model declares, by name, in declaration order."""

    inputs: Mapping[str, InputSpec]
    output: str = "IMAGE"  # IMAGE or VIDEO: what the model returns besides SEED
    progress: bool = False  # declares the PROGRESS output

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any]) -> "Schema":
        """From Triton's model config JSON (``args['model_config']``, parsed)."""
        inputs: dict[str, InputSpec] = {}
        for entry in config.get("input", []):
            name, data_type = entry.get("name", ""), entry.get("data_type", "")
            if name not in INPUT_KINDS:
                raise SchemaError(
                    f"config.pbtxt declares input {name!r}, which this backend does not understand; "
                    f"known inputs: {', '.join(INPUT_KINDS)}"
                )
            allowed = _TYPES_OF_KIND[INPUT_KINDS[name]]
            if data_type not in allowed:
                raise SchemaError(f"config.pbtxt input {name} has data_type {data_type}; it must be one of {sorted(allowed)}")
            inputs[name] = InputSpec(name, data_type, bool(entry.get("optional", False)))
        for name in REQUIRED_INPUTS:
            if name not in inputs:
                raise SchemaError(f"config.pbtxt must declare input {name}")
            if inputs[name].optional:
                raise SchemaError(f"config.pbtxt input {name} is required by the backend; remove 'optional: true'")
        declared_outputs = {entry.get("name"): entry.get("data_type") for entry in config.get("output", [])}
        unknown = sorted(set(declared_outputs) - KNOWN_OUTPUTS)
        if unknown:
            raise SchemaError(f"config.pbtxt declares output(s) {unknown}, which this backend never sends; "
                              f"known outputs: {', '.join(sorted(KNOWN_OUTPUTS))}")
        name, data_type = PROGRESS_OUTPUT
        if name in declared_outputs and declared_outputs[name] != data_type:
            raise SchemaError(f"config.pbtxt output {name} must have data_type {data_type}")
        name, data_type = SEED_OUTPUT
        if declared_outputs.get(name) != data_type:
            raise SchemaError(f"config.pbtxt must declare output {name} with data_type {data_type}")
        media = [name for name in MEDIA_OUTPUTS if name in declared_outputs]
        if len(media) != 1:
            raise SchemaError("config.pbtxt must declare exactly one of the outputs IMAGE and VIDEO (TYPE_UINT8), "
                              f"got {media or 'neither'}")
        if declared_outputs[media[0]] != MEDIA_OUTPUTS[media[0]]:
            raise SchemaError(f"config.pbtxt output {media[0]} must have data_type {MEDIA_OUTPUTS[media[0]]}")
        return cls(inputs, media[0], PROGRESS_OUTPUT[0] in declared_outputs)

    def __contains__(self, name: str) -> bool:
        return name in self.inputs

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.inputs)
