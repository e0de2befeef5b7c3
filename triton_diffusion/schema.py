"""The request schema: the ``input`` and ``output`` lists of a model's config.

A ``config.pbtxt`` may leave them out: ``declaration`` says what the backend declares for it
(from its parameters: image or video, continuous or not, image-to-image or not), and the backend's
``auto_complete_config`` hands that to Triton, so the served config (``/v2/models/<m>/config``)
always shows the whole schema; ``model_config.load`` completes a file the same way for the tools
that read files. A config that does declare inputs (or outputs) keeps exactly those.

Either way the declared lists are checked here: every input must be one the backend understands,
with a data type that fits its meaning, so a typo in a config fails the model's load instead of
being ignored. The client reads the same declaration from the served config
(``client.api.ServedSchema``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .row_cache import decides_per_row

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
    "STEP_CACHE": INTEGER,  # models whose step cache decides per row: 1 = this request uses it
    "LORA": TEXT,  # models with a lora_dir: the adapter's name (empty: none)
    "LORA_SCALE": NUMBER,  # its weight (default 1.0)
}
REQUIRED_INPUTS = ("PROMPT",)
# Text inputs with a fixed byte limit (the prompts' is max_prompt_bytes): what requests.py enforces and
# the request-size guard counts.
TEXT_BYTES = {"LORA": 256}

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


def _tensor(name: str, data_type: str, dims: list, optional: bool = True, ragged: bool = False) -> dict:
    entry = {"name": name, "data_type": data_type, "dims": dims}
    if optional:
        entry["optional"] = True
    if ragged:  # requests with source images of different sizes (or none) still batch together
        entry["allow_ragged_batch"] = True
    return entry


def declaration(parameters: Mapping[str, str]) -> tuple[list[dict], list[dict], bool]:
    """``(inputs, outputs, decoupled)`` the backend declares for a config with these parameters
    (Triton's JSON spelling). Video models (``default_num_frames`` > 0) take ``NUM_FRAMES`` and
    return ``VIDEO``; continuous models (``batching: continuous``) are decoupled, text-to-image only,
    and also send ``PROGRESS``; image models with ``enable_image_to_image`` take ``IMAGE`` and
    ``STRENGTH``; models with a per-row ``step_cache`` take ``STEP_CACHE``; models with a ``lora_dir``
    take ``LORA`` and ``LORA_SCALE``."""
    video = int(parameters.get("default_num_frames", "0") or 0) > 0
    continuous = parameters.get("batching", "dynamic") == "continuous"
    image_to_image = parameters.get("enable_image_to_image", "true").strip().lower() in ("1", "true", "yes", "on")
    inputs = [
        _tensor("PROMPT", "TYPE_STRING", [1], optional=False),
        _tensor("NEGATIVE_PROMPT", "TYPE_STRING", [1]),
        _tensor("SEED", "TYPE_INT64", [1]),
        _tensor("NUM_INFERENCE_STEPS", "TYPE_INT32", [1]),
        _tensor("GUIDANCE_SCALE", "TYPE_FP32", [1]),
        _tensor("HEIGHT", "TYPE_INT32", [1]),
        _tensor("WIDTH", "TYPE_INT32", [1]),
    ]
    # a cache that decides per row (row_cache.py): a request opts in, and shares its call with those that do not
    if decides_per_row(parameters.get("step_cache", "")):
        inputs.append(_tensor("STEP_CACHE", "TYPE_INT32", [1]))
    if parameters.get("lora_dir", ""):  # LoRA adapters per request (lora.py)
        inputs += [_tensor("LORA", "TYPE_STRING", [1]), _tensor("LORA_SCALE", "TYPE_FP32", [1])]
    if video:
        inputs.append(_tensor("NUM_FRAMES", "TYPE_INT32", [1]))
    elif image_to_image and not continuous:
        inputs += [_tensor("IMAGE", "TYPE_UINT8", [-1, -1, 3], ragged=True), _tensor("STRENGTH", "TYPE_FP32", [1])]
    media = "VIDEO" if video else "IMAGE"
    outputs = [_tensor(media, "TYPE_UINT8", [-1, -1, -1, 3] if video else [-1, -1, 3], optional=False),
               _tensor("SEED", "TYPE_INT64", [1], optional=False)]
    if continuous:
        outputs.append(_tensor("PROGRESS", "TYPE_INT32", [2], optional=False))  # per row: steps done, steps in all
    return inputs, outputs, continuous


def complete(config: dict) -> dict:
    """``config`` (Triton's JSON form) with the declared inputs and outputs where it has none, and
    the decoupled policy of a continuous model; what Triton serves after ``auto_complete_config``."""
    parameters = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
    inputs, outputs, decoupled = declaration(parameters)
    completed = dict(config)
    if not config.get("input"):
        completed["input"] = inputs
    if not config.get("output"):
        completed["output"] = outputs
    if decoupled:  # batching: continuous decides
        completed["model_transaction_policy"] = {"decoupled": True}
    return completed


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
