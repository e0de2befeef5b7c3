"""Plan pipeline calls: group compatible rows, chunk groups to a memory budget.

Two rows may share one pipeline call when their ``CallParams`` (every scalar the pipeline takes:
task, size, steps, guidance, strength, whether a negative prompt is given) are equal. Prompts,
negative prompts, seeds and source images are per-row lists, so they may differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Iterable, TypeVar

from .requests import CallParams

Row = TypeVar("Row")


@dataclass(frozen=True)
class CallBudget:
    """What one pipeline call may hold: images, and images x height x width."""

    max_images: int
    max_pixels: int

    def images_per_call(self, params: CallParams) -> int:
        """How many rows of this size fit one call (always at least one)."""
        return max(1, min(self.max_images, self.max_pixels // params.pixels))


@dataclass(frozen=True)
class Chunk(Generic[Row]):
    """One pipeline call: rows that share ``params``, in arrival order."""

    params: CallParams
    rows: tuple[Row, ...]

    def __len__(self) -> int:
        return len(self.rows)


def group_rows(rows: Iterable[tuple[CallParams, Row]]) -> dict[CallParams, list[Row]]:
    """Group by call parameters; groups keep first-arrival order and rows keep arrival order."""
    groups: dict[CallParams, list[Row]] = {}
    for params, row in rows:
        groups.setdefault(params, []).append(row)
    return groups


def plan_batches(rows: Iterable[tuple[CallParams, Row]], budget: CallBudget) -> list[Chunk[Row]]:
    """Group compatible rows and cut each group into chunks under the budget.

    Chunks of one group are made as equal as possible (10 rows, limit 8 -> 5 + 5, not 8 + 2):
    the same number of calls, and latency evened out across them.
    """
    chunks = []
    for params, members in group_rows(rows).items():
        limit = budget.images_per_call(params)
        count = -(-len(members) // limit)
        base, extra = divmod(len(members), count)
        start = 0
        for index in range(count):
            size = base + (1 if index < extra else 0)
            chunks.append(Chunk(params, tuple(members[start : start + size])))
            start += size
    return chunks
