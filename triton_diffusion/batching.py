"""Plan pipeline calls: group compatible items, chunk groups to a memory budget, split results back.

Two items may share one pipeline call when everything that the pipeline takes as a *scalar*
is equal (task, size, steps, guidance, strength, whether a negative prompt is given). Prompts,
negative prompts, seeds and source images are per-item lists, so they may differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

from .requests import GenerationItem


@dataclass(frozen=True)
class ItemRef:
    """Where an item came from: request index in ``execute``'s list, and row inside that request."""

    request: int
    row: int


@dataclass(frozen=True)
class Chunk:
    """One pipeline call: items that share a signature, in arrival order."""

    signature: tuple
    refs: tuple[ItemRef, ...]
    items: tuple[GenerationItem, ...]

    def __len__(self) -> int:
        return len(self.items)


def signature(item: GenerationItem) -> tuple[Hashable, ...]:
    """Everything that must be equal for two items to run in one pipeline call."""
    return (
        item.task,
        item.height,
        item.width,
        item.num_inference_steps,
        item.guidance_scale,
        item.strength,
        item.negative_prompt is not None,
    )


def group_items(items: Iterable[tuple[ItemRef, GenerationItem]]) -> dict[tuple, list[tuple[ItemRef, GenerationItem]]]:
    """Group by signature; groups keep first-arrival order and items keep arrival order."""
    groups: dict[tuple, list[tuple[ItemRef, GenerationItem]]] = {}
    for ref, item in items:
        groups.setdefault(signature(item), []).append((ref, item))
    return groups


def chunk_size_for(item: GenerationItem, max_images_per_call: int, max_pixels_per_call: int) -> int:
    """How many items of this size fit one call's budget (always at least one)."""
    by_pixels = max_pixels_per_call // (item.height * item.width)
    return max(1, min(max_images_per_call, by_pixels))


def plan_batches(
    items: Iterable[tuple[ItemRef, GenerationItem]], max_images_per_call: int, max_pixels_per_call: int
) -> list[Chunk]:
    """Group compatible items and cut each group into chunks under the memory budget.

    Chunks of one group are made as equal as possible (10 items, limit 8 -> 5 + 5, not 8 + 2):
    the same number of calls, and latency evened out across them.
    """
    chunks = []
    for sig, members in group_items(items).items():
        limit = chunk_size_for(members[0][1], max_images_per_call, max_pixels_per_call)
        count = -(-len(members) // limit)
        base, extra = divmod(len(members), count)
        start = 0
        for index in range(count):
            size = base + (1 if index < extra else 0)
            part = members[start : start + size]
            start += size
            chunks.append(Chunk(sig, tuple(r for r, _ in part), tuple(i for _, i in part)))
    return chunks


def split_results(chunk: Chunk, outputs: Sequence, into: dict[ItemRef, object]) -> None:
    """Hand each output of a chunk back to the item it was computed for (same order)."""
    if len(outputs) != len(chunk.refs):
        raise RuntimeError(f"pipeline returned {len(outputs)} outputs for {len(chunk.refs)} inputs")
    for ref, output in zip(chunk.refs, outputs):
        into[ref] = output


def run_splitting_on_oom(run, items: Sequence, is_oom) -> list:
    """``run(items)``; when it runs out of memory, halve the chunk and retry each half.

    No request fails because of its batch-mates: only an item that does not fit even alone gets
    the out-of-memory error as its output (answered as that request's error). Other errors raise.
    """
    try:
        return list(run(items))
    except Exception as exc:
        if not is_oom(exc):
            raise
        if len(items) == 1:
            return [exc]
    middle = len(items) // 2
    return run_splitting_on_oom(run, items[:middle], is_oom) + run_splitting_on_oom(run, items[middle:], is_oom)
