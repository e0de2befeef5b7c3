"""Where batching pays, per model family: denoising-step throughput by batch size, and served images/s.

For each architecture (random weights of the real configs, built on the GPU), two phases, one
model copy on the card at a time (Qwen-Image's 20B transformer and 8B text encoder leave no room
for a second):

1. **Step scaling (offline, this process).** For every size and batch size, the pipeline call is
   timed at two step counts after a warm-up call of that shape; the difference is the cost of the
   extra denoising steps alone (text encoding, latents set-up and VAE decode cancel out):

       seconds per step = (t(steps_hi) - t(steps_lo)) / (steps_hi - steps_lo)

   It reports step throughput (rows x steps / s) and its gain over batch 1, the fixed cost per call,
   and peak allocated GPU memory. This is the number that says at which batch size batching stops
   paying (compute-bound), independent of step count.
2. **Served (tritonserver, dynamic batching).** The same pipeline as a Triton model, closed-loop
   clients at each concurrency (VBench prompts, distinct seeds): images/s, latency, the batches
   Triton formed, GPU memory of the stub. Concurrency 1 is the no-batching baseline: one
   instance runs one execution at a time, so a server without batching serves any concurrency at
   that rate. Gain at c = images/s at c / images/s at 1.

    python perf/family_bench.py --archs z-image-turbo,flux-dev --sizes 512x512,1024x1024
    python perf/family_bench.py --archs wan2.1-t2v-1.3b --sizes 480x832 --frames 17 --concurrency 1,2,4
    python perf/family_bench.py --archs z-image-turbo-tiny --device cpu --sizes 64x64 --batch-sizes 1,2 \\
        --concurrency 1,2 --steps 2 --step-counts 1,2     # CPU check of the script
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

from client import DiffusionClient
from perf.lib import card_name, closed_loop, log, model_parameters, serve, today, write_results
from perf.prompts import vbench_prompts
from triton_diffusion import families, model_config

def family(arch: str) -> tuple[str, float, int]:
    """dtype, guidance and served steps of ``arch`` (its family declares them)."""
    architecture = families.architecture(arch)[1]
    return architecture.dtype, architecture.guidance, architecture.steps


def is_video(arch: str) -> bool:
    return families.architecture(arch)[0].video


def parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    return int(height), int(width or height)


def settings_parameters(arch: str, args, size: tuple[int, int], biggest: int) -> dict[str, str]:
    return model_parameters(arch, args.device, size, args.steps, biggest, args.frames if is_video(arch) else 0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def step_scaling(arch: str, args, prompts) -> list[dict]:
    """Phase 1: seconds per denoising step by size and batch size, in this process."""
    import torch

    from triton_diffusion.pipeline import PipelineRunner, is_out_of_memory
    from triton_diffusion.requests import text_to_image
    from triton_diffusion.settings import ModelSettings

    _, guidance, _ = family(arch)
    frames = args.frames if is_video(arch) else 0
    low, high = args.step_counts
    biggest = max(args.batch_sizes)
    started = time.perf_counter()
    runner = PipelineRunner.load(ModelSettings.from_parameters(settings_parameters(arch, args, args.sizes[0], biggest)))
    log(f"{arch}: built {type(runner.text_to_image).__name__} in {time.perf_counter() - started:.1f}s")
    rows = []
    cuda = args.device.startswith("cuda")
    for size in args.sizes:
        for batch in args.batch_sizes:
            if batch * size[0] * size[1] > args.max_pixels_per_call:
                continue
            def call(steps: int) -> float:
                items = [text_to_image(prompts[i % len(prompts)], i, steps, guidance, size[0], size[1], num_frames=frames)
                         for i in range(batch)]
                _sync(args.device)
                begun = time.perf_counter()
                runner.run(items[0].params, items)
                _sync(args.device)
                return time.perf_counter() - begun
            try:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                call(low)  # warm-up of this shape (kernels, allocator)
                t_low = min(call(low) for _ in range(args.repeats))
                t_high = min(call(high) for _ in range(args.repeats))
            except Exception as exc:  # noqa: BLE001 - OOM ends this size's sweep; anything else is a bug
                if not is_out_of_memory(exc):
                    raise
                log(f"{arch} {size[0]}x{size[1]} batch {batch}: out of memory")
                rows.append({"size": f"{size[0]}x{size[1]}", "batch": batch, "oom": True})
                break
            per_step = (t_high - t_low) / (high - low)
            row = {"size": f"{size[0]}x{size[1]}", "batch": batch, "frames": frames, "seconds_per_step": per_step,
                   "fixed_seconds": t_low - low * per_step, "rows_steps_per_s": batch / per_step,
                   "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
            rows.append(row)
            log(f"{arch} {row['size']} batch {batch}: {per_step * 1000:.1f} ms/step, fixed {row['fixed_seconds']:.2f}s, "
                f"{row['rows_steps_per_s']:.2f} row-steps/s")
            if cuda:
                torch.cuda.empty_cache()
    for row in rows:
        base = next((r for r in rows if r["size"] == row["size"] and r["batch"] == 1 and not r.get("oom")), None)
        if base and not row.get("oom"):
            row["gain_vs_batch_1"] = row["rows_steps_per_s"] / base["rows_steps_per_s"]
    runner = None
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows


def served(arch: str, args, prompts, workdir: Path) -> dict:
    """Phase 2: the same pipeline in tritonserver with dynamic batching, closed-loop clients."""
    size = args.served_size or args.sizes[0]
    biggest = max(args.concurrency)
    name = arch.replace("-", "_").replace(".", "_")
    parameters = {**settings_parameters(arch, args, size, biggest), "max_pixels": None, "torch_num_threads": None,
                  "cancellation_poll_interval_ms": "100"}
    base = families.architecture(arch)[0].test_model if is_video(arch) else model_config.BASE_MODEL
    config = model_config.variant(name, parameters, f"max_queue_delay_microseconds: {args.delay_us}", biggest, base=base)
    started = time.perf_counter()
    server = serve([(config, base)], workdir)
    result = {"size": f"{size[0]}x{size[1]}", "steps": int(parameters["default_steps"]), "ready_s": time.perf_counter() - started,
              "levels": {}}
    try:
        with DiffusionClient(f"grpc://{server.grpc_url}", name, timeout_s=1800) as client:
            for concurrency in args.concurrency:
                closed_loop(client, server, name, concurrency, concurrency, prompts, offset=900_000 + concurrency)  # warm-up
                rounds = [closed_loop(client, server, name, concurrency, max(args.min_requests, args.rounds_per_level * concurrency),
                                      prompts, offset=10_000 * concurrency)]
                level = rounds[0]
                latencies = sorted(level["latencies"])
                result["levels"][concurrency] = {
                    "images_per_s": level["images_per_s"], "failures": level["failures"], "histogram": level["histogram"],
                    "latency_p50_s": latencies[len(latencies) // 2] if latencies else None,
                    "latency_max_s": latencies[-1] if latencies else None, "n": len(latencies),
                    "gpu_mem_mib": level["gpu_mem_mib"],
                }
                log(f"{name} c={concurrency}: {level['images_per_s']:.3f} img/s, batches {level['histogram']}, "
                    f"failures {level['failures']}, stub GPU {level['gpu_mem_mib']} MiB")
    finally:
        server.stop()
    base = result["levels"].get(1)
    for level in result["levels"].values():
        if base and base["images_per_s"]:
            level["gain_vs_c1"] = level["images_per_s"] / base["images_per_s"]
    return result


def summarize(results: list[dict], header: str) -> str:
    lines = [header]
    for result in results:
        lines.append(f"\n== {result['arch']} ({result['dtype']}, guidance {result['guidance']}) ==")
        lines.append("step scaling | size | batch | ms/step | fixed s/call | row-steps/s | gain vs batch 1 | peak GiB")
        for row in result["steps"]:
            if row.get("oom"):
                lines.append(f"  | {row['size']} | {row['batch']} | out of memory")
                continue
            gib = f"{row['peak_allocated_gib']:.1f}" if row["peak_allocated_gib"] is not None else "-"
            lines.append(f"  | {row['size']} | {row['batch']} | {row['seconds_per_step'] * 1000:.1f} | {row['fixed_seconds']:.2f} | "
                         f"{row['rows_steps_per_s']:.2f} | {row.get('gain_vs_batch_1', float('nan')):.2f}x | {gib}")
        if result.get("served"):
            s = result["served"]
            lines.append(f"served {s['size']}, {s['steps']} steps (READY {s['ready_s']:.0f}s) | conc | img/s | gain vs c=1 | "
                         "p50 / max s (n) | batches {size: executions} | stub GPU MiB")
            for concurrency, level in s["levels"].items():
                lines.append(f"  | {concurrency} | {level['images_per_s']:.3f} | {level.get('gain_vs_c1', float('nan')):.2f}x | "
                             f"{level['latency_p50_s']:.2f} / {level['latency_max_s']:.2f} ({level['n']}) | {level['histogram']} | "
                             f"{level['gpu_mem_mib'] or '-'}{' | FAILURES ' + str(level['failures']) if level['failures'] else ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--archs", default="z-image-turbo")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",")], default=[(512, 512), (1024, 1024)])
    parser.add_argument("--served-size", type=parse_size, default=None, help="default: the first of --sizes")
    parser.add_argument("--frames", type=int, default=17, help="video architectures: frames per clip")
    parser.add_argument("--batch-sizes", type=ints, default=[1, 2, 4, 8, 16])
    parser.add_argument("--max-pixels-per-call", type=int, default=16 * 512 * 512, help="skip larger step-scaling calls")
    parser.add_argument("--step-counts", type=ints, default=[2, 6], help="the two step counts timed per shape")
    parser.add_argument("--repeats", type=int, default=1, help="calls per step count (the fastest counts)")
    parser.add_argument("--concurrency", type=ints, default=[1, 4, 8, 16], help="served levels; empty: no served phase")
    parser.add_argument("--rounds-per-level", type=int, default=2, help="measured requests per level = this x concurrency")
    parser.add_argument("--min-requests", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="served steps (default: per family)")
    parser.add_argument("--delay-us", type=int, default=10_000)
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import diffusers
    import torch
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    prompts = vbench_prompts()
    card = card_name()
    header = f"card: {card}, torch {torch.__version__}, eager, {today()}, random weights; command: {' '.join(sys.argv)}"
    stem = f"family_bench_{card.replace(' ', '_')}_{today()}_{args.archs.replace(',', '+')}{'_' + args.tag if args.tag else ''}"
    log(header)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            dtype, guidance, _ = family(arch)
            dtype = dtype if args.device.startswith("cuda") else "float32"
            result = {"arch": arch, "dtype": dtype, "guidance": guidance, "steps": step_scaling(arch, args, prompts)}
            if args.concurrency:
                result["served"] = served(arch, args, prompts, Path(tmp) / arch)
            results.append(result)
            write_results(args.out, stem, {"args": vars(args), "results": results})
            log(summarize([result], arch))
    table = summarize(results, header)
    write_results(args.out, stem, {"args": vars(args), "results": results}, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
