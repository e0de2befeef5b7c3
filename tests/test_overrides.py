"""Start-up batching overrides (CLI flags / TRITON_DIFFUSION_* variables, used by docker compose)."""

from __future__ import annotations

import json
import urllib.request

import pytest

from triton_diffusion import model_config
from triton_diffusion.cli import main
from triton_diffusion.launcher import DEFAULT_MODEL_REPOSITORY
from triton_diffusion.overrides import BatchingOverrides, apply_overrides, derived_repository, parse_sizes

from .conftest import TINY, start_server


def config_text(model: str) -> str:
    return (DEFAULT_MODEL_REPOSITORY / model / "config.pbtxt").read_text()


@pytest.mark.parametrize("model", [TINY, "sd_turbo"])
def test_every_knob_is_replaced_and_the_rest_is_kept(model):
    original = model_config.parse(config_text(model))
    text = apply_overrides(config_text(model), BatchingOverrides(8, (2, 8), 5000, 10))
    assert text.startswith("# Derived by triton-diffusion serve with start-up overrides: max_batch_size=8")
    derived = model_config.parse(text)
    assert derived.max_batch_size == 8
    assert list(derived.dynamic_batching.preferred_batch_size) == [2, 8]
    assert derived.dynamic_batching.max_queue_delay_microseconds == 5000
    assert derived.dynamic_batching.default_queue_policy.max_queue_size == 10
    # everything else is the original, field for field
    for config in (original, derived):
        config.max_batch_size = 0
        config.dynamic_batching.ClearField("preferred_batch_size")
        config.dynamic_batching.max_queue_delay_microseconds = 0
        config.dynamic_batching.default_queue_policy.max_queue_size = 0
    assert derived == original


def test_no_override_changes_nothing_and_none_clears_preferred_sizes():
    original = config_text("sd_turbo")
    assert apply_overrides(original, BatchingOverrides()) == original
    assert parse_sizes("none") == () and parse_sizes("4, 8,16") == (4, 8, 16)
    cleared = model_config.parse(apply_overrides(original, BatchingOverrides(preferred_batch_sizes=())))
    assert list(cleared.dynamic_batching.preferred_batch_size) == []
    assert list(model_config.parse(original).dynamic_batching.preferred_batch_size) == [16]


def test_a_config_without_dynamic_batching_gets_one():
    derived = model_config.parse(apply_overrides('name: "m"\nmax_batch_size: 4\n', BatchingOverrides(max_queue_delay_us=100, max_queue_size=3)))
    assert derived.HasField("dynamic_batching")
    assert derived.dynamic_batching.max_queue_delay_microseconds == 100
    assert derived.dynamic_batching.default_queue_policy.max_queue_size == 3


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
    assert seen["fronts"] is False
    monkeypatch.setenv("TRITON_DIFFUSION_FRONTS", "1")
    assert main(["serve"]) == 0 and seen["fronts"] is True


def test_triton_serves_the_derived_config(tmp_path):
    overrides = BatchingOverrides(max_batch_size=4, preferred_batch_sizes=(2, 4), max_queue_delay_us=7000, max_queue_size=5)
    repository = derived_repository(DEFAULT_MODEL_REPOSITORY, [TINY], overrides)
    server = start_server(tmp_path, [TINY], repository=repository, require_ready=True)
    started = server.process
    with server:  # entering a started server keeps its process (no second tritonserver) and stops it after
        assert server.process is started
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{TINY}/config") as response:
            served = json.load(response)
    assert started.poll() is not None
    batching = served["dynamic_batching"]
    assert served["max_batch_size"] == 4
    assert [int(size) for size in batching["preferred_batch_size"]] == [2, 4]
    assert int(batching["max_queue_delay_microseconds"]) == 7000
    assert int(batching["default_queue_policy"]["max_queue_size"]) == 5
    assert batching["priority_levels"] == "2" or int(batching["priority_levels"]) == 2


def test_serve_removes_its_derived_repository_when_it_stops(tmp_path):
    """Overrides and --fronts serve a derived copy of the repository: it goes when the server does
    (a stop by signal as well as --exit-when-ready)."""
    import os
    import signal
    import subprocess
    import sys

    from testing import harness
    from triton_diffusion.launcher import free_port

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "HF_HUB_OFFLINE": "1"}
    ports = [str(free_port()) for _ in range(3)]
    command = [sys.executable, "-m", "triton_diffusion.cli", "serve", "--models", "tiny_shapes", "--fronts",
               "--max-queue-delay-us", "1000", "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]]
    log = tmp_path / "serve.log"
    server = subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    harness.wait_until(lambda: server.poll() is not None or "listening:" in log.read_text(), "the server", timeout=300)
    assert [p.name for p in scratch.iterdir() if p.name.startswith("triton-diffusion-repo-")], log.read_text()
    server.send_signal(signal.SIGTERM)
    assert server.wait(120) == 0
    assert not [p for p in scratch.iterdir() if p.name.startswith("triton-diffusion-repo-")]
    once = subprocess.run(command + ["--exit-when-ready"], env=env, capture_output=True, text=True, timeout=300)
    assert once.returncode == 0, once.stderr[-2000:]
    assert not [p for p in scratch.iterdir() if p.name.startswith("triton-diffusion-repo-")]
