"""Per-row helpers the cancellation tests and ``perf/cancel_bench.py`` share."""

from __future__ import annotations


class CancelAfter:
    """True once the row has been asked about ``steps`` times (it is asked once per step while live)."""

    def __init__(self, steps: int):
        self.steps, self.calls = steps, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls > self.steps
