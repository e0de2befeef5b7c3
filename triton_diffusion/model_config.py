"""Read and write ``config.pbtxt`` through Triton's own ``ModelConfig`` protobuf.

One editor for every tool that derives a config (start-up overrides, benchmark variants, test
models): parse with ``google.protobuf.text_format`` into ``tritonclient``'s ``ModelConfig``, change
fields, write it back. Comments of the source are not kept; a derived config says where it came
from in its header.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from .launcher import DEFAULT_MODEL_REPOSITORY

ModelConfig = model_config_pb2.ModelConfig
BASE_MODEL = "stable_diffusion_tiny"


def parse(text: str) -> ModelConfig:
    return text_format.Parse(text, ModelConfig())


def load(path: Path) -> ModelConfig:
    """A ``config.pbtxt`` as Triton serves it: completed with the inputs, outputs and transaction
    policy the backend declares where the file leaves them out (``schema.complete``)."""
    return completed(parse(Path(path).read_text()))


def completed(config: ModelConfig) -> ModelConfig:
    from .schema import complete

    return json_format.ParseDict(complete(as_dict(config)), ModelConfig())


def shipped(model: str = BASE_MODEL) -> ModelConfig:
    """A model's config as shipped in ``model_repository/``."""
    return load(DEFAULT_MODEL_REPOSITORY / model / "config.pbtxt")


def render(config: ModelConfig, header: str = "") -> str:
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + text_format.MessageToString(config)


def as_dict(config: ModelConfig) -> dict[str, Any]:
    """The JSON form Triton hands the backend (``args['model_config']``) and serves at ``/config``."""
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def parameters(config: ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def set_parameters(config: ModelConfig, values: Mapping[str, Optional[str]]) -> None:
    """Set (or, with None, remove) ``parameters`` entries."""
    for key, value in values.items():
        if value is None:
            config.parameters.pop(key, None)
        else:
            config.parameters[key].string_value = str(value)


def set_batching(
    config: ModelConfig,
    *,
    max_batch_size: Optional[int] = None,
    preferred_batch_sizes: Optional[tuple[int, ...]] = None,
    max_queue_delay_us: Optional[int] = None,
    max_queue_size: Optional[int] = None,
) -> None:
    """Change the batching fields that are not None; ``preferred_batch_sizes=()`` removes them."""
    if max_batch_size is not None:
        config.max_batch_size = max_batch_size
    batching = config.dynamic_batching  # set fields create the block where a config has none
    if preferred_batch_sizes is not None:
        del batching.preferred_batch_size[:]
        batching.preferred_batch_size.extend(preferred_batch_sizes)
    if max_queue_delay_us is not None:
        batching.max_queue_delay_microseconds = max_queue_delay_us
    if max_queue_size is not None:
        batching.default_queue_policy.max_queue_size = max_queue_size


def variant(
    name: str,
    parameters_: Optional[Mapping[str, Optional[str]]] = None,
    dynamic_batching: Optional[str] = "",
    max_batch_size: Optional[int] = None,
    base: str = BASE_MODEL,
) -> ModelConfig:
    """The shipped ``base`` config under another name, with parameters and batching changed.

    ``dynamic_batching``: ``""`` keeps the base's block, ``None`` serves without batching (every
    request its own execution), any other text replaces the block with that body
    (e.g. ``"max_queue_delay_microseconds: 1000"``). The inputs and outputs are completed from the
    variant's own parameters (a ``step_cache`` or ``batching`` changes what the model declares).
    """
    config = parse((DEFAULT_MODEL_REPOSITORY / base / "config.pbtxt").read_text())
    config.name = name
    if max_batch_size is not None:
        config.max_batch_size = max_batch_size
    if dynamic_batching is None:
        config.ClearField("dynamic_batching")
    elif dynamic_batching:
        config.ClearField("dynamic_batching")
        text_format.Parse(dynamic_batching, config.dynamic_batching)
        config.dynamic_batching.SetInParent()
    set_parameters(config, parameters_ or {})
    return completed(config)


def write_model(repository: Path, config: ModelConfig, base: str = BASE_MODEL, header: str = "") -> Path:
    """A model folder in ``repository``: ``config`` plus the base model's shim."""
    model_dir = Path(repository) / config.name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(DEFAULT_MODEL_REPOSITORY / base / "1" / "model.py", model_dir / "1" / "model.py")
    (model_dir / "config.pbtxt").write_text(render(config, header or f"derived from model_repository/{base}/config.pbtxt"))
    return model_dir
