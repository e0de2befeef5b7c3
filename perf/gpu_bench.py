"""GPU benchmark, like for like: the offline diffusers pipeline vs the same pipeline served by Triton.

Per architecture (random weights of the real configs, built on the GPU), and per serving mode
(no batching, dynamic batching), it loads the pipeline once in this process ("offline": one
``PipelineRunner.run`` call per batch, the physical limit of this stack) and once in a
tritonserver, and then alternates the two:

    warm-up: every offline batch size once, every served concurrency level once
    repeat r = 1..R:  offline round (one call per batch size)  ->  served round (N requests per level)

so that drift of the card or the host hits both sides alike. Both sides report the same
statistic: the median over the R repeats and their spread (min-max). On the served side a
repeat at concurrency c sends ``max(min_requests, requests_per_level * c)`` requests (VBench
prompts, distinct seeds) with c in flight; an offline call of a repeat runs the prompts and seeds of
that repeat's first served requests. It records:

- images/s (median of repeats, min-max), latency p50/p90/max pooled over repeats (with n);
- the batches Triton really formed (histogram per level, from the statistics API), and for
  every batch size that formed, served execution time / offline call time at that batch size
  (the "server tax"; offline is measured at every such size, topped up if one only formed late);
- peak GPU memory of the process holding the model (nvidia-smi per-process, both sides alike);
- per-step cost of asking Triton whether requests were cancelled, seconds per execution by stage
  (validate, pipeline call, respond) and pipeline calls that ran out of memory (backend metrics).

    python perf/gpu_bench.py --archs sd15 --out perf/results
    python perf/gpu_bench.py --archs flux-dev --concurrency 1,4,8 --batch-sizes 1,4,8
    python perf/gpu_bench.py --archs sd15-tiny --device cpu --size 64 --steps 2 --repeats 2   # CPU check
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from client import DiffusionClient
from perf.lib import (ProcessMemory, card_name, closed_loop, log, model_parameters, percentile, serve, spread,
                      today, write_results)
from perf.prompts import prompt_at, vbench_prompts
from testing import harness
from triton_diffusion import families, model_config
from triton_diffusion.metrics import STAGES

# --speed: eager, or compiled with the knobs its family declares fastest (families/*.py, README);
# both sides of a comparison get the same.
SPEEDS = ("eager", "compiled")
MODES = {
    "none": None,  # no dynamic batching: every request its own execution
    "dynamic": "max_queue_delay_microseconds: {delay_us}",
    # wait up to 100 ms for a full batch of the largest concurrency level
    "dynamic-full": "preferred_batch_size: [ {max_batch} ] max_queue_delay_microseconds: 100000",
}


def dtype_for(arch: str, args) -> str:
    """The architecture's published dtype (its family declares it; float32 off the GPU)."""
    return "float32" if not args.device.startswith("cuda") else families.architecture(arch)[1].dtype


def guidance_for(arch: str) -> float:
    """What GUIDANCE_SCALE the architecture is served at (CFG, true CFG or distilled: its family's meaning)."""
    return families.architecture(arch)[1].guidance


def largest_call(args) -> int:
    """The most images one pipeline call holds: ``--max-batch``, else the top concurrency or batch size."""
    return args.max_batch or max(args.concurrency + args.batch_sizes)


def speed_parameters(arch: str, args) -> dict[str, str]:
    """The config.pbtxt speed parameters of ``--speed`` for ``arch``, plus what the bench adds."""
    parameters = dict(families.architecture(arch)[0].speed) if args.speed == "compiled" else {}
    if args.device == "cpu" and parameters.get("compile"):
        # a CPU check of the code path, not of inductor (nor of fp8 GEMMs: float8 weights only)
        parameters.update(compile_backend="eager", speed_devices="cpu")
        if parameters.get("quantization") == "fp8":
            parameters["quantization"] = "fp8_weight_only"
    if args.compile_mode and parameters:
        parameters["compile_mode"] = args.compile_mode
    if args.step_cache:
        parameters["step_cache"] = args.step_cache
    if parameters or args.set or args.warm_up:
        # Warm exactly what the sweep sends: the batch sizes it measures (padded to buckets: the
        # buckets, the warm-up's default), at its size and guidance.
        biggest = largest_call(args)
        if "batch_buckets" not in args.set:
            parameters["warmup_batch_sizes"] = ",".join(map(str, sorted({1, 2, *args.batch_sizes, *(min(c, biggest) for c in args.concurrency)})))
        parameters["warmup_guidance_scales"] = str(guidance_for(arch))
    parameters["cancellation_poll_interval_ms"] = str(args.poll_interval_ms)
    return {**parameters, **args.set}  # --set has the last word


def shape_of(args) -> tuple[int, int, int]:
    """(height, width, frames) from ``--size`` (a side, or HEIGHTxWIDTH) and ``--frames`` (the other
    benchmarks that share these helpers pass a square ``size`` and no frames)."""
    height, _, width = str(args.size).partition("x")
    return int(height), int(width or height), getattr(args, "frames", 0)


def repeat_offset(repeat: int) -> int:
    """The first request index of a repeat (0-based), on both sides: an offline call and the first
    served requests of one repeat run the same prompts and seeds."""
    return 10_000 * (repeat + 1)


def items_for(prompts, count, args, arch, offset=0):
    from triton_diffusion.requests import text_to_image

    height, width, frames = shape_of(args)
    return [text_to_image(prompt_at(prompts, offset + i), offset + i, args.steps, guidance_for(arch), height, width,
                          num_frames=frames)
            for i in range(count)]


class Offline:
    """The bare pipeline in this process; ``call(batch)`` returns seconds for one synchronized call."""

    def __init__(self, arch: str, args, prompts):
        from triton_diffusion.pipeline import PipelineRunner
        from triton_diffusion.settings import ModelSettings

        self.arch, self.args, self.prompts, self.calls = arch, args, prompts, 0
        started = time.perf_counter()
        self.runner = PipelineRunner.load(ModelSettings.from_parameters({
            **base_parameters(arch, args), **speed_parameters(arch, args)}))
        self.load_seconds = time.perf_counter() - started
        log(f"{arch}: built random-weight {type(self.runner.text_to_image).__name__} in {self.load_seconds:.1f}s; {self.runner.speed}")
        self.warmup = self.runner.warm_up()
        log(f"{arch}: offline warm-up {self.warmup}")
        self._release()  # the load's bf16 weights (fp8) and the warm-up's activations: the served model shares the card
        self.warm: set[int] = set()
        self.times: dict[int, list[float]] = {}
        self.memory: dict[int, int] = {}

    def _sync(self):
        if self.args.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def call(self, batch: int, offset: Optional[int] = None) -> float:
        self.calls += 1
        items = items_for(self.prompts, batch, self.args, self.arch, offset=1000 * self.calls if offset is None else offset)
        self._sync()
        started = time.perf_counter()
        self.runner.run(items[0].params, items)
        self._sync()
        seconds = time.perf_counter() - started
        self._release()  # the served model shares the card: give back this call's activations
        return seconds

    def _release(self) -> None:
        if self.args.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def warm_up(self, batch: int) -> None:
        if batch not in self.warm:
            self.call(batch)
            self.warm.add(batch)

    def measure(self, batch: int) -> None:
        """One repeat at ``batch`` (warmed up first if this shape is new), with the prompts and seeds of
        the first ``batch`` served requests of the same repeat (``repeat_offset``)."""
        self.warm_up(batch)
        times = self.times.setdefault(batch, [])
        with ProcessMemory([os.getpid()]) as memory:
            times.append(self.call(batch, offset=repeat_offset(len(times))))
        if memory.peak_mib:
            self.memory[batch] = max(self.memory.get(batch, 0), memory.peak_mib)

    def close(self) -> None:
        self.runner = None
        gc.collect()
        self._release()


def base_parameters(arch: str, args, images_per_call: Optional[int] = None) -> dict[str, str]:
    """config.pbtxt parameters serving random weights of ``arch`` at ``args``' device, size and steps,
    with calls of up to ``images_per_call`` images (default: ``largest_call``)."""
    height, width, frames = shape_of(args)
    return model_parameters(arch, args.device, (height, width), args.steps, images_per_call or largest_call(args),
                            frames=frames)


def serve_mode(arch: str, mode: str, args, workdir: Path):
    name = f"{arch}_{mode}".replace("-", "_")
    parameters = {**base_parameters(arch, args), "max_pixels": None, **speed_parameters(arch, args)}
    batching = MODES[mode]
    max_batch = args.max_batch or max(args.concurrency)
    batching = None if batching is None else batching.format(delay_us=args.delay_us, max_batch=max_batch)
    family = families.architecture(arch)[0]
    base = family.test_model if family.video else model_config.BASE_MODEL  # (a video model declares a VIDEO output)
    config = model_config.variant(name, parameters, batching, max_batch_size=max_batch, base=base)
    started = time.perf_counter()
    server = serve([(config, base)], workdir)
    ready = time.perf_counter() - started
    warmup = harness.metric(server, "diffusion_warmup_seconds", name)
    log(f"{name}: warm-up {warmup:.1f}s of it")
    return server, name, {"ready_s": ready, "warmup_s": warmup}


def bench_arch(arch: str, args, prompts, workdir: Path) -> dict:
    offline = Offline(arch, args, prompts)
    served: dict[str, dict[int, list[dict]]] = {}
    startup: dict[str, dict] = {}
    for mode in args.modes:
        server, name, startup[mode] = serve_mode(arch, mode, args, workdir / mode)
        served[mode] = {c: [] for c in args.concurrency}
        try:
            with DiffusionClient(f"grpc://{server.grpc_url}", name, timeout_s=1800) as client:
                log(f"{name}: warm-up (offline batch sizes {args.batch_sizes}, served levels {args.concurrency})")
                for batch in args.batch_sizes:
                    offline.warm_up(batch)
                for concurrency in args.concurrency:
                    closed_loop(client, server, name, concurrency, concurrency, prompts, offset=500_000)
                for repeat in range(args.repeats):
                    for batch in sorted(set(args.batch_sizes) | set(offline.times)):
                        offline.measure(batch)
                    for concurrency in args.concurrency:
                        count = max(args.min_requests, args.requests_per_level * concurrency)
                        round_ = closed_loop(client, server, name, concurrency, count, prompts, offset=repeat_offset(repeat))
                        served[mode][concurrency].append(round_)
                        log(f"{name} r{repeat + 1} c={concurrency}: {round_['images_per_s']:.2f} img/s, batches {round_['histogram']}, "
                            f"failures {round_['failures']}")
            # Every shape the sweep sent was warmed before READY: anything compiled since is a miss.
            startup[mode]["compilations_while_serving"] = harness.metric(server, "diffusion_compilations_while_serving_total", name)
            startup[mode]["cuda_graph_recordings_while_serving"] = harness.metric(
                server, "diffusion_cuda_graph_recordings_while_serving_total", name)
        finally:
            server.stop()
    # Offline at every batch size that formed, with as many repeats as the others.
    formed = {b for rounds in served.values() for level in rounds.values() for r in level for b in r["histogram"]}
    for batch in sorted(formed | set(args.batch_sizes)):
        while len(offline.times.get(batch, [])) < args.repeats:
            offline.measure(batch)
    result = {"arch": arch, "dtype": dtype_for(arch, args), "speed": args.speed, "speed_parameters": speed_parameters(arch, args),
              "offline_startup": {"load_s": offline.load_seconds, "warmup_s": offline.warmup.seconds,
                                  "warmup_graphs": offline.warmup.compiled_graphs, "warmup_cuda_graphs": offline.warmup.cuda_graphs,
                                  "speed": list(offline.runner.speed)},
              "served_startup": startup, "offline": {}, "served": {}}
    for batch, times in sorted(offline.times.items()):
        result["offline"][batch] = {"seconds": spread(times), "images_per_s": batch / statistics.median(times),
                                    "gpu_mem_mib": offline.memory.get(batch)}
    for mode, levels in served.items():
        result["served"][mode] = {}
        for concurrency, rounds in levels.items():
            latencies = sorted(x for r in rounds for x in r["latencies"])
            histogram: dict[int, int] = {}
            for r in rounds:
                for b, n in r["histogram"].items():
                    histogram[b] = histogram.get(b, 0) + n
            taxes = {}
            for b in histogram:
                per_repeat = [r["exec_seconds"][b] for r in rounds if b in r["exec_seconds"]]
                taxes[b] = statistics.median(per_repeat) / statistics.median(offline.times[b])
            steps = sum(r["steps"] for r in rounds)
            executions = sum(histogram.values())
            stage_s = {stage: sum(r["stage_seconds"][stage] for r in rounds) / executions for stage in rounds[0]["stage_seconds"]} \
                if executions else {}
            result["served"][mode][concurrency] = {
                "images_per_s": spread([r["images_per_s"] for r in rounds]),
                "latency_s": {"p50": percentile(latencies, 50), "p90": percentile(latencies, 90), "max": latencies[-1] if latencies else None,
                              "n": len(latencies)},
                "failures": sum(r["failures"] for r in rounds),
                "histogram": dict(sorted(histogram.items())),
                "server_tax": dict(sorted(taxes.items())),
                "poll_ms_per_step": 1000 * sum(r["poll_seconds"] for r in rounds) / steps if steps else None,
                # where an execution's seconds went inside the model (mean over every batch size formed),
                # and pipeline calls by result: a call that ran out of memory was halved and run again
                "stage_s_per_execution": stage_s,
                "pipeline_calls": {key: sum(r["calls"][key] for r in rounds) for key in rounds[0]["calls"]},
                "gpu_mem_mib": max((r["gpu_mem_mib"] or 0) for r in rounds) or None,
            }
    offline.close()
    return result


def fmt_spread(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def summarize(results: list[dict], header: str) -> str:
    lines = [header]
    for result in results:
        lines.append(f"\n== {result['arch']} ({result['dtype']}, {result['speed']}: {result['speed_parameters']}) ==")
        start = result["offline_startup"]
        lines.append(f"offline: load {start['load_s']:.1f}s, warm-up {start['warmup_s']:.1f}s ({start['warmup_graphs']} graphs, "
                     f"{start.get('warmup_cuda_graphs', 0)} CUDA graphs); {'; '.join(start.get('speed', []))}")
        lines.append("served: " + "; ".join(
            f"{mode} READY {s['ready_s']:.1f}s (warm-up {s['warmup_s']:.1f}s), while serving: compilations "
            f"{s.get('compilations_while_serving', '-')}, CUDA-graph recordings {s.get('cuda_graph_recordings_while_serving', '-')}"
            for mode, s in result["served_startup"].items()))
        lines.append("offline | batch | s/call median (min-max) | img/s | GPU MiB (process)")
        for batch, row in result["offline"].items():
            lines.append(f"  | {batch} | {fmt_spread(row['seconds'], 3)} | {row['images_per_s']:.2f} | {row['gpu_mem_mib'] or '-'}")
        lines.append("served | mode | conc | img/s median (min-max) | p50 / p90 / max s (n) | batches formed {size: executions} | "
                     f"server tax per batch size | cancel poll ms/step | GPU MiB (stub) | s per execution: {' / '.join(STAGES)} | "
                     "pipeline calls that ran out of memory")
        none = result["served"].get("none", {})
        for mode, levels in result["served"].items():
            for concurrency, row in levels.items():
                lat = row["latency_s"]
                gain = ""
                if mode != "none" and concurrency in none:
                    gain = f" [{row['images_per_s']['median'] / none[concurrency]['images_per_s']['median']:.2f}x none]"
                taxes = " ".join(f"{b}:{t:.2f}" for b, t in row["server_tax"].items())
                poll = f"{row['poll_ms_per_step']:.2f}" if row["poll_ms_per_step"] is not None else "-"
                stages = " / ".join(f"{row['stage_s_per_execution'][stage]:.3f}" for stage in STAGES) \
                    if row["stage_s_per_execution"] else "-"
                lines.append(
                    f"  | {mode} | {concurrency} | {fmt_spread(row['images_per_s'])}{gain} | "
                    f"{lat['p50']:.2f} / {lat['p90']:.2f} / {lat['max']:.2f} ({lat['n']}) | {row['histogram']} | {taxes} | {poll} | "
                    f"{row['gpu_mem_mib'] or '-'} | {stages} | {row['pipeline_calls']['out_of_memory']:.0f}"
                    f"{' | FAILURES ' + str(row['failures']) if row['failures'] else ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--archs", default="sd15")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="512", help="a side (square) or HEIGHTxWIDTH")
    parser.add_argument("--frames", type=int, default=0, help="video architectures: frames per clip")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-sizes", type=ints, default=[1, 2, 4, 8, 16])
    parser.add_argument("--concurrency", type=ints, default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests-per-level", type=int, default=3)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--delay-us", type=int, default=10_000)
    parser.add_argument("--modes", type=lambda s: [m for m in s.split(",") if m], default=["none", "dynamic"])
    parser.add_argument("--max-batch", type=int, default=0, help="Triton max_batch_size and preferred size (default: the top concurrency)")
    parser.add_argument("--speed", choices=SPEEDS, default="eager")
    parser.add_argument("--compile-mode", default="", help="torch.compile mode for --speed compiled")
    parser.add_argument("--step-cache", default="", help='e.g. "FirstBlockCache threshold=0.05" (changes images)')
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config.pbtxt parameter for both sides, e.g. quantization=fp8 or batch_buckets=1,2,4,8,16")
    parser.add_argument("--warm-up", action="store_true", help="warm up before READY with --speed eager too")
    parser.add_argument("--poll-interval-ms", type=int, default=100)
    parser.add_argument("--tag", default="", help="added to the result file names")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    args.set = dict(pair.split("=", 1) for pair in args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # long VBench prompts: one truncation warning per call
    transformers.utils.logging.set_verbosity_error()
    prompts = vbench_prompts()
    card = card_name()
    import torch

    height, width, frames = shape_of(args)
    shape = f"{height}x{width}" + (f"x{frames} frames" if frames else "")
    header = (f"card: {card}, torch {torch.__version__}, {args.speed}, {shape}, {args.steps} steps, {args.repeats} repeats "
              f"(offline and served interleaved), {today()}")
    # the size is in the name: the same model at 512 and 1024 on one day are two files
    stem = (f"gpu_bench_{card.replace(' ', '_')}_{today()}_{args.archs.replace(',', '+')}_{shape.replace(' frames', 'f')}_{args.speed}"
            f"{'_' + args.tag if args.tag else ''}")
    results = []
    log(header)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            results.append(bench_arch(arch, args, prompts, Path(tmp) / arch))
            write_results(args.out, stem, {"args": vars(args), "results": results})  # after each architecture
    table = summarize(results, header)
    write_results(args.out, stem, {"args": vars(args), "results": results}, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
