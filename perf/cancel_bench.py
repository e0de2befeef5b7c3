"""What dropping cancelled rows from a running call saves: one batch, some rows cancelled mid-denoise.

Three ways to run the same batch (random weights of a real architecture, built on the device):
  full  nobody cancels;
  drop  ``--cancel`` rows are cancelled after step ``--after-step`` and leave the call (the server's
        behaviour, ``triton_diffusion/cancellation.py``);
  ride  the same cancellations, but the rows stay in the call to the end (what a pipeline whose
        family declares no ``ShrinkSpec`` does);
  survivors-only  a batch of just the rows that are never cancelled: how far a change of batch
        size alone moves the images (fp16 kernels differ per batch shape), to compare with drop.
It prints seconds per call (median of ``--repeats``) and how far the surviving images of
``drop`` / ``ride`` are from ``full`` (uint8 levels), and writes JSON + TXT to ``--out``.

    python perf/cancel_bench.py --arch sd15 --out perf/results               # GPU
    python perf/cancel_bench.py --arch sd15-tiny --device cpu --size 128     # CPU check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np


from perf.gpu_bench import dtype_for, items_for
from perf.lib import card_name, log
from testing.rows import CancelAfter
from perf.prompts import vbench_prompts


def run_mode(runner, items, mode: str, args) -> tuple[float, list]:
    import torch

    import triton_diffusion.cancellation as cancellation

    never = lambda: False  # noqa: E731
    if mode == "survivors-only":
        items = items[: len(items) - args.cancel]
    cancelling = mode in ("drop", "ride")
    checks = [CancelAfter(args.after_step) if cancelling and row >= len(items) - args.cancel else never for row in range(len(items))]
    could_shrink = runner.can_shrink
    runner.can_shrink = could_shrink and mode != "ride"  # ride: as a pipeline whose family declares no row drop
    try:
        started = time.perf_counter()
        outputs = runner.run(items[0].params, items, cancellation.per_row_checks(checks))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started, outputs
    finally:
        runner.can_shrink = could_shrink


def difference(outputs, reference, rows) -> tuple[int, float]:
    diffs = [np.abs(outputs[row].astype(int) - reference[row].astype(int)) for row in rows]
    return max(int(d.max()) for d in diffs), float(np.mean([(d > 0).mean() for d in diffs]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cancel", type=int, default=8, help="rows cancelled (the last ones)")
    parser.add_argument("--after-step", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("perf/out"))
    args = parser.parse_args(argv)

    from triton_diffusion.pipeline import PipelineRunner
    from triton_diffusion.settings import ModelSettings

    runner = PipelineRunner.load(
        ModelSettings.build(pretrained_model=f"random:{args.arch}", device=args.device, torch_dtype=dtype_for(args.arch, args))
    )
    items = items_for(vbench_prompts(), args.batch, args, args.arch)
    survivors = range(args.batch - args.cancel)
    run_mode(runner, items, "full", args)  # warm-up
    results, reference = {}, None
    for mode in ("full", "drop", "ride", "survivors-only"):
        times = []
        for _ in range(args.repeats):
            seconds, outputs = run_mode(runner, items, mode, args)
            times.append(seconds)
        if mode == "full":
            reference = outputs
        assert all(outputs[row] is not None for row in survivors)
        max_diff, share = difference(outputs, reference, survivors)
        results[mode] = {"seconds": statistics.median(times), "survivors_max_diff": max_diff, "survivors_share_differing": share,
                         "rows": len(outputs), "cancelled_outputs": sum(output is None for output in outputs)}
        log(f"{mode}: {results[mode]}")

    card = card_name()
    lines = [
        f"{card}, {args.arch} {dtype_for(args.arch, args)}, {args.size}x{args.size}, {args.steps} steps, batch {args.batch}, "
        f"{args.cancel} rows cancelled after step {args.after_step}, median of {args.repeats}, {date.today()}",
        "| mode | s/call | vs full | survivors vs full: max diff, share of values differing |",
        "|---|---|---|---|",
    ]
    for mode, row in results.items():
        lines.append(f"| {mode} | {row['seconds']:.3f} | {row['seconds'] / results['full']['seconds']:.2f}x | "
                     f"{row['survivors_max_diff']}, {row['survivors_share_differing']:.3%} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{card.split()[1] if ' ' in card else card}_{args.arch}_cancel"
    stem.with_suffix(".json").write_text(json.dumps({"card": card, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    stem.with_suffix(".txt").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
