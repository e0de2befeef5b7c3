"""The per-row first-block cache on full-size transformers (random weights): speed and latent drift only.

For each architecture (the real config, random weights, on the GPU) it runs the fidelity guard's
fixed-seed call (``pipeline.latents_probe``: one image at the size, steps and guidance given) without a
cache, then with ``row_cache``'s FirstBlockCache at each threshold (the row opted in, as
``STEP_CACHE=1``), and reports per setting: seconds per image (median of ``--repeats`` after one
warm-up call of the setting), the speed-up, the share of steps that skipped the blocks after the
first, and the relative L2 distance of the final latents from the uncached ones.

Random weights do not denoise, so their residuals do not settle as a trained model's do: the share
of skipped steps at a threshold, and what a skip costs in the image, say nothing about a trained
model's quality (``tiny_shapes_dit``'s table, ``perf/quality_speed.py``, judges that). What carries over
is the time a skipped step saves on the real architecture's cost per step.

    python perf/cache_drift.py --archs flux-dev,z-image-turbo,qwen-image --size 1024 --thresholds 0.6,1.0,1.5,2.5
    python perf/cache_drift.py --docs          # docs/benchmarks.md's table from RESULTS
    python perf/cache_drift.py --check-docs    # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from perf.lib import card_name, log, model_parameters, today, write_results, write_tables

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
RESULTS = "cache_drift_NVIDIA_H200_2026-12-02_flux-dev_z-image-turbo_qwen-image"  # the docs' table (perf/results)


def measure(arch: str, args) -> list[dict]:
    import torch

    from triton_diffusion import families, row_cache
    from triton_diffusion.acceleration import denoiser_of, reset_step_cache
    from triton_diffusion.pipeline import PipelineRunner, latents_probe
    from triton_diffusion.quantization import relative_error
    from triton_diffusion.settings import ModelSettings

    family, architecture = families.architecture(arch)
    settings = ModelSettings.from_parameters(model_parameters(arch, args.device, (args.size, args.size), args.steps))
    started = time.perf_counter()
    runner = PipelineRunner.load(settings)
    log(f"{arch}: loaded in {time.perf_counter() - started:.0f}s")
    pipe = runner.text_to_image
    denoiser = denoiser_of(pipe)
    probe = latents_probe(pipe, settings)

    def timed() -> tuple[float, object]:
        reset_step_cache(pipe)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        began = time.perf_counter()
        latents = probe()  # (synchronises: the latents come back to the host)
        return time.perf_counter() - began, latents

    rows, reference = [], None
    for threshold in [None, *args.thresholds]:
        row_cache.remove(denoiser)
        if threshold is not None:
            row_cache.apply(denoiser, threshold, family.cache_block_arguments)
            row_cache.allow(denoiser, None)
        timed()  # warm-up of this setting
        before = row_cache.skipped_rows(denoiser)
        seconds, latents = [], None
        for _ in range(args.repeats):
            elapsed, latents = timed()
            seconds.append(elapsed)
        skipped = (row_cache.skipped_rows(denoiser) - before) / args.repeats
        if reference is None:
            reference = latents
        passes = 2 if family.guided(settings.defaults.default_guidance_scale) else 1
        # (the first step always runs every block; a guided image has two rows per step)
        skippable = passes * (settings.defaults.default_steps - 1)
        row = {"arch": arch, "setting": "no cache" if threshold is None else f"FirstBlockCache {threshold}",
               "threshold": threshold, "seconds": statistics.median(seconds), "all_seconds": seconds,
               "skipped": skipped / skippable, "relative_error": relative_error(reference, latents)}
        row["speed_up"] = rows[0]["seconds"] / row["seconds"] if rows else 1.0
        log(f"  {row['setting']}: {row['seconds']:.3f}s ({row['speed_up']:.2f}x), skipped {row['skipped']:.0%}, "
            f"latents {row['relative_error']:.2%} from uncached")
        rows.append(row)
    runner_summary = {"arch": arch, "steps": settings.defaults.default_steps, "guidance": settings.defaults.default_guidance_scale,
                      "dtype": settings.load.torch_dtype}
    for row in rows:
        row.update(runner_summary)
    return rows  # (the model goes with this frame)


def write_docs(check: bool) -> int:
    """docs/benchmarks.md's table from RESULTS; with ``check`` only whether it is stale (1)."""
    saved = json.loads((ROOT / "perf" / "results" / f"{RESULTS}.json").read_text())
    generated = table(saved["rows"], saved["card"], saved["args"]["size"]) + (
        f"\n\n(`perf/results/{RESULTS}.*`; {saved['date']}; median of {saved['args']['repeats']} calls after one "
        "warm-up call per setting)")
    return write_tables(DOCS, {"cache_drift": generated}, check, "python perf/cache_drift.py --docs")


def table(rows: list[dict], card: str, size: int) -> str:
    lines = [f"| model ({size}x{size}, random weights, eager; {card}) | setting | s per image | speed-up | steps that skipped "
             "the blocks after the first | final latents from uncached (relative L2) |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['arch']}, {row['steps']} steps, guidance {row['guidance']:g} | {row['setting']} | {row['seconds']:.3f} | "
                     f"{row['speed_up']:.2f}x | {row['skipped']:.0%} | {row['relative_error']:.2%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="flux-dev,z-image-turbo,qwen-image")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=0, help="0: each architecture's")
    parser.add_argument("--thresholds", type=lambda text: [float(part) for part in text.split(",")], default=[0.05, 0.1, 0.2, 0.4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    parser.add_argument("--docs", action="store_true")
    parser.add_argument("--check-docs", action="store_true")
    args = parser.parse_args(argv)
    if args.docs or args.check_docs:
        return write_docs(args.check_docs)
    import torch

    rows = []
    for arch in args.archs.split(","):
        rows += measure(arch, args)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    card = card_name()
    text = (f"perf/cache_drift.py {' '.join(argv if argv is not None else sys.argv[1:])}; torch {torch.__version__}, {today()}\n"
            + table(rows, card, args.size))
    stem = f"cache_drift_{card.replace(' ', '_')}_{today()}_{args.archs.replace(',', '_')}{'_' + args.tag if args.tag else ''}"
    write_results(args.out, stem, {"args": {**vars(args), "out": str(args.out)}, "card": card, "rows": rows}, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
