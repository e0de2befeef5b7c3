"""What each image-changing knob costs on the trained DiT (``tiny_shapes_dit``), per setting: held-out
adherence per attribute, pixel error (PSNR) against the image of the same caption and seed at the
model's default setting (20 steps, no cache), the share of row-steps at which a step cache skipped
the transformer blocks after the first, and the speed-up, through the served code path (``PipelineRunner``, in batches; every row
opts in to the cache as STEP_CACHE=1 does).

Knobs: the per-row first-block cache (``step_cache: "FirstBlockCache threshold=..."``, the only step
cache that applies to a Z-Image transformer: diffusers 0.42 gives ZImageTransformer2DModel none of its
cache hooks) and fewer steps.

    python perf/quality_speed.py --thresholds 0.05,0.1,0.2,0.4 --steps 10,5 --seeds 1
    python perf/quality_speed.py --docs          # docs/tiny-model.md's table from RESULTS
    python perf/quality_speed.py --check-docs    # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from perf.adherence import ROOT, WORLDS, load, write_tables
from testing import shapes
from triton_diffusion import row_cache
from triton_diffusion.acceleration import denoiser_of
from triton_diffusion.requests import text_to_image

MODEL = "tiny_shapes_dit"
RESULTS = "cpu_tiny_shapes_dit_quality_speed_2026-12-02"  # the docs table's source (perf/results)


def generate(runner, captions, steps: int, guidance: float, batch: int):
    """(images, seconds, block-steps skipped) for every caption (seed = its index), in batches."""
    items = [dataclasses.replace(text_to_image(caption, 100 + index, steps, guidance, shapes.SIZE, shapes.SIZE),
                                 step_cache=True) for index, caption in enumerate(captions)]
    denoiser = denoiser_of(runner.text_to_image)
    runner.run(items[0].params, items[:1])  # warm-up
    skipped, images, started = row_cache.skipped_rows(denoiser), [], time.perf_counter()
    for start in range(0, len(items), batch):
        images += runner.run(items[start].params, items[start:start + batch])
    return images, time.perf_counter() - started, row_cache.skipped_rows(denoiser) - skipped


def psnr(images, references) -> float:
    """Peak signal-to-noise ratio (dB) of the mean squared error over all images (inf: identical)."""
    error = np.mean([np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2) for a, b in zip(images, references)])
    return float("inf") if error == 0 else float(10 * np.log10(255 ** 2 / error))


def markdown(stem: str = RESULTS) -> str:
    results = json.loads((ROOT / "perf" / "results" / f"{stem}.json").read_text())
    rows, attributes = results["rows"], results["attributes"]
    lines = ["| setting | img/s (CPU) | speed-up | row-steps that skipped the blocks | "
             + " | ".join(f"{attribute} right" for attribute in attributes) + " | PSNR vs default |",
             "|" + "---|" * (5 + len(attributes))]
    for index, row in enumerate(rows):
        error = "reference" if index == 0 else "identical" if row["psnr"] == float("inf") else f"{row['psnr']:.1f} dB"
        lines.append(f"| {row['setting']} | {row['images_per_s']:.2f} | {row['speed_up']:.2f}x | {100 * row['skipped']:.0f}% | "
                     + " | ".join(f"{100 * row[key]:.0f}%" for key in attributes) + f" | {error} |")
    return "\n".join(lines) + (f"\n\n(`perf/results/{stem}.*`: {rows[0]['images']} images per row, "
                               f"{results['captions']} held-out captions x {results['seeds']} seeds, guidance {results['guidance']})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--thresholds", default="0.05,0.1,0.2,0.4", help="FirstBlockCache thresholds (at the default steps)")
    parser.add_argument("--steps", default="10,5", help="fewer steps than the default (no cache)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    parser.add_argument("--docs", action="store_true")
    parser.add_argument("--check-docs", action="store_true")
    args = parser.parse_args(argv)
    if args.docs or args.check_docs:
        return write_tables({f"quality:{MODEL}": markdown()}, args.check_docs, "python perf/quality_speed.py --docs")

    held_out, adherence = WORLDS[MODEL]
    captions = [caption for caption in held_out() for _ in range(args.seeds)]
    runner, settings = load(MODEL, args.device)
    default_steps, guidance = settings.defaults.default_steps, settings.defaults.default_guidance_scale
    settings_list = [(f"{default_steps} steps (default)", default_steps, None)]
    settings_list += [(f"{default_steps} steps, FirstBlockCache {threshold}", default_steps, float(threshold))
                      for threshold in args.thresholds.split(",") if threshold]
    settings_list += [(f"{steps} steps", int(steps), None) for steps in args.steps.split(",") if steps]
    rows, reference, reference_seconds = [], None, None
    for name, steps, threshold in settings_list:
        if threshold is not None:
            runner, _ = load(MODEL, args.device, step_cache=f"FirstBlockCache threshold={threshold}", speed_devices=args.device)
        elif rows:
            runner, _ = load(MODEL, args.device)
        images, seconds, skipped = generate(runner, captions, steps, guidance, args.batch)
        if reference is None:
            reference, reference_seconds = images, seconds
        # row-steps: each image's two rows (guidance) at every step
        rows.append({"setting": name, "steps": steps, "threshold": threshold, "images": len(images),
                     "images_per_s": len(images) / seconds, "speed_up": reference_seconds / seconds,
                     "skipped": skipped / (len(images) * 2 * steps),
                     **adherence(captions, images), "psnr": psnr(images, reference)})
        print(rows[-1], flush=True)
    attributes = [key for key in rows[0] if key not in ("setting", "steps", "threshold", "images", "images_per_s",
                                                        "speed_up", "skipped", "psnr")]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.device.split(':')[0]}_{MODEL}_quality_speed_{date.today().isoformat()}{args.label}"
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "captions": len(held_out()), "seeds": args.seeds,
              "guidance": guidance, "attributes": attributes, "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".txt").write_text(markdown(stem.name) + "\n" if args.out.resolve() == (ROOT / "perf" / "results").resolve()
                                        else json.dumps(rows, indent=1))
    print(stem.with_suffix(".txt").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
