"""What the OpenAI-compatible gateway adds to end-to-end time, against direct gRPC, like for like.

Starts a tritonserver (the tiny model, its shipped batching) and the gateway as its own process
(`triton-diffusion gateway`), then alternates rounds: direct gRPC (the project's client) and the
gateway (the official `openai` package), each round `--requests` requests (VBench prompts,
distinct seeds) with `--concurrency` in flight. Reports per side the median over rounds of the
mean end-to-end latency and of images/s, and the gateway's overhead on latency.

    python perf/gateway_bench.py --concurrency 16 --rounds 3 --requests 48
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path


from client import DiffusionClient, GenerationRequest
from perf.prompts import prompt_at, vbench_prompts
from triton_diffusion.launcher import free_port
from testing import harness
from triton_diffusion.launcher import DEFAULT_MODEL_REPOSITORY
from triton_diffusion.tiny import ensure_tiny_model

MODEL = "stable_diffusion_tiny"


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def direct_round(server, prompts, seeds, concurrency) -> list[float]:
    with DiffusionClient(f"grpc://{server.grpc_url}", MODEL, timeout_s=600) as client:
        requests = [GenerationRequest(p, seed=s) for p, s in zip(prompts, seeds)]
        results = client.generate_many(requests, concurrency=concurrency)
    failures = [r for r in results if isinstance(r, Exception)]
    if failures:
        raise RuntimeError(f"direct: {failures[0]}")
    return [r.seconds for r in results]


def gateway_round(url, prompts, seeds, concurrency) -> list[float]:
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    call = lambda ps: timed(lambda: client.images.generate(model=MODEL, prompt=ps[0], extra_body={"seed": ps[1]}))  # noqa: E731
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(call, zip(prompts, seeds)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    ensure_tiny_model()
    prompts = vbench_prompts()
    work = Path("perf/out")
    work.mkdir(parents=True, exist_ok=True)
    server = harness.serve([MODEL], DEFAULT_MODEL_REPOSITORY, log_path=work / "gateway_bench_server.log")
    port = free_port()
    gateway = subprocess.Popen([sys.executable, "-m", "triton_diffusion.cli", "gateway", "--triton", f"grpc://{server.grpc_url}",
                                "--model", MODEL, "--host", "127.0.0.1", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=open(work / "gateway_bench_gateway.log", "w"))
    url = f"http://127.0.0.1:{port}/v1"
    try:
        harness.wait_until(lambda: _answers(url), "the gateway to answer", timeout=60)
        sides = {"direct gRPC": [], "gateway (openai package)": []}
        # warm-up: one round each
        direct_round(server, prompts[:args.concurrency], range(args.concurrency), args.concurrency)
        gateway_round(url, prompts[:args.concurrency], range(args.concurrency), args.concurrency)
        for round_ in range(args.rounds):
            offset = 1000 * (round_ + 1)
            chosen = [prompt_at(prompts, offset + i) for i in range(args.requests)]
            seeds = [offset + i for i in range(args.requests)]
            for side, run in (("direct gRPC", lambda: direct_round(server, chosen, seeds, args.concurrency)),
                              ("gateway (openai package)", lambda: gateway_round(url, chosen, seeds, args.concurrency))):
                started = time.perf_counter()
                latencies = run()
                wall = time.perf_counter() - started
                sides[side].append({"mean_latency_s": statistics.mean(latencies), "images_per_s": len(latencies) / wall})
                print(f"round {round_ + 1} {side}: mean latency {sides[side][-1]['mean_latency_s']:.3f}s, "
                      f"{sides[side][-1]['images_per_s']:.2f} img/s", flush=True)
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        server.stop()
    summary = {side: {key: statistics.median(r[key] for r in rounds) for key in ("mean_latency_s", "images_per_s")}
               for side, rounds in sides.items()}
    direct, via = summary["direct gRPC"], summary["gateway (openai package)"]
    overhead = via["mean_latency_s"] / direct["mean_latency_s"] - 1
    lines = [f"gateway vs direct gRPC, {MODEL} on CPU, c={args.concurrency}, {args.rounds} rounds x {args.requests} requests, "
             f"{date.today().isoformat()} (median over rounds)",
             "side | mean end-to-end latency s | img/s"]
    lines += [f"{side} | {s['mean_latency_s']:.3f} | {s['images_per_s']:.2f}" for side, s in summary.items()]
    lines.append(f"gateway overhead on mean latency: {100 * overhead:+.1f}%  (rounds: " + ", ".join(
        f"{100 * (g['mean_latency_s'] / d['mean_latency_s'] - 1):+.1f}%" for d, g in zip(sides["direct gRPC"], sides["gateway (openai package)"])) + ")")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"cpu_gateway_overhead_{date.today().isoformat()}"
    stem.with_suffix(".txt").write_text(table + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rounds": sides, "summary": summary,
                                                     "overhead": overhead}, indent=1))
    return 0


def _answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/models", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


if __name__ == "__main__":
    sys.exit(main())
