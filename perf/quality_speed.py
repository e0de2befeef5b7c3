"""What each image-changing knob costs on the trained DiT (``tiny_shapes_dit``), per setting: held-out
adherence per attribute, pixel error (PSNR) against the image of the same caption and seed at the
model's default setting (20 steps, no cache), the share of row-steps at which a step cache skipped
the transformer blocks after the first, and the speed-up, through the served code path (``PipelineRunner``, in batches; every row
opts in to the cache as STEP_CACHE=1 does).

Knobs: fp8 (``quantization: fp8``, on a GPU), the per-row first-block cache (``step_cache:
"FirstBlockCache threshold=..."``, the only step cache that applies to a Z-Image transformer:
diffusers 0.42 gives ZImageTransformer2DModel none of its cache hooks) and fewer steps.

    python perf/quality_speed.py                                             # CPU, the shipped float32
    python perf/quality_speed.py --device cuda --dtype bfloat16 --fp8 ...   # and fp8 (GPU)
    python perf/quality_speed.py --served --seeds 1    # through tritonserver: one model per setting, STEP_CACHE=1
                                                       # requests from closed-loop clients (dynamic batching)
    python perf/quality_speed.py --docs          # docs/tiny-model.md's tables from RESULTS
    python perf/quality_speed.py --check-docs    # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import numpy as np

from perf.adherence import ROOT, WORLDS, load, write_tables
from perf.adherence import generate as adherence_generate
from perf.lib import card_name
from triton_diffusion import model_config, row_cache
from triton_diffusion.acceleration import denoiser_of
from triton_diffusion.pipeline import ModelLoadError
from triton_diffusion.settings import ModelSettings

MODEL = "tiny_shapes_dit"
# docs/tiny-model.md's tables (their marker names) and the results files (perf/results) they come from
RESULTS = {f"quality:{MODEL}": "cpu_tiny_shapes_dit_quality_speed_2026-12-02",
           f"quality:{MODEL}:cuda": "cuda_tiny_shapes_dit_quality_speed_2026-12-02",
           f"quality:{MODEL}:served": "cpu_tiny_shapes_dit_quality_speed_2026-12-02_served"}


def generate(runner, captions, steps: int, guidance: float, batch: int):
    """``adherence.generate`` with every row opted in to the cache: (images, seconds, row-steps that
    skipped the blocks after the first)."""
    denoiser = denoiser_of(runner.text_to_image)
    before = row_cache.skipped_rows(denoiser)
    images, seconds = adherence_generate(runner, captions, steps, guidance, batch, step_cache=True)
    return images, seconds, row_cache.skipped_rows(denoiser) - before


def served_generate(server, model: str, captions, steps: int, guidance: float, clients: int, step_cache: bool):
    """``adherence.generate`` through a running server: the same seeds, one warm-up request, then every
    caption from ``clients`` closed-loop clients (Triton's dynamic batcher forms the batches): (images,
    seconds, row-steps the model's cache skipped)."""
    import time

    from client import DiffusionClient, GenerationRequest
    from testing import harness

    requests = [GenerationRequest(caption, seed=100 + index, steps=steps, guidance_scale=guidance, step_cache=step_cache)
                for index, caption in enumerate(captions)]
    with DiffusionClient(f"grpc://{server.grpc_url}", model, timeout_s=600) as client:
        client.generate(requests[0])
        skipped = harness.metric(server, "diffusion_step_cache_skipped_rows_total", model)
        started = time.perf_counter()
        results = client.generate_many(requests, concurrency=clients)
        seconds = time.perf_counter() - started
    failed = [result for result in results if isinstance(result, Exception)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} requests failed, e.g. {failed[0]}")
    return ([result.array for result in results], seconds,
            harness.metric(server, "diffusion_step_cache_skipped_rows_total", model) - skipped)


def serve_settings(settings_list):
    """One served model per distinct set of parameters (variants of the shipped config): (server,
    the model name per setting)."""
    import tempfile

    from perf.lib import serve

    names, configs = [], {}
    for _, _, parameters in settings_list:
        key = json.dumps(parameters, sort_keys=True)
        if key not in configs:
            configs[key] = model_config.variant(f"{MODEL}_{len(configs)}", parameters, base=MODEL)
        names.append(configs[key].name)
    workdir = Path(tempfile.mkdtemp(prefix="quality-served-"))
    return serve([(config, MODEL) for config in configs.values()], workdir), names


def psnr(images, references) -> float:
    """Peak signal-to-noise ratio (dB) of the mean squared error over all images (inf: identical)."""
    error = np.mean([np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2) for a, b in zip(images, references)])
    return float("inf") if error == 0 else float(10 * np.log10(255 ** 2 / error))


def markdown(path: Path) -> str:
    """A results file (``.json``) as the docs' table."""
    results, stem = json.loads(path.read_text()), path.stem
    rows, attributes = results["rows"], results["attributes"]
    lines = [f"| setting | img/s ({results.get('card', 'cpu')}) | speed-up | row-steps that skipped the blocks | "
             + " | ".join(f"{attribute} right" for attribute in attributes) + " | PSNR vs default |",
             "|" + "---|" * (5 + len(attributes))]
    for index, row in enumerate(rows):
        if "error" in row:
            reason = row["error"].removeprefix("config.pbtxt speed parameters: ").split(";")[0]
            lines.append(f"| {row['setting']} | not served: {reason} |" + " |" * (3 + len(attributes)))
            continue
        error = "reference" if index == 0 else "identical" if row["psnr"] == float("inf") else f"{row['psnr']:.1f} dB"
        lines.append(f"| {row['setting']} | {row['images_per_s']:.2f} | {row['speed_up']:.2f}x | {100 * row['skipped']:.0f}% | "
                     + " | ".join(f"{100 * row[key]:.0f}%" for key in attributes) + f" | {error} |")
    served = (f"; through tritonserver, one model per setting, {results['args']['batch']} closed-loop clients"
              if results["args"].get("served") == "True" else "")
    return "\n".join(lines) + (f"\n\n(`perf/results/{stem}.*`: {rows[0]['images']} images per row, "
                               f"{results['captions']} held-out captions x {results['seeds']} seeds, guidance {results['guidance']}"
                               f"{served})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--thresholds", default="0.05,0.1,0.2,0.3", help="FirstBlockCache thresholds (at the default steps)")
    parser.add_argument("--steps", default="10,5", help="fewer steps than the default (no cache)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--captions", type=int, default=0, help="the first N held-out captions (0: all)")
    parser.add_argument("--dtype", help="torch_dtype instead of the shipped float32 (e.g. bfloat16 on a GPU)")
    parser.add_argument("--fp8", action="store_true", help="add a row with quantization: fp8 (a GPU with fp8)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    parser.add_argument("--served", action="store_true",
                        help="through tritonserver (CPU), --batch closed-loop clients per setting, instead of the runner")
    parser.add_argument("--docs", action="store_true")
    parser.add_argument("--check-docs", action="store_true")
    args = parser.parse_args(argv)
    if args.docs or args.check_docs:
        tables = {name: markdown(ROOT / "perf" / "results" / f"{stem}.json") for name, stem in RESULTS.items()}
        return write_tables(tables, args.check_docs, "python perf/quality_speed.py --docs")

    held_out, adherence = WORLDS[MODEL]
    chosen = held_out()[:args.captions] if args.captions else held_out()
    captions = [caption for caption in chosen for _ in range(args.seeds)]
    # (the shipped config's own step cache off: the reference and fewer-steps rows are exact)
    base = {**({"torch_dtype": args.dtype} if args.dtype else {}), "step_cache": ""}
    knobs = {**base, "speed_devices": args.device}
    settings = ModelSettings.from_parameters(model_config.parameters(model_config.shipped(MODEL)))
    runner = None if args.served else load(MODEL, args.device, **base)[0]  # (served: the server loads its own)
    default_steps, guidance = settings.defaults.default_steps, settings.defaults.default_guidance_scale
    # (setting, steps, the model's parameters changed from its shipped config)
    settings_list = [(f"{default_steps} steps (default)", default_steps, None)]
    settings_list += [(f"{default_steps} steps, FirstBlockCache {threshold}", default_steps,
                       {**knobs, "step_cache": f"FirstBlockCache threshold={threshold}"})
                      for threshold in args.thresholds.split(",") if threshold]
    if args.fp8:
        settings_list.append((f"{default_steps} steps, fp8", default_steps, {**knobs, "quantization": "fp8"}))
    settings_list += [(f"{steps} steps", int(steps), base) for steps in args.steps.split(",") if steps]
    if args.served:
        settings_list = [(name, steps, base if parameters is None else parameters)
                         for name, steps, parameters in settings_list]
        server, served_names = serve_settings(settings_list)
    rows, reference, reference_seconds = [], None, None
    for index, (name, steps, parameters) in enumerate(settings_list):
        if args.served:
            images, seconds, skipped = served_generate(server, served_names[index], captions, steps, guidance, args.batch,
                                                       bool(parameters.get("step_cache")))
        else:
            if parameters is not None:
                try:
                    runner, _ = load(MODEL, args.device, **parameters)
                except ModelLoadError as exc:  # e.g. fp8 failing its fidelity guard: a row that says why
                    rows.append({"setting": name, "steps": steps, "parameters": parameters, "error": str(exc)})
                    print(rows[-1], flush=True)
                    continue
            images, seconds, skipped = generate(runner, captions, steps, guidance, args.batch)
        if reference is None:
            reference, reference_seconds = images, seconds
        # row-steps: each image's two rows (guidance) at every step
        rows.append({"setting": name, "steps": steps, "parameters": parameters or base, "images": len(images),
                     "images_per_s": len(images) / seconds, "speed_up": reference_seconds / seconds,
                     "skipped": skipped / (len(images) * 2 * steps),
                     **adherence(captions, images), "psnr": psnr(images, reference),
                     "applied": f"served as {served_names[index]}" if args.served else list(runner.speed)})
        print(rows[-1], flush=True)
    if args.served:
        server.stop()
    attributes = [key for key in rows[0] if key not in ("setting", "steps", "parameters", "images", "images_per_s",
                                                        "speed_up", "skipped", "psnr", "applied")]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.device.split(':')[0]}_{MODEL}_quality_speed_{date.today().isoformat()}{args.label}"
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "card": card_name() if args.device != "cpu" else "cpu",
              "captions": len(chosen), "seeds": args.seeds,
              "guidance": guidance, "attributes": attributes, "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".txt").write_text(markdown(stem.with_suffix(".json")) + "\n")
    print(stem.with_suffix(".txt").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
