"""One request on several GPUs, served: c=1 latency of ``parallel`` configs against one GPU, and what each
costs in throughput per GPU at ``--concurrency`` against data parallel (one instance per GPU, which
serves the one-GPU rate per GPU: docs/benchmarks.md, data-parallel scaling).

Each config in ``--configs`` (``none``: one GPU; ``cfg=2``, ``ulysses=2``, ``ulysses=4``, ...) is served
alone (random weights of the real architecture, the family's compiled knobs unless ``--speed eager``)
by a fresh tritonserver; after READY one unmeasured request, then ``--requests`` requests one at a
time (VBench prompts, distinct seeds), then, with ``--concurrency``, a closed loop of that many clients.

    python -m perf.parallel_bench --arch flux-dev --size 1024 --steps 28 --configs none,ulysses=2,ulysses=4
    python -m perf.parallel_bench --arch qwen-image --size 1024 --steps 20 --configs none,cfg=2 --set batched_cfg=true
    python -m perf.parallel_bench --arch flux-dev-tiny --device cpu --size 64 --steps 2 --speed eager --configs none,cfg=2,ulysses=2 --requests 3 --concurrency 4   # CPU check
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from client import DiffusionClient
from perf.gpu_bench import speed_parameters
from perf.lib import card_name, closed_loop, log, model_parameters, serve, today, write_results
from perf.prompts import vbench_prompts
from testing import harness
from triton_diffusion import model_config
from triton_diffusion.parallel import ParallelPlan


def table(result: dict) -> str:
    one = result["configs"]["none"]["c1"]["p50"] if "none" in result["configs"] else None
    lines = [f"One request on several devices: {result['arch']} {result['size']}x{result['size']}, {result['steps']} steps, "
             f"{result['speed']}; {result['card']}, {result['date']}", "",
             f"| parallel | devices | c=1 p50 s | vs one device | c={result['concurrency']} img/s | img/s per device | "
             "batches formed | READY s |", "|---|---|---|---|---|---|---|---|"]
    for config, measured in result["configs"].items():
        loaded = measured.get("loaded")
        if loaded is None:
            lines.append(f"| {config} | {measured['devices']} | did not load: {measured['error']} | | | | | |")
            continue
        c1, loop = measured["c1"], measured.get("loop")
        ratio = f"{c1['p50'] / one:.2f}x" if one else "-"
        rate = f"{loop['images_per_s']:.3f}" if loop else "-"
        per_device = f"{loop['images_per_s'] / measured['devices']:.3f}" if loop else "-"
        batches = ", ".join(f"{b}x{n}" for b, n in sorted(loop["histogram"].items(), key=lambda kv: -int(kv[0]))) if loop else "-"
        lines.append(f"| {config} | {measured['devices']} | {c1['p50']:.3f} | {ratio} | {rate} | {per_device} | {batches} | "
                     f"{loaded:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="flux-dev")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--configs", default="none,ulysses=2")
    parser.add_argument("--requests", type=int, default=3, help="c=1 requests per config (after one unmeasured)")
    parser.add_argument("--concurrency", type=int, default=0, help="then a closed loop of this many clients (0: none)")
    parser.add_argument("--speed", choices=("eager", "compiled"), default="compiled")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config.pbtxt parameters")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    args.set = dict(item.split("=", 1) for item in args.set)
    prompts = vbench_prompts()
    c = max(1, args.concurrency)
    bench = SimpleNamespace(speed=args.speed, device=args.device, compile_mode="", step_cache="", set=args.set, warm_up=True,
                            batch_sizes=[1], concurrency=[c], max_batch=c, poll_interval_ms=100)
    base = {**model_parameters(args.arch, args.device, (args.size, args.size), args.steps, c), "max_pixels": None,
            **speed_parameters(args.arch, bench)}
    batching = f"preferred_batch_size: [ {c} ] max_queue_delay_microseconds: 20000"
    workdir = Path(tempfile.mkdtemp(prefix="parallel_bench_"))
    configs = {}
    for index, config in enumerate(args.configs.split(",")):
        parallel = "" if config == "none" else config
        devices = ParallelPlan.parse(parallel).world
        name = f"parallel_{index}"
        model = model_config.variant(name, {**base, "parallel": parallel}, batching, max_batch_size=c, base=model_config.BASE_MODEL)
        started = time.perf_counter()
        try:
            server = serve([(model, model_config.BASE_MODEL)], workdir / name, ready_timeout=1500)
        except Exception as exc:  # noqa: BLE001 - a config that does not load is a row saying why
            configs[config] = {"devices": devices, "error": str(exc)[:300]}
            log(f"{config}: did not load: {exc}")
            continue
        loaded = time.perf_counter() - started
        try:
            with DiffusionClient(f"grpc://{server.grpc_url}", name, timeout_s=1800) as client:
                closed_loop(client, server, name, 1, 1, prompts, offset=900_000)  # (unmeasured)
                one = closed_loop(client, server, name, 1, args.requests, prompts, offset=10_000 * (index + 1))
                loop = closed_loop(client, server, name, c, 2 * c, prompts, offset=10_000 * (index + 1) + 5_000) if args.concurrency else None
            compilations = harness.metric(server, "diffusion_compilations_while_serving_total", name)
        finally:
            server.stop()
        latencies = one["latencies"]
        configs[config] = {"devices": devices, "loaded": loaded, "compilations_while_serving": compilations,
                           "c1": {"p50": statistics.median(latencies), "min": min(latencies), "max": max(latencies),
                                  "latencies": latencies}, "loop": loop}
        log(f"{config}: c=1 p50 {statistics.median(latencies):.3f} s" + (f", c={c} {loop['images_per_s']:.3f} img/s" if loop else ""))
    result = {"arch": args.arch, "size": args.size, "steps": args.steps, "speed": args.speed, "concurrency": c,
              "parameters": base, "configs": configs, "card": card_name(), "date": today()}
    text = table(result)
    print(text)
    write_results(args.out, f"parallel_bench_{card_name().replace(' ', '_')}_{today()}_{args.arch}_{args.size}", result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
