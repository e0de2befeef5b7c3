"""Prompt adherence of a trained tiny model next to its speed, per setting.

For each number of denoising steps, it generates every held-out caption of the model's world
(combinations never rendered for training) with several seeds through ``PipelineRunner`` (the
served code path, in batches), judges each image from its pixels and times the calls.

    python perf/adherence.py --steps 20,10,5 --seeds 8                  # tiny_shapes (one shape)
    python perf/adherence.py --model tiny_shapes_dit --steps 20,10,5,3 --seeds 2   # two shapes, a relation
    python perf/adherence.py --docs            # docs/tiny-model.md's tables from the results in TABLES
    python perf/adherence.py --check-docs      # exit 1 if they are stale
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import date
from pathlib import Path

from perf.lib import write_tables as lib_write_tables
from testing import pairs, shapes
from triton_diffusion import model_config
from triton_diffusion.pipeline import PipelineRunner
from triton_diffusion.requests import text_to_image
from triton_diffusion.settings import ModelSettings

# Each trained model's world: its held-out captions and its judge.
WORLDS = {
    "tiny_shapes": (lambda: [shapes.Scene(*scene).caption for scene in shapes.HELD_OUT], shapes.adherence),
    "tiny_shapes_dit": (lambda: [pairs.PairScene(*scene).caption for scene in pairs.HELD_OUT], pairs.adherence),
}

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "tiny-model.md"
# model -> the results file (perf/results) its table in DOCS comes from: the served code path on CPU
TABLES = {"tiny_shapes": "cpu_tiny_shapes_adherence_2026-11-27",
          "tiny_shapes_dit": "cpu_tiny_shapes_dit_adherence_2026-12-02"}


def markdown(stem: str) -> str:
    """One results file as a markdown table: steps, speed, then each attribute the judge reads."""
    results = json.loads((ROOT / "perf" / "results" / f"{stem}.json").read_text())
    rows = results["rows"]
    attributes = [key for key in rows[0] if key not in ("steps", "images", "images_per_s")]
    lines = [f"| steps | img/s (CPU, batches of {results['args']['batch']}) | "
             + " | ".join(f"{attribute} right" for attribute in attributes) + " |",
             "|" + "---|" * (2 + len(attributes))]
    lines += [f"| {row['steps']} | {row['images_per_s']:.1f} | " + " | ".join(f"{100 * row[key]:.0f}%" for key in attributes) + " |"
              for row in rows]
    return "\n".join(lines) + f"\n\n(`perf/results/{stem}.*`: {rows[0]['images']} images per row)"


def write_tables(tables: dict[str, str], check: bool, command: str) -> int:
    """``perf.lib.write_tables`` on DOCS (docs/tiny-model.md)."""
    return lib_write_tables(DOCS, tables, check, command)


def write_docs(check: bool) -> int:
    return write_tables({f"adherence:{model}": markdown(stem) for model, stem in TABLES.items()}, check,
                        "python perf/adherence.py --docs")


def generate(runner: PipelineRunner, captions: list[str], steps: int, guidance: float, batch: int,
             step_cache: bool = False) -> tuple[list, float]:
    """(images, seconds) for every caption (seed 100 + its index), in batches of ``batch`` after one
    warm-up call; ``step_cache``: every row opts in to the model's per-row cache (STEP_CACHE=1)."""
    items = [dataclasses.replace(text_to_image(caption, 100 + index, steps, guidance, shapes.SIZE, shapes.SIZE),
                                 step_cache=step_cache) for index, caption in enumerate(captions)]
    runner.run(items[0].params, items[:1])
    images, started = [], time.perf_counter()
    for start in range(0, len(items), batch):
        images += runner.run(items[start].params, items[start:start + batch])
    return images, time.perf_counter() - started


def measure(runner: PipelineRunner, world, steps: int, seeds: int, guidance: float, batch: int) -> dict:
    held_out, adherence = world
    captions = [caption for caption in held_out() for _ in range(seeds)]
    images, seconds = generate(runner, captions, steps, guidance, batch)
    return {"steps": steps, "images": len(images), "images_per_s": len(images) / seconds, **adherence(captions, images)}


def load(model: str, device: str, pretrained: str = "", **extra: str) -> tuple[PipelineRunner, ModelSettings]:
    """The shipped model's runner, from its config.pbtxt's parameters (on ``device``, other weights or
    knobs where given)."""
    parameters = model_config.parameters(model_config.shipped(model))
    parameters.update({"device": device, **({"pretrained_model": pretrained} if pretrained else {}), **extra})
    settings = ModelSettings.from_parameters(parameters)
    return PipelineRunner.load(settings), settings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_shapes", choices=sorted(WORLDS))
    parser.add_argument("--pretrained", help="weights other than the shipped ones (a saved pipeline's folder)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", default="20,10,5")
    parser.add_argument("--seeds", type=int, default=8, help="images per held-out caption")
    parser.add_argument("--guidance", type=float, help="default: the model's")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--label", default="", help="appended to the results file's name")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    parser.add_argument("--docs", action="store_true", help="rewrite docs/tiny-model.md's tables and exit")
    parser.add_argument("--check-docs", action="store_true", help="exit 1 if docs/tiny-model.md's tables are stale")
    args = parser.parse_args(argv)
    if args.docs or args.check_docs:
        return write_docs(check=args.check_docs)
    runner, settings = load(args.model, args.device, args.pretrained or "")
    guidance = settings.defaults.default_guidance_scale if args.guidance is None else args.guidance
    world = WORLDS[args.model]
    rows = [measure(runner, world, int(steps), args.seeds, guidance, args.batch) for steps in args.steps.split(",")]
    attributes = [key for key in rows[0] if key not in ("steps", "images", "images_per_s")]
    lines = [f"{args.model} prompt adherence on {len(world[0]())} held-out captions x {args.seeds} seeds, guidance {guidance}, "
             f"{args.device}, batches of {args.batch}, {date.today().isoformat()}",
             " | ".join(["steps", "img/s", *attributes])]
    lines += [" | ".join([str(r["steps"]), f"{r['images_per_s']:.1f}", *(f"{100 * r[key]:.0f}%" for key in attributes)])
              for r in rows]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.device.split(':')[0]}_{args.model}_adherence_{date.today().isoformat()}{args.label}"
    stem.with_suffix(".txt").write_text(table + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
