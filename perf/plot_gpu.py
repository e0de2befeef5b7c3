"""Plot a gpu_bench JSON: throughput vs p99 latency, one line per server configuration.

    python perf/plot_gpu.py perf/results/H100_sd15_2026-11-25.json   # writes the .png beside it
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
    archs = sorted({r["arch"] for r in data["served"]})
    figure, axes = plt.subplots(1, len(archs), figsize=(6.5 * len(archs), 4.5), squeeze=False)
    for axis, arch in zip(axes[0], archs):
        for mode in dict.fromkeys(r["mode"] for r in data["served"] if r["arch"] == arch):
            rows = [r for r in data["served"] if r["arch"] == arch and r["mode"] == mode]
            axis.plot([r["p99_s"] for r in rows], [r["images_per_s"] for r in rows], marker="o", label=f"served, {mode}")
            for r in rows:
                axis.annotate(f"c={r['concurrency']}", (r["p99_s"], r["images_per_s"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        offline = [r for r in data["offline"] if r["arch"] == arch]
        if offline:
            best = max(offline, key=lambda r: r["images_per_s"])
            axis.axhline(best["images_per_s"], color="grey", linestyle="--", label=f"offline pipeline, batch {best['batch']}")
        axis.set_title(f"{arch} on {data['card']}")
        axis.set_xlabel("p99 latency (s)")
        axis.set_ylabel("images/s")
        axis.set_xscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    output = path.with_suffix(".png")
    figure.savefig(output, dpi=110)
    return output


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(plot(Path(argument)))
