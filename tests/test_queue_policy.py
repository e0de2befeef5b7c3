"""The queue policy of config.pbtxt: client deadlines, per-request queue timeouts, priority levels.

Every test holds requests in Triton's queue deterministically with TRITONSERVER_DELAY_SCHEDULER
(the batcher forms its first batch only once N requests are queued) and waits on the server's
queue (``nv_inference_pending_request_count``), so no test depends on how fast this machine is.
"""

import threading

from client import DiffusionClient, GenerationRequest, RetryPolicy, ServerError
from testing import harness
from triton_diffusion import model_config

from .conftest import TINY, metric, pending

def small(prompt: str, seed: int, **options) -> GenerationRequest:
    return GenerationRequest(prompt, seed=seed, height=64, width=64, steps=2, **options)


class Sender:
    """Sends requests from threads and records each outcome and the order in which they finished."""

    def __init__(self, server, model=TINY):
        self.server, self.model = server, model
        self.outcomes, self.finished, self.threads = {}, [], []
        self._lock = threading.Lock()

    def send(self, label: str, request: GenerationRequest, timeout_s=None) -> None:
        def run():
            client = DiffusionClient(f"grpc://{self.server.grpc_url}", self.model, timeout_s=timeout_s,
                                     retry=RetryPolicy(attempts=1))
            try:
                outcome = client.generate(request)
            except ServerError as exc:
                outcome = exc
            with self._lock:
                self.outcomes[label] = outcome
                self.finished.append(label)

        thread = threading.Thread(target=run)
        thread.start()
        self.threads.append(thread)

    def queued(self, count: int) -> None:
        """Wait until ``count`` requests of this model sit in Triton's queue."""
        harness.wait_until(lambda: pending(self.server, self.model) >= count, f"{count} queued requests of {self.model}")

    def join(self) -> None:
        for thread in self.threads:
            thread.join()


def test_client_deadline_drops_the_request_while_it_is_still_queued(delayed_server):
    server = delayed_server(3)
    sender = Sender(server)
    sender.send("in a hurry", small("in a hurry", 1), timeout_s=0.5)
    sender.join()
    assert isinstance(sender.outcomes["in a hurry"], ServerError) and sender.outcomes["in a hurry"].timed_out
    for index in range(3):
        sender.send(f"later {index}", small("later", 10 + index))
    sender.join()
    harness.wait_until(lambda: harness.Stats.read(server, TINY).inferences >= 3, "three inferences")
    assert all(not isinstance(sender.outcomes[f"later {i}"], Exception) for i in range(3))
    stats = harness.Stats.read(server, TINY)
    assert stats.inferences == 3, "the abandoned request must never run"
    assert metric(server, "diffusion_requests_cancelled_total") == 0


def test_per_request_queue_timeout_is_ignored_by_triton_when_priority_levels_are_set(delayed_server):
    """Pins a Triton 2.51 limitation (docs/reliability.md): with priority_levels (the shipped
    config), a request's own queue timeout is not enforced: a request whose 1 us timeout expired
    long before its batch formed still runs. If this starts failing, Triton enforces it now."""
    server = delayed_server(2)
    sender = Sender(server)
    sender.send("timeout 1us", small("in a hurry", 1, timeout_us=1))
    sender.queued(1)
    sender.send("release", small("release", 2))
    sender.join()
    assert not isinstance(sender.outcomes["release"], Exception), sender.outcomes
    hurried = sender.outcomes["timeout 1us"]
    assert not isinstance(hurried, Exception), f"Triton now enforces per-request timeouts with priority levels: {hurried}"
    assert harness.wait_for_executions(server, TINY, 1).histogram == {2: 1}


def test_high_priority_request_overtakes_queued_normal_ones(delayed_server, tmp_path_factory):
    repository = tmp_path_factory.mktemp("priority") / "repo"
    name = "tiny_one_at_a_time"
    model_config.write_model(repository, model_config.variant(name, max_batch_size=1))
    server = delayed_server(6, models=[name], repository=repository)
    sender = Sender(server, name)
    for index in range(4):
        sender.send(f"normal {index}", small(f"n{index}", index))
        sender.queued(index + 1)  # arrival order is fixed before the next one is sent
    sender.send("high", small("urgent", 9, priority=1))
    sender.queued(5)
    sender.send("normal 4", small("n4", 4))  # the sixth request releases the batcher
    sender.join()
    assert all(not isinstance(outcome, Exception) for outcome in sender.outcomes.values()), sender.outcomes
    # One request per execution, in queue order: the high-priority one first, then FIFO.
    assert sender.finished[0] == "high", sender.finished
    assert sender.finished[1:] == [f"normal {i}" for i in range(5)], sender.finished
