"""Start-up batching overrides (CLI flags / TRITON_DIFFUSION_* variables, used by docker compose)."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from triton_diffusion.cli import main
from triton_diffusion.launcher import DEFAULT_MODEL_REPOSITORY
from triton_diffusion.overrides import BatchingOverrides, apply_overrides, derived_repository, parse_sizes

from .conftest import TINY, start_server


def config_text(model: str) -> str:
    return (DEFAULT_MODEL_REPOSITORY / model / "config.pbtxt").read_text()


def field(text: str, name: str) -> list[str]:
    return re.findall(rf"(?m)^\s*{name}:\s*(.+?)\s*$", text)


@pytest.mark.parametrize("model", [TINY, "sd_turbo"])
def test_every_knob_is_replaced_once_and_the_rest_is_kept(model):
    original = config_text(model)
    text = apply_overrides(original, BatchingOverrides(8, (2, 8), 5000, 10))
    assert field(text, "max_batch_size") == ["8"]
    assert field(text, "preferred_batch_size") == ["[ 2, 8 ]"]
    assert field(text, "max_queue_delay_microseconds") == ["5000"]
    assert field(text, "max_queue_size") == ["10"]
    for kept in ("priority_levels", "timeout_action", "allow_timeout_override", "instance_group"):
        assert re.findall(rf"(?m)^\s*{kept}\b.*$", text) == re.findall(rf"(?m)^\s*{kept}\b.*$", original)
    assert text.count("parameters {") == original.count("parameters {")


def test_no_override_changes_nothing_and_none_clears_preferred_sizes():
    original = config_text("sd_turbo")
    assert apply_overrides(original, BatchingOverrides()) == original
    assert parse_sizes("none") == () and parse_sizes("4, 8,16") == (4, 8, 16)
    assert field(apply_overrides(original, BatchingOverrides(preferred_batch_sizes=())), "preferred_batch_size") == []


def test_a_config_without_dynamic_batching_gets_one():
    text = apply_overrides('name: "m"\nmax_batch_size: 4\n', BatchingOverrides(max_queue_delay_us=100, max_queue_size=3))
    assert "dynamic_batching {" in text and field(text, "max_queue_delay_microseconds") == ["100"]
    assert "default_queue_policy { max_queue_size: 3 }" in text


def test_environment_sets_the_flag_defaults(monkeypatch):
    seen = {}
    monkeypatch.setattr("triton_diffusion.cli._serve", lambda args: seen.update(vars(args)) or 0)
    monkeypatch.setenv("TRITON_DIFFUSION_MODELS", "a, b")
    monkeypatch.setenv("TRITON_DIFFUSION_MAX_QUEUE_DELAY_US", "1234")
    monkeypatch.setenv("TRITON_DIFFUSION_MAX_BATCH_SIZE", "")  # empty: config.pbtxt's value
    monkeypatch.setenv("TRITON_DIFFUSION_HTTP_PORT", "9000")
    assert main(["serve"]) == 0
    assert seen["models"] == ["a", "b"] and seen["max_queue_delay_us"] == 1234
    assert seen["max_batch_size"] is None and seen["http_port"] == 9000
    assert main(["serve", "--max-queue-delay-us", "5"]) == 0 and seen["max_queue_delay_us"] == 5


def test_triton_serves_the_derived_config(tmp_path):
    overrides = BatchingOverrides(max_batch_size=4, preferred_batch_sizes=(2, 4), max_queue_delay_us=7000, max_queue_size=5)
    repository = derived_repository(DEFAULT_MODEL_REPOSITORY, [TINY], overrides)
    server = start_server(tmp_path, [TINY], repository=repository)
    try:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{TINY}/config") as response:
            served = json.load(response)
    finally:
        server.stop()
    batching = served["dynamic_batching"]
    assert served["max_batch_size"] == 4
    assert [int(size) for size in batching["preferred_batch_size"]] == [2, 4]
    assert int(batching["max_queue_delay_microseconds"]) == 7000
    assert int(batching["default_queue_policy"]["max_queue_size"]) == 5
    assert batching["priority_levels"] == "2" or int(batching["priority_levels"]) == 2
