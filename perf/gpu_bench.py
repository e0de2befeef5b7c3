"""GPU benchmark: offline diffusers pipeline vs the Triton-served model, without and with dynamic batching.

One run measures, per architecture (random weights of the real configs, built on the GPU):
  1. the bare pipeline (``PipelineRunner.run``, the physical limit of this stack) at batch 1..16;
  2. tritonserver serving the same pipeline with no batching and with dynamic batching, at
     client concurrency 1..16 (the project's client, VBench prompts, distinct seeds);
and prints one table: images/s, p50/p99 latency, realized batch sizes, batching gain (dynamic /
none at the same concurrency), server tax (served execution time / offline time at the same
batch), and GPU memory. Results go to ``--out`` as JSON (plot them with ``perf/plot_gpu.py``).

    python perf/gpu_bench.py --archs sd15,flux-dev --out perf/results
    python perf/gpu_bench.py --archs sd15-tiny --device cpu --size 128 --steps 4   # CPU check
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client import DiffusionClient, GenerationRequest  # noqa: E402
from client.cli import percentile  # noqa: E402
from perf.prompts import vbench_prompts  # noqa: E402
from perf.variants import render_config, write_variant  # noqa: E402
from triton_diffusion.launcher import ServerConfig, TritonServer, free_port, model_statistics  # noqa: E402

DTYPES = {"sd15": "float16", "flux-dev": "bfloat16"}
GUIDANCE = {"sd15": 7.5, "flux-dev": 3.5}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def card_name() -> str:
    try:
        return subprocess.check_output(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], text=True).splitlines()[0].strip()
    except (OSError, subprocess.CalledProcessError):
        return "cpu"


class GpuMemoryPoller:
    """Peak device memory in use (all processes, MiB), sampled by nvidia-smi while a phase runs."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.check_output(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], text=True)
                self.peak = max(self.peak, int(out.split()[0]))
            except (OSError, subprocess.CalledProcessError, ValueError):
                return
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def items_for(prompts, count, args, arch, offset=0):
    from triton_diffusion.requests import GenerationItem

    return [
        GenerationItem(prompts[(offset + i) % len(prompts)], None, offset + i, args.steps, GUIDANCE.get(arch.removesuffix("-tiny"), 3.5), args.size, args.size)
        for i in range(count)
    ]


def offline(arch: str, args, prompts) -> list[dict]:
    """The bare pipeline at each batch size: median of ``--repeats`` calls after one warm-up call."""
    import torch

    from triton_diffusion.pipeline import PipelineRunner
    from triton_diffusion.settings import ModelSettings

    settings = ModelSettings(pretrained_model=f"random:{arch}", device=args.device, torch_dtype=dtype_for(arch, args))
    started = time.perf_counter()
    runner = PipelineRunner.load(settings)
    log(f"{arch}: built random-weight {type(runner.text_to_image).__name__} in {time.perf_counter() - started:.1f}s")
    rows = []
    cuda = args.device.startswith("cuda")
    for batch in args.batch_sizes:
        items = items_for(prompts, batch, args, arch)
        runner.run(items)  # warm-up at this shape
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for repeat in range(args.repeats):
            started = time.perf_counter()
            runner.run(items_for(prompts, batch, args, arch, offset=1000 * (repeat + 1)))
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        row = {"arch": arch, "batch": batch, "seconds": seconds, "images_per_s": batch / seconds,
               "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        rows.append(row)
        log(f"{arch} offline batch {batch}: {seconds:.3f}s/call, {row['images_per_s']:.2f} img/s")
    del runner
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows


def dtype_for(arch: str, args) -> str:
    return "float32" if not args.device.startswith("cuda") else DTYPES.get(arch.removesuffix("-tiny"), "float16")


def stats(server, model):
    data = model_statistics(server.http_url, model)
    return {b["batch_size"]: (b["compute_infer"]["count"], b["compute_infer"]["ns"]) for b in data["batch_stats"]}


def batching_modes(args) -> dict:
    """Server configurations compared: the ``dynamic_batching`` body, or None for no batching."""
    return {
        "none": None,
        "dynamic": f"max_queue_delay_microseconds: {args.delay_us}",
        # Wait (up to 100 ms) for a full batch of 16: merges the two cohorts of 8 that form at
        # concurrency 16 when a short delay starts each batch as soon as the instance is free.
        "dynamic-p16": "preferred_batch_size: [ 16 ] max_queue_delay_microseconds: 100000",
    }


def served(arch: str, mode: str, args, prompts, workdir: Path) -> list[dict]:
    """Serve ``arch`` (``mode`` none|dynamic) and sweep client concurrency."""
    name = f"{arch}_{mode}".replace("-", "_")
    parameters = {
        "pretrained_model": f"random:{arch}", "device": args.device, "torch_dtype": dtype_for(arch, args),
        "default_height": str(args.size), "default_width": str(args.size), "default_steps": str(args.steps),
        "default_guidance_scale": str(GUIDANCE.get(arch.removesuffix("-tiny"), 3.5)),
        "min_side": "64", "max_side": "2048", "max_pixels": str(2048 * 2048),
        "max_images_per_call": "16", "max_pixels_per_call": str(16 * args.size * args.size),
    }
    batching = batching_modes(args)[mode]
    repository = workdir / f"repo_{name}"
    write_variant(repository, name, render_config(name, parameters, batching))
    config = ServerConfig(model_repository=repository, models=[name], http_port=free_port(),
                          grpc_port=free_port(), metrics_port=free_port())
    rows = []
    with TritonServer(config, log_path=workdir / f"{name}.log") as server, GpuMemoryPoller() as memory:
        started = time.perf_counter()
        state = server.wait_ready(timeout=600)[name]
        if state["state"] != "READY":
            raise RuntimeError(f"{name} did not load: {state.get('reason')}")
        log(f"{name}: READY in {time.perf_counter() - started:.1f}s")
        url = f"grpc://{server.grpc_url}"
        with DiffusionClient(url, name, timeout_s=600) as client:
            warm = [GenerationRequest(prompts[i], seed=i) for i in range(max(args.concurrency))]
            client.generate_many(warm, concurrency=max(args.concurrency))  # warm-up at the largest batch
            for concurrency in args.concurrency:
                count = max(args.min_requests, args.requests_per_level * concurrency)
                requests = [GenerationRequest(prompts[(7 * i) % len(prompts)], seed=10_000 + i) for i in range(count)]
                before = stats(server, name)
                started = time.perf_counter()
                results = client.generate_many(requests, concurrency=concurrency)
                wall = time.perf_counter() - started
                after = stats(server, name)
                failures = [r for r in results if isinstance(r, Exception)]
                latencies = [r.seconds for r in results if not isinstance(r, Exception)]
                executions = {b: (after[b][0] - before.get(b, (0, 0))[0], after[b][1] - before.get(b, (0, 0))[1]) for b in after}
                executions = {b: v for b, v in executions.items() if v[0] > 0}
                total_exec = sum(c for c, _ in executions.values())
                row = {
                    "arch": arch, "mode": mode, "concurrency": concurrency, "requests": count, "failures": len(failures),
                    "images_per_s": (count - len(failures)) / wall, "p50_s": percentile(latencies, 50),
                    "p99_s": percentile(latencies, 99), "executions": total_exec,
                    "mean_batch": sum(b * c for b, (c, _) in executions.items()) / max(1, total_exec),
                    "exec_seconds_by_batch": {b: ns / c / 1e9 for b, (c, ns) in executions.items()},
                    "gpu_mem_peak_mib": memory.peak or None,
                }
                rows.append(row)
                log(f"{name} c={concurrency}: {row['images_per_s']:.2f} img/s, p50 {row['p50_s']:.2f}s, p99 {row['p99_s']:.2f}s, "
                    f"mean batch {row['mean_batch']:.1f}, failures {len(failures)}")
    return rows


def summarize(offline_rows, served_rows) -> str:
    lines = []
    off = {(r["arch"], r["batch"]): r for r in offline_rows}
    for arch in sorted({r["arch"] for r in offline_rows} | {r["arch"] for r in served_rows}):
        lines.append(f"\n== {arch} ==")
        lines.append("offline pipeline: batch | s/call | img/s | peak mem GiB")
        for r in [r for r in offline_rows if r["arch"] == arch]:
            mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] else "-"
            lines.append(f"  {r['batch']:>3} | {r['seconds']:.3f} | {r['images_per_s']:.2f} | {mem}")
        none = {r["concurrency"]: r for r in served_rows if r["arch"] == arch and r["mode"] == "none"}
        lines.append("served: mode | conc | img/s | p50 s | p99 s | mean batch | gain vs none | server tax (batch: served/offline) | GPU MiB")
        for r in [r for r in served_rows if r["arch"] == arch]:
            gain = r["images_per_s"] / none[r["concurrency"]]["images_per_s"] if r["concurrency"] in none else None
            taxes = []
            for batch, seconds in sorted(r["exec_seconds_by_batch"].items(), key=lambda kv: int(kv[0])):
                if (arch, int(batch)) in off:
                    taxes.append(f"{batch}:{seconds / off[(arch, int(batch))]['seconds']:.2f}")
            lines.append(
                f"  {r['mode']:>11} | {r['concurrency']:>3} | {r['images_per_s']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
                f"{r['mean_batch']:.1f} | {f'{gain:.2f}x' if gain else '-'} | {' '.join(taxes) or '-'} | {r['gpu_mem_peak_mib'] or '-'}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--archs", default="sd15,flux-dev")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-sizes", type=ints, default=[1, 2, 4, 8, 16])
    parser.add_argument("--concurrency", type=ints, default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests-per-level", type=int, default=3)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--delay-us", type=int, default=10_000)
    parser.add_argument("--modes", default="none,dynamic")
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # long VBench prompts: one truncation warning per call
    transformers.utils.logging.set_verbosity_error()
    prompts = vbench_prompts()
    card = card_name()
    stem = f"gpu_bench_{card.replace(' ', '_')}_{date.today().isoformat()}"
    result = {"card": card, "date": date.today().isoformat(), "args": {k: str(v) for k, v in vars(args).items()},
              "offline": [], "served": []}
    log(f"card: {card}")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            if not args.skip_offline:
                result["offline"] += offline(arch, args, prompts)
                (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
            for mode in args.modes.split(","):
                result["served"] += served(arch, mode, args, prompts, Path(tmp))
                (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    table = f"card: {card}, {args.size}x{args.size}, {args.steps} steps\n" + summarize(result["offline"], result["served"])
    (args.out / f"{stem}.txt").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
