"""What the guard costs: the same requests to tritonserver directly and through the guard, like for like.

The guard (``triton_diffusion/guard.py``) is what listens when Triton is exposed beyond loopback
(compose, Kubernetes). This starts one server as such a deployment does (``address`` 0.0.0.0, an
admin key), so tritonserver listens on internal loopback ports and the guard on the public ones,
then alternates rounds against the two doors with the project's client: ``--requests`` requests
(VBench prompts, distinct seeds), ``--concurrency`` in flight, gRPC and HTTP. Reports per door the
median over rounds of the mean end-to-end latency and of images/s, and the guard's overhead.

    python perf/guard_bench.py --concurrency 16 --rounds 5 --requests 48
    python perf/guard_bench.py --arch sd15 --device cuda --size 512 --steps 20 --device-name "NVIDIA H200"

``--arch`` serves random weights of a real architecture (``perf/gpu_bench.py``'s parameters, the
shipped batching of ``stable_diffusion_tiny`` with ``max_batch_size`` = ``--concurrency``).
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import time
from datetime import date
from pathlib import Path


from client import DiffusionClient, GenerationRequest
from perf.prompts import prompt_at, vbench_prompts
from triton_diffusion.launcher import DEFAULT_MODEL_REPOSITORY, ServerConfig, TritonServer, free_port
from triton_diffusion.tiny import ensure_tiny_model


def one_round(url: str, model: str, prompts, seeds, concurrency: int, size: int) -> list[float]:
    with DiffusionClient(url, model, timeout_s=600) as client:
        requests = [GenerationRequest(p, seed=s, height=size or None, width=size or None) for p, s in zip(prompts, seeds)]
        results = client.generate_many(requests, concurrency=concurrency)
    failures = [r for r in results if isinstance(r, Exception)]
    if failures:
        raise RuntimeError(f"{url}: {failures[0]}")
    return [r.seconds for r in results]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stable_diffusion_tiny")
    parser.add_argument("--repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    parser.add_argument("--size", type=int, default=0, help="image side; 0: the model's default")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--protocols", default="grpc,http")
    parser.add_argument("--device-name", default="CPU", help="named in the results (the card, or CPU)")
    parser.add_argument("--arch", default="", help="serve random weights of this architecture instead of --model")
    parser.add_argument("--device", default="cuda", help="with --arch")
    parser.add_argument("--steps", type=int, default=20, help="with --arch")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    if not args.arch:
        ensure_tiny_model()
    prompts = vbench_prompts()
    work = Path("perf/out")
    work.mkdir(parents=True, exist_ok=True)
    if args.arch:
        from perf.gpu_bench import base_parameters
        from triton_diffusion import model_config

        args.model, args.repository = f"{args.arch}_guard_bench".replace("-", "_"), work / "guard_bench_repo"
        args.max_batch, args.batch_sizes, args.size = None, [], args.size or 512
        parameters = base_parameters(args.arch, argparse.Namespace(**{**vars(args), "concurrency": [args.concurrency]}))
        config = model_config.variant(args.model, {**parameters, "max_pixels": None}, max_batch_size=args.concurrency)
        model_config.write_model(args.repository, config)
    config = ServerConfig(model_repository=args.repository, models=[args.model], http_port=free_port(),
                          grpc_port=free_port(), metrics_port=free_port(), address="0.0.0.0",
                          admin_key=secrets.token_urlsafe(32))
    server = TritonServer(config, log_path=work / "guard_bench_server.log").start()
    protocols = [p for p in args.protocols.split(",") if p]
    doors = {}
    for protocol in protocols:
        inner, outer = (server.grpc_url, config.grpc_port) if protocol == "grpc" else (server.http_url, config.http_port)
        doors[f"{protocol} direct"] = f"{protocol}://{inner}"
        doors[f"{protocol} guard"] = f"{protocol}://127.0.0.1:{outer}"
    rounds: dict[str, list[dict]] = {door: [] for door in doors}
    try:
        server.wait_ready(600)
        for url in doors.values():  # warm-up: one round each
            one_round(url, args.model, prompts[:args.concurrency], range(args.concurrency), args.concurrency, args.size)
        for index in range(args.rounds):
            offset = 1000 * (index + 1)
            chosen = [prompt_at(prompts, offset + i) for i in range(args.requests)]
            seeds = [offset + i for i in range(args.requests)]
            order = list(doors.items()) if index % 2 == 0 else list(reversed(doors.items()))  # no side always first
            for door, url in order:
                started = time.perf_counter()
                latencies = one_round(url, args.model, chosen, seeds, args.concurrency, args.size)
                wall = time.perf_counter() - started
                rounds[door].append({"mean_latency_s": statistics.mean(latencies), "images_per_s": len(latencies) / wall})
                print(f"round {index + 1} {door}: mean latency {rounds[door][-1]['mean_latency_s']:.3f}s, "
                      f"{rounds[door][-1]['images_per_s']:.2f} img/s", flush=True)
    finally:
        server.stop()
    summary = {door: {key: statistics.median(r[key] for r in results) for key in ("mean_latency_s", "images_per_s")}
               for door, results in rounds.items()}
    lines = [f"guard vs direct, {args.model} on {args.device_name}, size {args.size or 'default'}, c={args.concurrency}, "
             f"{args.rounds} rounds x {args.requests} requests, {date.today().isoformat()} (median over rounds)",
             "door | mean end-to-end latency s | img/s"]
    lines += [f"{door} | {s['mean_latency_s']:.3f} | {s['images_per_s']:.2f}" for door, s in summary.items()]
    overheads = {}
    for protocol in protocols:
        direct, guarded = rounds[f"{protocol} direct"], rounds[f"{protocol} guard"]
        overheads[protocol] = summary[f"{protocol} guard"]["mean_latency_s"] / summary[f"{protocol} direct"]["mean_latency_s"] - 1
        lines.append(f"{protocol}: guard overhead on mean latency {100 * overheads[protocol]:+.1f}%  (rounds: " + ", ".join(
            f"{100 * (g['mean_latency_s'] / d['mean_latency_s'] - 1):+.1f}%" for d, g in zip(direct, guarded)) + ")")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    device = args.device_name.replace(" ", "_")
    stem = args.out / f"guard_overhead_{device}_{args.model}_{date.today().isoformat()}"
    stem.with_suffix(".txt").write_text(table + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"args": {**vars(args), "out": str(args.out), "repository": str(args.repository)},
                                                     "rounds": rounds, "summary": summary, "overhead": overheads}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
