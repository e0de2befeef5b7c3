"""Per-row helpers the cancellation and running-batch tests and ``perf/cancel_bench.py`` share."""

from __future__ import annotations


class CancelAfter:
    """True once the row has been asked about ``steps`` times (it is asked once per step while live)."""

    def __init__(self, steps: int):
        self.steps, self.calls = steps, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls > self.steps


def run_joining(model, items: list, joins: dict) -> list:
    """A running batch of a family's step adapter (``model``) driven by hand: ``items[0]`` starts, and at
    loop iteration ``i`` the items at the indices ``joins[i]`` join it; steps until every row finished.
    Returns every row's state, in the order the rows joined."""
    live = model.prepare(items[:1])
    every = list(live)
    for iteration in range(1000):
        for index in joins.get(iteration, []):
            joined = model.prepare([items[index]])
            live += joined
            every += joined
        if live:
            model.step(live)
            live = [row for row in live if not row.finished]
        if not live and iteration >= max(joins, default=0):
            return every
    raise RuntimeError("the running batch did not finish in 1000 steps")
