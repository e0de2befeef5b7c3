"""Latency vs request rate, open loop: dynamic batching against continuous batching, same pipeline.

Closed-loop clients (N users, each waiting for its answer) hide queueing: the load adapts to the
server. Real traffic does not wait, so this sends requests at Poisson arrival times of a fixed rate
(seeded, the same arrival times for both modes) and reports, per rate and mode, the completed
images/s and the p50/p99 latency (arrival to answer). Each mode first gets its saturation
throughput from closed-loop clients at twice its batch size; the rates are fractions of the
dynamic mode's saturation throughput, so both modes see the same absolute rates.

Each mode runs in its own tritonserver, one after the other on the same card (two copies of a
12B model do not fit beside each other's activations), or with ``--together`` both models in one
server (their load and compilation overlap; each is measured while the other idles): the same
random weights (seed 0), the same warm-up (one full batch), the same prompts and seeds, the same
statistic.

    python perf/open_loop.py --arch flux-dev --size 512 --steps 20 --max-rows 8 --fractions 0.5,0.75,0.9
    python perf/open_loop.py --arch flux-dev-tiny --device cpu --size 64 --steps 4 --max-rows 4 \\
        --fractions 0.5 --requests 12     # CPU check of the script
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from client import GenerationRequest
from client.aio import AsyncDiffusionClient
from perf.gpu_bench import SPEEDS, base_parameters, speed_parameters
from perf.lib import card_name, log, percentile, serve, today, write_results
from perf.prompts import prompt_at, vbench_prompts
from testing import harness
from triton_diffusion import families, model_config

MODES = ("dynamic", "continuous")


def base_model(arch: str, mode: str) -> str:
    """The shipped tiny entry of ``arch``'s family (its config: inputs, batching block, decoupled
    policy) that each mode derives from."""
    family = families.architecture(arch)[0]
    if family.steps is None:
        served = ", ".join(f.name for f in families.FAMILIES if f.steps is not None)
        raise SystemExit(f"--arch {arch}: continuous batching serves the families {served}, not {family.name}")
    return family.test_model if mode == "dynamic" else f"{family.test_model}_continuous"


def mode_config(arch: str, mode: str, args) -> tuple:
    """``(config, base)`` of ``arch`` served in ``mode``."""
    name = f"{arch}_{mode}".replace("-", "_").replace(".", "_")
    parameters = {**base_parameters(arch, args, args.max_rows), "max_pixels": None, "max_steps": "100",
                  "default_steps": str(args.steps[0]), **speed_parameters(arch, args)}
    batching = f"max_queue_delay_microseconds: {args.delay_us}" if mode == "dynamic" else ""
    config = model_config.variant(name, parameters, batching, max_batch_size=args.max_rows, base=base_model(arch, mode))
    return config, base_model(arch, mode)


def requests_for(prompts: list[str], count: int, offset: int, steps: list[int]) -> list[GenerationRequest]:
    """``count`` requests (VBench prompts, distinct seeds); steps drawn from ``steps``, seeded by position."""
    return [GenerationRequest(prompt_at(prompts, offset + i), seed=offset + i,
                              steps=random.Random(offset + i).choice(steps)) for i in range(count)]


async def closed_loop(client: AsyncDiffusionClient, requests: list[GenerationRequest], concurrency: int) -> float:
    """Images/s with ``concurrency`` users who each send the next request when answered."""
    started = time.perf_counter()
    results = await client.generate_many(requests, concurrency=concurrency)
    failures = [r for r in results if isinstance(r, Exception)]
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed: {failures[0]}")
    return len(requests) / (time.perf_counter() - started)


async def open_loop(client: AsyncDiffusionClient, requests: list[GenerationRequest], rate: float, seed: int) -> dict:
    """Send ``requests`` at Poisson arrival times of ``rate``/s; latency = answer - arrival time."""
    rng = random.Random(seed)
    arrivals, clock = [], 0.0
    for _ in requests:
        clock += rng.expovariate(rate)
        arrivals.append(clock)
    started = time.perf_counter()

    async def one(arrival: float, request: GenerationRequest):
        await asyncio.sleep(max(0.0, started + arrival - time.perf_counter()))
        await client.generate(request)
        return time.perf_counter() - started - arrival, time.perf_counter() - started

    outcomes = await asyncio.gather(*(one(a, r) for a, r in zip(arrivals, requests)), return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, Exception)]
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed: {failures[0]}")
    latencies = sorted(latency for latency, _ in outcomes)
    last = max(done for _, done in outcomes)
    return {"rate": rate, "offered_s": arrivals[-1], "images_per_s": len(requests) / last,
            "arrivals_s": arrivals, "latencies_s": [latency for latency, _ in outcomes],
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99), "mean_s": sum(latencies) / len(latencies),
            "n": len(requests)}


RUNNING_BATCH_SERIES = ("diffusion_continuous_step_seconds_count", "diffusion_continuous_live_rows_sum",
                        "diffusion_continuous_step_seconds_sum")


def running_batch_totals(server, name: str) -> tuple[float, ...]:
    """Steps run, rows summed over them, seconds summed over them (0s for the dynamic mode)."""
    return tuple(harness.metric(server, series, name) for series in RUNNING_BATCH_SERIES)


def running_batch(totals: tuple[float, ...], since: tuple[float, ...] = (0.0, 0.0, 0.0)) -> dict[str, float]:
    """Continuous mode: mean rows per step and mean seconds per step of the running batch over the
    steps between two ``running_batch_totals`` readings (the whole run by default)."""
    steps, rows, seconds = (now - before for now, before in zip(totals, since))
    if not steps:
        return {"steps": 0, "mean_rows": 0.0, "mean_step_s": 0.0}
    return {"steps": steps, "mean_rows": rows / steps, "mean_step_s": seconds / steps}


def admissions(server, name: str) -> dict[str, float]:
    return {when: harness.metric(server, "diffusion_continuous_admissions_total", name, when=when)
            for when in ("idle", "mid_flight")}


def bench_mode(server, name: str, args, prompts, rates: list[float] | None) -> dict:
    """Saturation, then the open-loop points (``rates``, or ``--fractions`` of this mode's saturation)."""
    async def run() -> dict:
        async with AsyncDiffusionClient(f"grpc://{server.grpc_url}", name, timeout_s=1800) as client:
            await closed_loop(client, requests_for(prompts, args.max_rows, 10_000, args.steps[:1]), args.max_rows)  # warm-up
            saturation = await closed_loop(client, requests_for(prompts, 4 * args.max_rows, 20_000, args.steps),
                                           2 * args.max_rows)
            log(f"{name}: saturation {saturation:.3f} images/s")
            points = []
            for index, rate in enumerate(rates or [fraction * saturation for fraction in args.fractions]):
                before = running_batch_totals(server, name)
                point = await open_loop(client, requests_for(prompts, args.requests, 1000 * (index + 1), args.steps),
                                        rate, seed=index)
                point["running_batch"] = running_batch(running_batch_totals(server, name), since=before)
                slowest = sorted(zip(point["latencies_s"], point["arrivals_s"]), reverse=True)[:3]
                log(f"{name}: rate {rate:.3f}/s -> {point['images_per_s']:.3f} images/s, "
                    f"p50 {point['p50_s']:.2f}s p99 {point['p99_s']:.2f}s; slowest (latency @ arrival): "
                    + ", ".join(f"{latency:.2f}s @ {arrival:.1f}s" for latency, arrival in slowest))
                points.append(point)
            return {"saturation_images_per_s": saturation, "points": points}

    result = asyncio.run(run())
    result["admissions"] = admissions(server, name)
    result["running_batch"] = running_batch(running_batch_totals(server, name))
    result["compilations_while_serving"] = harness.metric(server, "diffusion_compilations_while_serving_total", name)
    result["warmup_s"] = harness.metric(server, "diffusion_warmup_seconds", name)
    return result


def bench_both(arch: str, args, prompts, workdir: Path) -> dict:
    """Dynamic first (its saturation sets the rates), then continuous at the same rates."""
    configs = {mode: mode_config(arch, mode, args) for mode in MODES}
    servers = [list(MODES)] if args.together else [[mode] for mode in MODES]
    results, rates = {}, None
    for modes in servers:
        with serve([configs[mode] for mode in modes], workdir) as server:
            for mode in modes:
                results[mode] = bench_mode(server, configs[mode][0].name, args, prompts, rates)
                rates = [point["rate"] for point in results[mode]["points"]]
    return results


def table(arch: str, results: dict, args) -> str:
    dynamic, continuous = results["dynamic"], results["continuous"]
    lines = [f"{arch} {args.size}x{args.size}, {'/'.join(map(str, args.steps))} steps, up to {args.max_rows} rows | saturation images/s: "
             f"dynamic {dynamic['saturation_images_per_s']:.3f}, continuous {continuous['saturation_images_per_s']:.3f} "
             f"({continuous['saturation_images_per_s'] / dynamic['saturation_images_per_s']:.2f}x)",
             "rate/s | of dyn. saturation | dynamic img/s | continuous img/s | dynamic p50 / p99 s | continuous p50 / p99 s "
             "| p50 ratio | p99 ratio"]
    for d, c in zip(dynamic["points"], continuous["points"]):
        lines.append(f"{d['rate']:.3f} | {d['rate'] / dynamic['saturation_images_per_s']:.2f} | {d['images_per_s']:.3f} | "
                     f"{c['images_per_s']:.3f} | {d['p50_s']:.2f} / {d['p99_s']:.2f} | {c['p50_s']:.2f} / {c['p99_s']:.2f} | "
                     f"{c['p50_s'] / d['p50_s']:.2f} | {c['p99_s'] / d['p99_s']:.2f}")
    for c in continuous["points"]:
        batch = c["running_batch"]
        lines.append(f"continuous at {c['rate']:.3f}/s: {batch['mean_rows']:.2f} rows and {1000 * batch['mean_step_s']:.1f} ms "
                     "per step on average")
    lines.append(f"continuous admissions: {continuous['admissions']} (mid_flight: joined a running batch)")
    lines.append(f"warm-up before READY s: dynamic {dynamic['warmup_s']:.1f}, continuous {continuous['warmup_s']:.1f}; "
                 f"graphs compiled while serving: dynamic {dynamic['compilations_while_serving']:.0f}, "
                 f"continuous {continuous['compilations_while_serving']:.0f}")
    batch = continuous["running_batch"]
    lines.append(f"continuous running batch: {batch['steps']:.0f} steps, {batch['mean_rows']:.2f} rows and "
                 f"{1000 * batch['mean_step_s']:.1f} ms per step on average (compare the offline step scaling)")
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for mode, colour in zip(MODES, ("tab:blue", "tab:orange")):
        points = results[mode]["points"]
        rates = [p["rate"] for p in points]
        axis.plot(rates, [p["p50_s"] for p in points], "o-", color=colour, label=f"{mode} p50")
        axis.plot(rates, [p["p99_s"] for p in points], "s--", color=colour, label=f"{mode} p99")
    axis.axvline(results["dynamic"]["saturation_images_per_s"], color="grey", linestyle=":", label="dynamic saturation")
    axis.set_xlabel("request rate (Poisson arrivals, requests/s)")
    axis.set_ylabel("latency, arrival to answer (s)")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="flux-dev")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=lambda t: [int(x) for x in t.split(",")], default=[20],
                        help="steps per request; several (10,20,30,40): each request draws one (a mixed workload)")
    parser.add_argument("--plot-from", type=Path, help="only redraw the plot of a results JSON (next to it)")
    parser.add_argument("--max-rows", type=int, default=8, help="max_batch_size and max_images_per_call of both modes")
    parser.add_argument("--speed", choices=SPEEDS, default="eager",
                        help="compiled: the knobs of the shipped GPU configs (perf/gpu_bench.py), both modes warmed before READY")
    parser.add_argument("--together", action="store_true",
                        help="load both modes' models in one server (their compilations overlap); each is measured "
                             "while the other idles. Only where two copies fit the card beside the activations")
    parser.add_argument("--delay-us", type=int, default=20000, help="dynamic batching's max queue delay")
    parser.add_argument("--fractions", type=lambda t: [float(x) for x in t.split(",")], default=[0.5, 0.75, 0.9],
                        help="request rates as fractions of the dynamic mode's saturation throughput")
    parser.add_argument("--requests", type=int, default=40, help="requests per rate point")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config.pbtxt parameter for both modes, e.g. quantization= to measure bf16")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    args.set = dict(pair.split("=", 1) for pair in args.set)
    if args.plot_from:
        saved = json.loads(args.plot_from.read_text())
        plot(saved["results"], args.plot_from.with_suffix(".png"), saved["title"])
        return 0
    # what base_parameters and speed_parameters read; compiled, both modes warm every row count 1..--max-rows,
    # so neither pays a first call while measured
    args.max_batch, args.concurrency, args.batch_sizes = args.max_rows, [args.max_rows], list(range(1, args.max_rows + 1))
    args.compile_mode, args.step_cache, args.warm_up, args.poll_interval_ms = None, None, False, 100

    prompts = vbench_prompts()
    card = card_name() if args.device.startswith("cuda") else "CPU"
    with tempfile.TemporaryDirectory() as workdir:
        results = bench_both(args.arch, args, prompts, Path(workdir))
    header = (f"card: {card}, {args.speed}, {today()}, random weights; command: perf/open_loop.py "
              + " ".join(sys.argv[1:]))
    text = header + "\n" + table(args.arch, results, args)
    print(text)
    mix = "" if len(args.steps) == 1 else "_mixed-steps"
    speed = "" if args.speed == "eager" else f"_{args.speed}"
    stem = f"open_loop_{card.replace(' ', '_')}_{today()}_{args.arch}{speed}{mix}"
    title = f"{args.arch} {args.size}px, {'/'.join(map(str, args.steps))} steps, {args.speed}, {card}, {today()}"
    saved = write_results(args.out, stem, {"card": card, "title": title, "args": vars(args), "results": results}, text)
    try:
        plot(results, saved.with_suffix(".png"), title)
    except ImportError:  # the GPU host has no matplotlib: redraw here with --plot-from
        log("no matplotlib: plot with --plot-from " + str(saved))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
