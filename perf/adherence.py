"""Prompt adherence of the trained tiny model (``tiny_shapes``) next to its speed, per setting.

For each number of denoising steps (the knob that trades quality for speed on this model), it
generates every held-out caption (combinations never rendered for training, ``shapes.HELD_OUT``)
with several seeds through ``PipelineRunner`` (the served code path, in batches), judges each
image's colour, shape and background from its pixels (``shapes.judge``) and times the calls.

    python perf/adherence.py --steps 20,10,5 --seeds 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path


from triton_diffusion.pipeline import PipelineRunner
from triton_diffusion.requests import text_to_image
from triton_diffusion.settings import ModelSettings, resolve_model_location
from testing.shapes import HELD_OUT, SIZE, Scene, adherence

MODEL = "{repo}/models/tiny-shapes"


def measure(runner: PipelineRunner, steps: int, seeds: int, guidance: float, batch: int) -> dict:
    captions = [Scene(*scene).caption for scene in HELD_OUT for _ in range(seeds)]
    items = [text_to_image(caption, 100 + index, steps, guidance, SIZE, SIZE) for index, caption in enumerate(captions)]
    images, started = [], time.perf_counter()
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        images += runner.run(chunk[0].params, chunk)
    seconds = time.perf_counter() - started
    return {"steps": steps, "images": len(images), "images_per_s": len(images) / seconds, **adherence(captions, images)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--steps", default="20,10,5")
    parser.add_argument("--seeds", type=int, default=8, help="images per held-out caption")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    runner = PipelineRunner.load(ModelSettings.build(pretrained_model=resolve_model_location(args.model), device="cpu",
                                               torch_dtype="float32", default_height=SIZE, default_width=SIZE))
    runner.run(*(lambda item: (item.params, [item]))(text_to_image("a red circle on a blue background", 0, 2, args.guidance, SIZE, SIZE)))
    rows = [measure(runner, int(steps), args.seeds, args.guidance, args.batch) for steps in args.steps.split(",")]
    lines = [f"tiny_shapes prompt adherence on {len(HELD_OUT)} held-out captions x {args.seeds} seeds, guidance {args.guidance}, "
             f"CPU, batches of {args.batch}, {date.today().isoformat()}",
             "steps | img/s | colour | shape | background"]
    lines += [f"{r['steps']} | {r['images_per_s']:.1f} | {100 * r['colour']:.0f}% | {100 * r['shape']:.0f}% | {100 * r['background']:.0f}%"
              for r in rows]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"cpu_tiny_shapes_adherence_{date.today().isoformat()}"
    stem.with_suffix(".txt").write_text(table + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
