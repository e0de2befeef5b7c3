"""The headline table: each shipped GPU model's served speed with its shipped knobs, generated from
the results files that measured it (never retyped).

It writes the table between ``<!-- headline:begin -->`` and ``<!-- headline:end -->`` in
``docs/benchmarks.md`` and ``README.md``; ``tests/test_perf_tools.py`` fails when either is stale.
A cell no results file holds says "not measured".

    python perf/headline.py            # rewrite both tables
    python perf/headline.py --check    # exit 1 if either is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from perf.gpu_bench import shape_of
from perf.lib import with_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "perf" / "results"
TARGETS = (ROOT / "docs" / "benchmarks.md", ROOT / "README.md")

# (shipped model, size, the gpu_bench results file that measured its architecture with its shipped
# knobs at that size; None: not measured yet). 512 and 1024 per image model, a video model at its
# default size. Random weights of the real architectures.
ROWS: tuple[tuple[str, str, Optional[str]], ...] = (
    ("sd_turbo", "512", "gpu_bench_NVIDIA_H200_2026-12-01_sd15_compiled_cudagraphs"),
    ("flux_dev", "512", None),
    ("flux_dev", "1024", "gpu_bench_NVIDIA_H100_80GB_HBM3_2026-12-08_flux-dev_1024x1024_compiled_shipped"),
    ("z_image_turbo", "512", "gpu_bench_NVIDIA_H100_80GB_HBM3_2026-12-08_z-image-turbo_512x512_compiled_shipped"),
    ("z_image_turbo", "1024", "gpu_bench_NVIDIA_H100_80GB_HBM3_2026-12-08_z-image-turbo_1024x1024_compiled_shipped"),
    ("qwen_image", "512", None),
    ("qwen_image", "1024", "gpu_bench_NVIDIA_H200_2026-12-01_qwen-image_compiled"),
    ("sd35_large", "512", None),
    ("sd35_large", "1024", "gpu_bench_NVIDIA_H200_2026-12-01_sd35-large_compiled"),
    ("sdxl", "512", None),
    ("sdxl", "1024", "gpu_bench_NVIDIA_H200_2026-12-01_sdxl_compiled"),
    ("wan_t2v", "480x832x81 frames", None),
)
# the speed parameters a row names (the bench's own bookkeeping, e.g. warm-up sizes, is left out)
_KNOBS = ("compile", "compile_mode", "compile_dynamic", "compile_vae", "quantization", "batch_buckets", "channels_last",
          "fuse_qkv", "step_cache")


def _level(result: dict, concurrency: int) -> Optional[dict]:
    for levels in result["served"].values():
        if str(concurrency) in levels:
            return levels[str(concurrency)]
    return None


def measured_size(stem: str) -> str:
    """The size a results file ran at, as ROWS writes it."""
    args = json.loads((RESULTS / f"{stem}.json").read_text())["args"]
    height, width, frames = shape_of(SimpleNamespace(**args))
    return (f"{height}x{width}" if height != width else str(height)) + (f"x{frames} frames" if frames else "")


def cells(model: str, size: str, stem: Optional[str]) -> dict[str, str]:
    """One row's cells (what a results file does not hold says "not measured")."""
    if stem is None:
        return {"model": f"`{model}`", "size": size, "setting": f"{size}: not measured", "card": "-", "c1": "not measured",
                "c16": "not measured", "tax": "-", "while_serving": "-", "ready": "-", "file": "-"}
    data = json.loads((RESULTS / f"{stem}.json").read_text())
    result = data["results"][0]
    args = data["args"]
    knobs = ", ".join(f"{key}={value}" for key, value in result["speed_parameters"].items() if key in _KNOBS)
    height, width, frames = shape_of(SimpleNamespace(**args))
    shape = f"{height}x{width}" + (f"x{frames} frames" if frames else "")
    one, sixteen = _level(result, 1), _level(result, 16)
    c16 = "not measured"
    if sixteen:
        formed = ", ".join(f"{calls} of {batch} images" for batch, calls in sorted(sixteen["histogram"].items(), key=lambda kv: int(kv[0])))
        c16 = f"{sixteen['images_per_s']['median']:.2f} img/s (calls: {formed})"
    taxes = {batch: tax for level in (one, sixteen) if level for batch, tax in level["server_tax"].items()}
    startup = next(iter(result["served_startup"].values()))
    measured_as = f"{result['arch']} {shape}, {args['steps']} steps"
    return {
        "model": f"`{model}`", "size": size, "card": f"{data['card']}, {data['date']}",
        "measured_as": measured_as, "setting": f"{measured_as} ({knobs})",
        "c1": f"{one['latency_s']['p50']:.2f} s" if one else "not measured", "c16": c16,
        "tax": ", ".join(f"{batch}: {value:.2f}" for batch, value in sorted(taxes.items(), key=lambda kv: int(kv[0]))),
        "while_serving": (f"{startup.get('compilations_while_serving', 0):.0f} / "
                          + (f"{startup['cuda_graph_recordings_while_serving']:.0f}"
                             if "cuda_graph_recordings_while_serving" in startup else "-")),
        "ready": f"{startup['ready_s']:.0f} s ({startup['warmup_s']:.0f} s warm-up)",
        "file": f"`{stem}.json`",
    }


def table() -> str:
    """docs/benchmarks.md's table: every row, with how it was measured."""
    lines = ["| shipped model | measured as (random weights, served; card, date) | c=1 p50 | c=16 | server tax per batch "
             "formed | compilations / CUDA-graph recordings while serving | READY after start (inductor cache filled by the offline side) | results file |",
             "|---|---|---|---|---|---|---|---|"]
    for entry in ROWS:
        c = cells(*entry)
        setting = c["setting"] + (f"; {c['card']}" if entry[2] else "")
        lines.append(f"| {c['model']} | {setting} | {c['c1']} | {c['c16']} | {c['tax']} | {c['while_serving']} | {c['ready']} | "
                     f"{c['file']} |")
    return "\n".join(lines)


def short_table() -> str:
    """README's table: the measured rows only, their speed and card (how: docs/benchmarks.md)."""
    lines = ["| shipped model | measured as (random weights) | c=1 p50 | c=16 | card, date |", "|---|---|---|---|---|"]
    for entry in ROWS:
        if entry[2]:
            c = cells(*entry)
            lines.append(f"| {c['model']} | {c['measured_as']} | {c['c1']} | {c['c16']} | {c['card']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    generated = {TARGETS[0]: table(), TARGETS[1]: short_table()}
    stale = []
    for path in TARGETS:
        text = path.read_text()
        new = with_table(text, "headline", generated[path])
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"stale headline table in {', '.join(map(str, stale))}: run python perf/headline.py", file=sys.stderr)
        return 1
    print(generated[TARGETS[0]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
