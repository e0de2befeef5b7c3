"""What the warm-up before READY costs, call by call, and whether serving then compiles anything.

Loads an architecture (random weights) with its family's shipped speed knobs (the same
``speed_parameters`` as ``gpu_bench.py --speed compiled``), runs the warm-up while timing each of
its calls and counting the graphs torch.compile builds in each, then sends VBench prompts (lengths
as users write them, batches mixing them) at every batch size given and counts what compiles after
the warm-up (it must be 0). Writes ``perf/results/warmup_bench_<card>_<date>_<arch>.{json,txt}``.

    python perf/warmup_bench.py --arch z-image-turbo --size 1024 --steps 9 --batch-sizes 1,2,4   # the shipped warm-up
    python perf/warmup_bench.py --arch z-image-turbo-tiny --device cpu --size 64 --steps 2 --batch-sizes 1,3   # CPU check
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from perf.gpu_bench import base_parameters, guidance_for, items_for, speed_parameters
from perf.lib import card_name, log, today, write_results
from perf.prompts import vbench_prompts


def compile_phases(top: int = 12) -> dict[str, float]:
    """The compiler phases that took longest so far, in seconds summed over every graph (torch's own
    timers: tracing, AOT autograd, inductor codegen, cache loads), to tell what a slow warm-up pays for."""
    from torch._dynamo.utils import compilation_time_metrics

    totals = sorted(((sum(times), name) for name, times in compilation_time_metrics.items()), reverse=True)
    return {name: round(seconds, 2) for seconds, name in totals[:top]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--arch", default="z-image-turbo")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="1024")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--batch-sizes", type=ints, default=[1, 4], help="warmed, then served with VBench prompts")
    parser.add_argument("--calls", type=int, default=3, help="calls per batch size after the warm-up")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tag", default="", help="added to the result file names (e.g. cold-cache)")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    bench_args = SimpleNamespace(speed="compiled", device=args.device, compile_mode="", step_cache="", set=dict(
        pair.split("=", 1) for pair in args.set), warm_up=False, batch_sizes=args.batch_sizes, concurrency=[1], max_batch=0,
        poll_interval_ms=100, size=args.size, steps=args.steps)
    import torch

    from triton_diffusion.pipeline import PipelineRunner, compiled_graphs
    from triton_diffusion.settings import ModelSettings

    parameters = {**base_parameters(args.arch, bench_args), **speed_parameters(args.arch, bench_args),
                  "warmup_batch_sizes": ",".join(map(str, args.batch_sizes)), **bench_args.set}
    started = time.perf_counter()
    runner = PipelineRunner.load(ModelSettings.from_parameters(parameters))
    load_s = time.perf_counter() - started
    log(f"{args.arch}: loaded in {load_s:.1f}s; {runner.speed}")
    calls = []
    run = runner.run

    def seconds_of(params, items, *rest):
        """One synchronized call of the runner: (seconds, its result)."""
        begun = time.perf_counter()
        result = run(params, items, *rest)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - begun, result

    def timed(params, items, *rest):
        before = compiled_graphs()
        seconds, result = seconds_of(params, items, *rest)
        calls.append({"rows": len(items), "prompt_chars": sorted({len(i.prompt) for i in items}),
                      "seconds": seconds, "graphs": compiled_graphs() - before})
        log(f"warm-up call {len(calls)}: {calls[-1]}; compile phases so far: {compile_phases(6)}")
        return result

    runner.run = timed
    report = runner.warm_up()
    runner.run = run
    log(f"warm-up: {report}")
    phases = compile_phases()
    log(f"where the compile time went: {phases}")
    prompts = vbench_prompts()
    before = compiled_graphs()
    served = {}
    for batch in args.batch_sizes:
        seconds = []
        for call in range(args.calls):
            items = items_for(prompts, batch, bench_args, args.arch, offset=100 * call + batch)
            seconds.append(seconds_of(items[0].params, items)[0])
        served[batch] = seconds
        log(f"batch {batch}: {', '.join(f'{s:.3f}' for s in seconds)} s")
    after = compiled_graphs() - before
    card = card_name()
    table = "\n".join([
        f"warm-up of {args.arch} {args.size}, {args.steps} steps, {runner.speed}; {card}, {today()}",
        f"load {load_s:.1f} s; warm-up {report.seconds:.1f} s in {report.calls} calls, {report.compiled_graphs} graphs",
        "compile phases (s, summed over graphs): " + ", ".join(f"{name} {s:.1f}" for name, s in phases.items()),
        "call | rows | prompt lengths (chars) | s | graphs compiled",
        *(f"{n + 1} | {c['rows']} | {c['prompt_chars']} | {c['seconds']:.1f} | {c['graphs']}" for n, c in enumerate(calls)),
        f"after the warm-up, VBench prompts ({args.calls} calls per batch size, guidance {guidance_for(args.arch)}): "
        + "; ".join(f"batch {b}: {min(s):.3f}-{max(s):.3f} s" for b, s in served.items()) + f"; graphs compiled: {after}"])
    write_results(args.out, f"warmup_bench_{card.replace(' ', '_')}_{today()}_{args.arch}" + (f"_{args.tag}" if args.tag else ""), {
        "args": {**vars(args), "out": str(args.out)}, "parameters": parameters,  # (write_results adds the card and date)
        "speed": list(runner.speed), "load_s": load_s, "warmup": vars(report), "warmup_calls": calls,
        "compile_phases_s": phases,
        "after_warmup": {"seconds": served, "compiled_graphs": after}}, table)
    print(table)
    return 0 if after == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
