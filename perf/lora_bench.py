"""Per-request LoRA adapters under load, served: mixed-adapter batches against one adapter and against
grouping by adapter (``lora_batching``), and what loading a new adapter under load costs the others.

One tritonserver serves two copies of the model (random weights of the real architecture), the same
in everything but ``lora_batching``: ``mixed`` (rows with different adapters share a denoiser call)
and ``grouped`` (one adapter per call). Both read 8 random adapters of rank ``--rank`` from one
``lora_dir`` (written here, on the denoiser's real layer shapes; ``max_lora_rank`` 64, so every
slot holds rank 64 whatever an adapter's rank) and are compiled as the family ships (bf16 here:
``--set quantization=...`` to change). A closed loop at ``--concurrency`` then sends, per phase,
``--requests`` requests (VBench prompts, distinct seeds) after one unmeasured round:

- ``none`` (mixed model): no adapter: every row still takes the adapter path (compiled: the zero slot);
- ``single`` (mixed model): every request the same adapter;
- ``mixed`` (mixed model): adapters uniformly over the 8 (request i: adapter i mod 8);
- ``grouped`` (grouped model): the same traffic as ``mixed``;
- ``new under load`` (mixed model): the last request of every ``--concurrency`` names an adapter never
  used before, the others 7 of the 8 (so a batch names 8 adapters, as ``mixed``'s do, and the bank
  of 8 holds them: the newcomer is read on the reader thread, installed, and evicts the one adapter
  the batch does not use): the others' latency against ``mixed``'s, and the newcomers' own.

Per phase: images/s, latency p50/p99/max, the batches Triton formed and the denoiser calls run
(``diffusion_pipeline_calls``), the adapter events, compilations while serving (must stay 0), peak
GPU memory of the stubs; once: the device memory of one adapter slot.

    python -m perf.lora_bench --arch flux-dev --size 512 --steps 28 --out perf/results
    python -m perf.lora_bench --arch sdxl --size 1024 --steps 30
    python -m perf.lora_bench --arch flux-dev-tiny --device cpu --size 64 --steps 2 --requests 8 --concurrency 4   # CPU check
    python -m perf.lora_bench --docs          # docs/benchmarks.md's tables from RESULTS
    python -m perf.lora_bench --check-docs    # exit 1 if they are stale
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from client import DiffusionClient, GenerationRequest
from perf.gpu_bench import speed_parameters
from perf.lib import (ProcessMemory, card_name, log, model_parameters, percentile, serve, stub_pids, today, write_results,
                      write_tables)
from perf.prompts import prompt_at, vbench_prompts
from testing import harness
from testing.adapters import COMMON, random_adapter
from triton_diffusion import families, model_config

ADAPTERS = 8
MAX_RANK = 64
ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
RESULTS = ("lora_bench_NVIDIA_H100_80GB_HBM3_2026-12-07_flux-dev_512_r64",  # the docs' tables (perf/results), in order
           "lora_bench_NVIDIA_H100_80GB_HBM3_2026-12-07_sd15_512_r64")


def write_adapters(arch: str, folder: Path, rank: int, names: list[str]) -> dict:
    """Random adapters ``names`` (rank ``rank``, the common target layers) of ``arch``'s denoiser, and
    the device memory of one bank slot (every linear layer at ``MAX_RANK``, as a compiled model wraps)."""
    import torch

    from triton_diffusion.acceleration import denoiser_of
    from triton_diffusion.lora import LoraBank, read_adapter

    family, architecture = families.architecture(arch)
    with torch.device("meta"):  # shapes only: nothing of the model is allocated here
        pipe = architecture.build()
    sizes = {}
    for index, name in enumerate(names):
        path = random_adapter(pipe, folder / name, seed=index, rank=rank, layers=COMMON, scale=0.01, dtype=torch.bfloat16)
        sizes[name] = sum(f.stat().st_size for f in path.iterdir())
    denoiser = denoiser_of(pipe)
    reads = []  # what a server's reader thread spends on one (this host's CPU; the model's shapes only)
    for _ in range(3):
        started = time.perf_counter()
        read_adapter(pipe, denoiser, names[0], str(folder / names[0]), MAX_RANK)
        reads.append(time.perf_counter() - started)
    with torch.device("meta"):  # (the bank wraps the layers: after the adapters read their names)
        slot_bytes = LoraBank(denoiser.to(getattr(torch, architecture.dtype)), ADAPTERS, MAX_RANK, compiled=True).bytes_per_slot()
    return {"slot_bytes": slot_bytes, "file_bytes": statistics.median(sizes.values()), "read_s": statistics.median(reads)}


def phase(client, server, name: str, concurrency: int, adapters: list, prompts, offset: int) -> dict:
    """One closed-loop round: request i names ``adapters[i]`` (None: no adapter)."""
    requests = [GenerationRequest(prompt_at(prompts, offset + i), seed=offset + i, lora=adapter)
                for i, adapter in enumerate(adapters)]
    before = harness.Stats.read(server, name)
    calls_before = harness.metric(server, "diffusion_pipeline_calls_total", name)
    events = ("load", "hit", "eviction", "failure")
    events_before = {e: harness.metric(server, "diffusion_lora_adapters_total", name, event=e) for e in events}
    with ProcessMemory(stub_pids(server)) as memory:
        started = time.perf_counter()
        results = client.generate_many(requests, concurrency=concurrency)
        wall = time.perf_counter() - started
    delta = harness.wait_until(lambda: (d := harness.Stats.read(server, name) - before).inferences >= len(requests) and d,
                               "all requests counted")
    failures = [str(r) for r in results if isinstance(r, Exception)]
    return {
        "images_per_s": (len(requests) - len(failures)) / wall, "wall_s": wall,
        "latencies": [None if isinstance(r, Exception) else r.seconds for r in results], "adapters": adapters,
        "failures": failures, "histogram": delta.histogram,
        "exec_seconds": {b: s.seconds_per_execution for b, s in delta.batches.items()},
        "pipeline_calls": harness.metric(server, "diffusion_pipeline_calls_total", name) - calls_before,
        "adapter_events": {e: harness.metric(server, "diffusion_lora_adapters_total", name, event=e) - events_before[e]
                           for e in events},
        "gpu_mem_mib": memory.peak_mib,
    }


def latency(values) -> dict:
    values = [v for v in values if v is not None]
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values), "n": len(values)} if values else {}


def table(result: dict) -> str:
    phases = result["phases"]
    mixed = phases["mixed"]["images_per_s"]
    lines = [f"LoRA adapters under load: {result['arch']} {result['size']}x{result['size']}, {result['steps']} steps, "
             f"c={result['concurrency']}, {result['requests']} requests per phase, rank-{result['rank']} adapters in "
             f"rank-{MAX_RANK} slots, {result['speed']}; {result['card']}, {result['date']}",
             "", "| phase | model | img/s | vs mixed | p50 s | p99 s | max s | batches formed | pipeline calls | "
             "adapter loads / evictions |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, p in phases.items():
        lat = p["latency"]
        batches = ", ".join(f"{b}x{n}" for b, n in sorted(p["histogram"].items(), key=lambda kv: -int(kv[0])))
        lines.append(f"| {label} | {p['model']} | {p['images_per_s']:.3f} | {p['images_per_s'] / mixed:.2f} | "
                     f"{lat['p50']:.2f} | {lat['p99']:.2f} | {lat['max']:.2f} | {batches} | {p['pipeline_calls']:.0f} | "
                     f"{p['adapter_events']['load']:.0f} / {p['adapter_events']['eviction']:.0f} |")
    new = phases.get("new under load")
    if new:
        lines += ["", f"New adapters under load: the others' latency p50 {new['others']['p50']:.2f} s / max "
                      f"{new['others']['max']:.2f} s (mixed: {phases['mixed']['latency']['p50']:.2f} / "
                      f"{phases['mixed']['latency']['max']:.2f} s); the newcomers' p50 {new['newcomers']['p50']:.2f} s; "
                      f"one denoising step at the largest batch formed: {result['step_s']:.3f} s."]
    read = f", read in {result['read_s']:.2f} s on the host's CPU" if "read_s" in result else ""
    lines += ["", f"One adapter slot: {result['slot_bytes'] / 2**20:.0f} MiB of device memory (every linear layer of the "
                  f"denoiser at rank {MAX_RANK}); an adapter file (rank {result['rank']}): {result['file_bytes'] / 2**20:.0f} MiB{read}. "
                  f"Compilations while serving: {result['compilations_while_serving']}."]
    return "\n".join(lines) + "\n"


def write_docs(check: bool) -> int:
    """docs/benchmarks.md's LoRA tables from RESULTS; with ``check`` only whether they are stale (1)."""
    import json

    tables = [table(json.loads((ROOT / "perf" / "results" / f"{stem}.json").read_text())) + f"\n(`perf/results/{stem}.json`)\n"
              for stem in RESULTS]
    return write_tables(DOCS, {"lora_bench": "\n".join(tables)}, check, "python -m perf.lora_bench --docs")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="flux-dev")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32, help="requests per phase")
    parser.add_argument("--speed", choices=("eager", "compiled"), default="compiled")
    parser.add_argument("--delay-us", type=int, default=100_000, help="dynamic batching's max queue delay")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config.pbtxt parameters")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    parser.add_argument("--phases", default="none,single,mixed,grouped,new", help="which phases (new: new under load)")
    parser.add_argument("--docs", action="store_true")
    parser.add_argument("--check-docs", action="store_true")
    args = parser.parse_args(argv)
    if args.docs or args.check_docs:
        return write_docs(args.check_docs)
    args.set = dict(item.split("=", 1) for item in args.set)
    c = args.concurrency
    prompts = vbench_prompts()
    workdir = Path(tempfile.mkdtemp(prefix="lora_bench_"))
    names = [f"r{args.rank}-{i}" for i in range(ADAPTERS)]
    newcomers = [f"new-{i}" for i in range(-(-args.requests // c))]
    sizes = write_adapters(args.arch, workdir / "loras", args.rank, names + newcomers)
    log(f"{len(names) + len(newcomers)} adapters written; one slot {sizes['slot_bytes'] / 2**20:.0f} MiB")

    args.set.setdefault("quantization", "")  # bf16 unless --set says otherwise
    args.set.setdefault("fuse_qkv", "false")  # (refused with lora_dir: an adapter of to_q would miss the fused layer)
    bench = SimpleNamespace(speed=args.speed, device=args.device, compile_mode="", step_cache="", set=args.set, warm_up=True,
                            batch_sizes=[1, 2, c], concurrency=[c], max_batch=c, poll_interval_ms=100)
    speed = speed_parameters(args.arch, bench)  # the family's compiled knobs, warmed at batch 1, 2 and c
    parameters = {**model_parameters(args.arch, args.device, (args.size, args.size), args.steps, c), "max_pixels": None,
                  **speed, "lora_dir": str(workdir / "loras"), "max_loaded_loras": str(ADAPTERS),
                  "max_lora_rank": str(MAX_RANK)}
    batching = f"preferred_batch_size: [ {c} ] max_queue_delay_microseconds: {args.delay_us}"
    mixed_traffic = [names[i % ADAPTERS] for i in range(args.requests)]
    plan = {
        "none": ("mixed", [None] * args.requests),
        "single": ("mixed", [names[0]] * args.requests),
        "mixed": ("mixed", mixed_traffic),
        "grouped": ("grouped", mixed_traffic),
        "new under load": ("mixed", [newcomers[i // c] if i % c == c - 1 else names[i % (ADAPTERS - 1)]
                                     for i in range(args.requests)]),
    }
    wanted = args.phases.split(",")
    plan = {label: phase_plan for label, phase_plan in plan.items() if label.split()[0] in wanted}
    models = {mode: model_config.variant(f"lora_{mode}", {**parameters, "lora_batching": mode}, batching, max_batch_size=c,
                                         base=model_config.BASE_MODEL)
              for mode in ("mixed", "grouped") if any(phase_plan[0] == mode for phase_plan in plan.values())}
    # One model served at a time (a second FLUX.1-dev with its bank does not fit an 80 GB card beside the
    # first), each measured alone on the card.
    phases, ready_s, warmup, compilations = {}, {}, {}, 0
    for mode, config in models.items():
        started = time.perf_counter()
        server = serve([(config, model_config.BASE_MODEL)], workdir, ready_timeout=1500)
        ready_s[mode] = time.perf_counter() - started
        name = f"lora_{mode}"
        try:
            client = DiffusionClient(f"grpc://{server.grpc_url}", name, timeout_s=1800)
            # one unmeasured round: every adapter read and in the bank
            phase(client, server, name, c, mixed_traffic[:max(c, ADAPTERS)], prompts, offset=900_000)
            for offset, (label, (_, adapters)) in enumerate(plan.items()):
                if plan[label][0] != mode:
                    continue
                result = phase(client, server, name, c, adapters, prompts, offset=10_000 * (offset + 1))
                result["model"] = name
                result["latency"] = latency(result["latencies"])
                if label == "new under load":
                    fresh = [a in newcomers for a in adapters]
                    result["others"] = latency([t for t, new in zip(result["latencies"], fresh) if not new])
                    result["newcomers"] = latency([t for t, new in zip(result["latencies"], fresh) if new])
                phases[label] = result
                log(f"{label}: {result['images_per_s']:.3f} img/s, p50 {result['latency'].get('p50', 0):.2f} s, batches "
                    f"{result['histogram']}, calls {result['pipeline_calls']:.0f}, events {result['adapter_events']}, "
                    f"failures {len(result['failures'])}")
            compilations += harness.metric(server, "diffusion_compilations_while_serving_total", name)
            warmup[mode] = harness.metric(server, "diffusion_warmup_seconds", name)
            client.close()
        finally:
            server.stop()
    phases = {label: phases[label] for label in plan if label in phases}  # (the plan's order)
    largest = max(int(b) for b in phases["mixed"]["histogram"])
    result = {"arch": args.arch, "size": args.size, "steps": args.steps, "rank": args.rank, "concurrency": c,
              "requests": args.requests, "speed": args.speed, "parameters": parameters, "ready_s": ready_s, "warmup_s": warmup,
              "compilations_while_serving": compilations, "card": card_name(), "date": today(), **sizes,
              "step_s": phases["mixed"]["exec_seconds"][largest] / args.steps, "phases": phases}
    text = table(result)
    print(text)
    stem = f"lora_bench_{card_name().replace(' ', '_')}_{today()}_{args.arch}_{args.size}_r{args.rank}"
    write_results(args.out, stem, result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
