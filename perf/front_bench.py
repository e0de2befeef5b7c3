"""What the front model costs: the same requests sent to ``<model>`` and to ``<model>_any``.

One tritonserver serves the batched model and its front (``triton_diffusion/front.py``); closed-loop
clients send the same VBench prompts and seeds to each, alternating direct and front rounds so
that drift hits both alike. Reports images/s and latency per concurrency level (median of the
repeats) and the front's cost = 1 - front images/s / direct images/s.

    python perf/front_bench.py --arch sd15 --concurrency 1,16 --repeats 3
    python perf/front_bench.py --arch sd15-tiny --device cpu --size 64 --steps 2 --concurrency 1,2 --repeats 1  # CPU check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path


from client import DiffusionClient
from perf.gpu_bench import base_parameters
from perf.lib import card_name, closed_loop, log
from perf.prompts import vbench_prompts
from testing import harness
from triton_diffusion import model_config
from triton_diffusion.front import write_front


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--concurrency", type=ints, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests-per-level", type=int, default=3)
    parser.add_argument("--min-requests", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    card = card_name()
    biggest = max(args.concurrency)
    core = args.arch.replace("-", "_")
    parameters = {**base_parameters(args.arch, args, biggest), "max_pixels": None}
    prompts = vbench_prompts()
    results: dict[str, dict[int, list[dict]]] = {"direct": {}, "front": {}}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        model_config.write_model(repo, model_config.variant(core, parameters, "max_queue_delay_microseconds: 10000", biggest))
        front = write_front(repo, core)
        server = harness.serve([core, front], repo, log_path=Path(tmp) / "server.log", ready_timeout=900)
        try:
            clients = {"direct": DiffusionClient(f"grpc://{server.grpc_url}", core, timeout_s=1800),
                       "front": DiffusionClient(f"grpc://{server.grpc_url}", front, timeout_s=1800)}
            for path, client in clients.items():  # warm-up: every level once on each path
                for concurrency in args.concurrency:
                    closed_loop(client, server, core, concurrency, concurrency, prompts, offset=900_000)
            for repeat in range(args.repeats):
                for concurrency in args.concurrency:
                    count = max(args.min_requests, args.requests_per_level * concurrency)
                    for path in ("direct", "front") if repeat % 2 == 0 else ("front", "direct"):
                        # the same prompts and seeds on both paths; batches are counted on the batched model
                        level = closed_loop(clients[path], server, core, concurrency, count, prompts, offset=10_000 * (repeat + 1))
                        results[path].setdefault(concurrency, []).append(level)
                        log(f"{path} r{repeat + 1} c={concurrency}: {level['images_per_s']:.3f} img/s, batches {level['histogram']}")
            for client in clients.values():
                client.close()
        finally:
            server.stop()
    header = (f"card: {card}, {args.arch} eager, {args.size}x{args.size}, {args.steps} steps, {args.repeats} repeats "
              f"(direct and front alternating), {date.today().isoformat()}; command: {' '.join(sys.argv)}")
    lines = [header, "conc | direct img/s median (min-max) | front img/s median (min-max) | front cost | "
             "direct p50 s | front p50 s | batches (direct / front)"]
    summary = {}
    for concurrency in args.concurrency:
        row = {}
        for path in ("direct", "front"):
            rounds = results[path][concurrency]
            rates = [r["images_per_s"] for r in rounds]
            latencies = sorted(x for r in rounds for x in r["latencies"])
            histogram: dict[int, int] = {}
            for r in rounds:
                for size, n in r["histogram"].items():
                    histogram[size] = histogram.get(size, 0) + n
            row[path] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
                         "p50_s": latencies[len(latencies) // 2], "histogram": histogram,
                         "failures": sum(r["failures"] for r in rounds)}
        row["cost"] = 1 - row["front"]["median"] / row["direct"]["median"]
        summary[concurrency] = row
        d, f = row["direct"], row["front"]
        lines.append(f"{concurrency} | {d['median']:.3f} ({d['min']:.3f}-{d['max']:.3f}) | {f['median']:.3f} ({f['min']:.3f}-{f['max']:.3f}) | "
                     f"{100 * row['cost']:+.1f}% | {d['p50_s']:.2f} | {f['p50_s']:.2f} | {d['histogram']} / {f['histogram']}"
                     f"{' | FAILURES' if d['failures'] or f['failures'] else ''}")
    stem = args.out / f"front_bench_{card.replace(' ', '_')}_{date.today().isoformat()}_{args.arch}"
    Path(f"{stem}.json").write_text(json.dumps({"card": card, "args": {k: str(v) for k, v in vars(args).items()},
                                                "summary": summary}, indent=1))
    Path(f"{stem}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
