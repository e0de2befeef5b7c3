"""Plot a gpu_bench JSON: served images/s (median, min-max bars) vs concurrency per mode, with the
offline pipeline's best batch as a reference line.

    python perf/plot_gpu.py perf/results/gpu_bench_<card>_<date>_<archs>.json   # writes the .png beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    results = data["results"]
    figure, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for axis, result in zip(axes[0], results):
        for mode, levels in result["served"].items():
            levels = sorted(levels.items(), key=lambda kv: int(kv[0]))
            x = [int(c) for c, _ in levels]
            median = [row["images_per_s"]["median"] for _, row in levels]
            low = [m - row["images_per_s"]["min"] for m, (_, row) in zip(median, levels)]
            high = [row["images_per_s"]["max"] - m for m, (_, row) in zip(median, levels)]
            axis.errorbar(x, median, yerr=[low, high], marker="o", capsize=3, label=f"served, {mode}")
        best_batch, best = max(result["offline"].items(), key=lambda kv: kv[1]["images_per_s"])
        axis.axhline(best["images_per_s"], color="grey", linestyle="--", label=f"offline pipeline, batch {best_batch}")
        axis.set_title(f"{result['arch']} {result['dtype']} on {data['card']}")
        axis.set_xlabel("client concurrency")
        axis.set_ylabel("images/s (median of repeats, min-max)")
        axis.set_xscale("log", base=2)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    output = path.with_suffix(".png")
    figure.savefig(output, dpi=110)
    return output


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(plot(Path(argument)))
