"""Scale-out on one host: one model instance per GPU (Triton's ``instance_group { kind: KIND_GPU }``).

Per architecture (random weights of the real configs) and per layout, one tritonserver serves the
model with dynamic batching and closed-loop clients keep every instance busy (``--per-gpu``
requests in flight per instance). It reports images/s, latency p50/p99, the batches Triton formed,
how the executions spread over the instances (``diffusion_pipeline_calls_total`` per
``instance`` label) and scaling efficiency = N-GPU images/s / (N x 1-GPU images/s).

Layouts: ``1`` (one instance on GPU 0), ``2`` (one on each of GPUs 0 and 1), ``4``; ``1x2`` (two
instances on GPU 0: does overlapping two executions on one card pay?).

    python perf/scale_bench.py --archs sd15,flux-dev --layouts 1,2
    python perf/scale_bench.py --archs flux-dev --layouts 1,1x2 --per-gpu 8
    python perf/scale_bench.py --archs sd15-tiny --device cpu --layouts 1,2 --per-gpu 2 --steps 2 --size 64  # CPU check
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from datetime import date
from pathlib import Path


from client import DiffusionClient
from client.cli import percentile
from perf.gpu_bench import base_parameters
from perf.lib import ProcessMemory, card_name, closed_loop, log, serve, stub_pids
from perf.prompts import vbench_prompts
from testing import harness
from triton_diffusion import model_config


def parse_layout(text: str) -> tuple[int, int]:
    """``"2"`` -> (2 GPUs, 1 instance each); ``"1x2"`` -> (1 GPU, 2 instances)."""
    gpus, _, per_gpu = text.partition("x")
    return int(gpus), int(per_gpu or 1)


def instance_calls(server, name: str) -> dict[str, float]:
    """Pipeline calls so far per instance label."""
    calls: dict[str, float] = {}
    for line in harness.metrics_text(server).splitlines():
        match = re.match(r'diffusion_pipeline_calls_total\{([^}]*)\} (\S+)', line)
        if match and f'model="{name}"' in match.group(1):
            instance = re.search(r'instance="([^"]*)"', match.group(1))
            device = re.search(r'device="([^"]*)"', match.group(1))
            key = f"{instance.group(1) if instance else '?'}@{device.group(1) if device else '?'}"
            calls[key] = calls.get(key, 0.0) + float(match.group(2))
    return calls


def serve_layout(arch: str, layout: str, args, workdir: Path):
    gpus, per_gpu = parse_layout(layout)
    per_instance = args.per_gpu
    name = f"{arch}_{layout}".replace("-", "_")
    # device auto: each KIND_GPU instance runs on the GPU Triton assigns it
    parameters = {**base_parameters(arch, args, per_instance), "device": "auto", "max_pixels": None}
    config = model_config.variant(name, parameters, f"preferred_batch_size: [ {per_instance} ] "
                                  f"max_queue_delay_microseconds: {args.delay_us}", per_instance)
    del config.instance_group[:]
    group = config.instance_group.add()
    group.count = per_gpu
    if args.device.startswith("cuda"):
        group.kind = group.KIND_GPU
        group.gpus.extend(range(gpus))
    else:  # CPU check: the same number of instances
        group.kind = group.KIND_CPU
        group.count = gpus * per_gpu
    server = serve([(config, model_config.BASE_MODEL)], workdir)
    log(f"{name}: {gpus} GPU(s) x {per_gpu} instance(s)")
    return server, name, gpus * per_gpu


def bench(arch: str, layout: str, args, prompts, workdir: Path) -> dict:
    server, name, instances = serve_layout(arch, layout, args, workdir)
    concurrency = instances * args.per_gpu
    try:
        with DiffusionClient(f"grpc://{server.grpc_url}", name, timeout_s=1800) as client:
            closed_loop(client, server, name, concurrency, 2 * concurrency, prompts, offset=900_000)  # warm-up: every instance
            calls_before = instance_calls(server, name)
            with ProcessMemory(stub_pids(server)) as memory:
                level = closed_loop(client, server, name, concurrency, args.rounds * concurrency, prompts, offset=10_000)
            calls = {k: v - calls_before.get(k, 0.0) for k, v in instance_calls(server, name).items()}
    finally:
        server.stop()
    latencies = level["latencies"]
    result = {"arch": arch, "layout": layout, "instances": instances, "concurrency": concurrency,
              "images_per_s": level["images_per_s"], "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
              "n": len(latencies),
              "failures": level["failures"], "histogram": level["histogram"], "calls_per_instance": calls,
              "gpu_mem_mib_all_stubs": memory.peak_mib}
    log(f"{name}: {result['images_per_s']:.3f} img/s at c={concurrency}, p50 {result['p50_s']:.2f}s p99 {result['p99_s']:.2f}s, "
        f"batches {level['histogram']}, calls per instance {calls}")
    return result


def summarize(results: list[dict], header: str) -> str:
    lines = [header, "arch | layout (GPUs x instances) | conc | img/s | scaling efficiency | p50 / p99 s (n) | batches | "
             "pipeline calls per instance | GPU MiB (all stubs)"]
    for result in results:
        base = next((r for r in results if r["arch"] == result["arch"] and r["layout"] == "1"), None)
        gpus = parse_layout(result["layout"])[0]
        efficiency = f"{result['images_per_s'] / (gpus * base['images_per_s']):.2f}" if base else "-"
        calls = ", ".join(f"{k}: {v:.0f}" for k, v in sorted(result["calls_per_instance"].items()))
        lines.append(f"{result['arch']} | {result['layout']} | {result['concurrency']} | {result['images_per_s']:.3f} | {efficiency} | "
                     f"{result['p50_s']:.2f} / {result['p99_s']:.2f} ({result['n']}) | {result['histogram']} | {calls} | "
                     f"{result['gpu_mem_mib_all_stubs'] or '-'}{' | FAILURES ' + str(result['failures']) if result['failures'] else ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="sd15")
    parser.add_argument("--layouts", default="1,2")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a check with KIND_CPU instances")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--per-gpu", type=int, default=16, help="requests in flight per instance (and its batch size)")
    parser.add_argument("--rounds", type=int, default=3, help="measured requests = this x concurrency")
    parser.add_argument("--delay-us", type=int, default=100_000)
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    card = card_name()
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    header = (f"card: {gpus} x {card}, torch {torch.__version__}, eager, {args.size}x{args.size}, {args.steps} steps, "
              f"{args.per_gpu} in flight per instance, {date.today().isoformat()}; command: {' '.join(sys.argv)}")
    stem = f"scale_bench_{card.replace(' ', '_')}_{date.today().isoformat()}_{args.archs.replace(',', '+')}{'_' + args.tag if args.tag else ''}"
    log(header)
    results = []
    prompts = vbench_prompts()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            for layout in args.layouts.split(","):
                results.append(bench(arch, layout, args, prompts, Path(tmp) / f"{arch}-{layout}"))
                (args.out / f"{stem}.json").write_text(json.dumps({"card": card, "gpus": gpus, "results": results}, indent=1))
    table = summarize(results, header)
    (args.out / f"{stem}.txt").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
