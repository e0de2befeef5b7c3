"""The queue policy of config.pbtxt: per-request queue timeouts and two priority levels.

A variant of the tiny model with the shipped queue policy and max_batch_size 1 makes the queue
observable: Triton moves queued requests into the *next* execution while one runs (and a request
already taken no longer times out or yields to priority), so with batches of one, every request
after the next one really waits in the queue.
"""

import re
import threading
import time

import pytest

from client import DiffusionClient, GenerationRequest, RetryPolicy, ServerError
from perf.variants import render_config, write_variant
from triton_diffusion.launcher import DEFAULT_MODEL_REPOSITORY, model_statistics

from .conftest import TINY, start_server

NAME = "tiny_queue_policy"
BLOCKER = GenerationRequest("keeps the instance busy", seed=1, height=256, width=256, steps=20)


def shipped_batching_block() -> str:
    """The dynamic_batching body of the shipped tiny config (queue policy and priorities)."""
    text = (DEFAULT_MODEL_REPOSITORY / TINY / "config.pbtxt").read_text()
    body = text[text.index("dynamic_batching {") + len("dynamic_batching {"):]
    body = body[: body.index("\n}\n")]
    return re.sub(r"#.*", "", body)


@pytest.fixture(scope="module")
def queue_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("queue-policy")
    write_variant(root / "repo", NAME, render_config(NAME, {}, shipped_batching_block(), max_batch_size=1))
    server = start_server(root, [NAME], repository=root / "repo")
    yield server
    server.stop()


def in_background(server, request, finished=None, label=None):
    def send():
        try:
            DiffusionClient(f"grpc://{server.grpc_url}", NAME, retry=RetryPolicy(attempts=1)).generate(request)
        finally:
            if finished is not None:
                finished[label] = time.perf_counter()

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def execution_count(server) -> int:
    return int(model_statistics(server.http_url, NAME)["execution_count"])


def test_client_deadline_drops_the_request_while_it_is_still_queued(queue_server):
    before = execution_count(queue_server)
    blocker = in_background(queue_server, BLOCKER)
    time.sleep(0.5)
    next_one = in_background(queue_server, GenerationRequest("next", seed=2, height=64, width=64, steps=4))
    time.sleep(0.3)
    client = DiffusionClient(f"grpc://{queue_server.grpc_url}", NAME, timeout_s=0.5, retry=RetryPolicy(attempts=1))
    with pytest.raises(ServerError, match="(?i)deadline"):
        client.generate(GenerationRequest("in a hurry", seed=3, height=64, width=64, steps=4))
    for thread in (blocker, next_one):
        thread.join()
    time.sleep(1.0)
    assert execution_count(queue_server) - before == 2, "the abandoned request must never run"


def test_per_request_queue_timeout_is_ignored_by_triton_when_priority_levels_are_set(queue_server):
    """Pins a Triton 2.51 limitation (README, Reliability): with priority_levels, a request's own
    queue timeout is not enforced (per-level default timeouts are). Without priority levels the same
    request is rejected with "Request timeout expired". If this starts failing, Triton fixed it."""
    blocker = in_background(queue_server, BLOCKER)
    time.sleep(0.5)
    client = DiffusionClient(f"grpc://{queue_server.grpc_url}", NAME, retry=RetryPolicy(attempts=1))
    waited = time.perf_counter()
    result = client.generate(GenerationRequest("in a hurry", seed=3, height=64, width=64, steps=4, timeout_us=100_000))
    waited = time.perf_counter() - waited
    blocker.join()
    assert result.array.shape == (64, 64, 3) and waited > 0.5


def test_high_priority_request_overtakes_queued_normal_ones(queue_server):
    finished: dict[str, float] = {}
    blocker = in_background(queue_server, BLOCKER)
    time.sleep(0.5)
    normals = []
    for i in range(4):
        normals.append(in_background(queue_server, GenerationRequest(f"n{i}", seed=i, height=64, width=64, steps=4), finished, f"normal {i}"))
        time.sleep(0.1)
    high = in_background(queue_server, GenerationRequest("urgent", seed=9, height=64, width=64, steps=4, priority=1), finished, "high")
    for thread in [blocker, *normals, high]:
        thread.join()
    later_normals = [label for label, at in finished.items() if label != "high" and at > finished["high"]]
    # The first normal request may already be taken into the next execution; the rest queue.
    assert len(later_normals) >= 3, f"finish order: {sorted(finished, key=finished.get)}"
