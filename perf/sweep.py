"""perf_analyzer concurrency sweep of several server configurations, with CSV results and a plot.

By default it starts a tritonserver serving variants of a base model (no batching, dynamic
batching, dynamic batching with a preferred size), sweeps client concurrency with perf_analyzer
over VBench prompts with varied seeds, and records throughput, latency percentiles, and the
server's realized batch sizes (executions vs requests) for every point.

    python perf/sweep.py                                   # tiny model on CPU, all variants
    python perf/sweep.py --url localhost:8001 --models stable_diffusion_tiny   # a running server
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


import tritonclient.http as httpclient

from client.api import GenerationRequest, ServedSchema
from perf.prompts import vbench_prompts
from triton_diffusion import model_config
from testing.harness import Stats, serve

VARIANTS = {
    "tiny_none": None,
    "tiny_dynamic": "max_queue_delay_microseconds: 20000",
    "tiny_dynamic_p16": "preferred_batch_size: [ 16 ] max_queue_delay_microseconds: 100000",
}


def input_data(path: Path, schema: ServedSchema, count: int, steps: int, size: int) -> Path:
    """perf_analyzer --input-data: one entry per request, every input the model declares (one
    input set, so requests may share a batch), built by the client from the served schema."""
    prompts = vbench_prompts()
    entries = []
    for i in range(count):
        request = GenerationRequest(prompts[(7 * i) % len(prompts)], seed=i, steps=steps, height=size, width=size)
        tensors = request.tensors(schema)
        tensors.pop("IMAGE", None)  # text-to-image: every entry leaves it out alike
        entries.append({
            name: [v.decode() if isinstance(v, bytes) else v for v in array.ravel().tolist()]
            for name, array in tensors.items()
        })
    path.write_text(json.dumps({"data": entries}))
    return path


def perf_analyzer_binary() -> str:
    binary = shutil.which("perf_analyzer") or str(Path(sys.executable).parent / "perf_analyzer")
    if not Path(binary).exists():
        raise SystemExit("perf_analyzer not found: run scripts/setup.sh")
    return binary


def run_point(grpc_url: str, http_url: str, model: str, concurrency: int, data: Path, args) -> dict:
    before = Stats.read(http_url, model)
    with tempfile.NamedTemporaryFile(suffix=".csv") as report:
        command = [
            perf_analyzer_binary(), "-m", model, "-u", grpc_url, "-i", "grpc", "--input-data", str(data),
            "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-mode", "count_windows",
            "--measurement-request-count", str(max(args.min_requests, args.requests_per_level * concurrency)),
            "--stability-percentage", str(args.stability_percentage), "--max-trials", "3", "-f", report.name,
        ]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"perf_analyzer failed ({completed.returncode}):\n{completed.stdout[-2000:]}\n{completed.stderr[-2000:]}")
        row = next(csv.DictReader(io.StringIO(Path(report.name).read_text())))
    delta = Stats.read(http_url, model) - before
    requests, executions = delta.inferences, delta.executions
    return {
        "model": model, "concurrency": concurrency,
        "images_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000, "p90_ms": float(row["p90 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
        "requests": requests, "executions": executions,
        "mean_batch": requests / executions if executions else 0.0,
    }


def plot(rows: list[dict], output: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for model in dict.fromkeys(r["model"] for r in rows):
        points = [r for r in rows if r["model"] == model]
        axis.plot([r["p99_ms"] for r in points], [r["images_per_s"] for r in points], marker="o", label=model)
        for r in points:
            axis.annotate(f"c={r['concurrency']}", (r["p99_ms"], r["images_per_s"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.set_xlabel("p99 latency (ms)")
    axis.set_ylabel("images/s")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=110)


def table(rows: list[dict]) -> str:
    lines = ["model | conc | img/s | p50 ms | p99 ms | requests | executions | mean batch"]
    for r in rows:
        lines.append(
            f"{r['model']} | {r['concurrency']} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['requests']} | {r['executions']} | {r['mean_batch']:.2f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="gRPC address of a running server (default: start one)")
    parser.add_argument("--http-url", help="HTTP address of that server (for its statistics)")
    parser.add_argument("--models", help="models to sweep on a running server (comma-separated)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="variants to serve when starting a server")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--requests-per-level", type=int, default=3)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--stability-percentage", type=float, default=100,
                        help="perf_analyzer's allowed variation between windows (raise it on a noisy machine)")
    parser.add_argument("--out", type=Path, default=Path("perf/out"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        if args.url:
            models, grpc_url, http_url = args.models.split(","), args.url, args.http_url or args.url.replace("8001", "8000")
        else:
            models = args.variants.split(",")
            repository = Path(tmp) / "repository"
            for name in models:
                model_config.write_model(repository, model_config.variant(name, dynamic_batching=VARIANTS[name]))
            server = serve(models, repository, log_path=args.out / f"sweep-{stamp}-server.log")
            grpc_url, http_url = server.grpc_url, server.http_url
        try:
            for model in models:
                schema = ServedSchema.from_config(httpclient.InferenceServerClient(http_url).get_model_config(model))
                data = input_data(Path(tmp) / f"{model}.json", schema, 256, args.steps, args.size)
                for concurrency in levels:
                    row = run_point(grpc_url, http_url, model, concurrency, data, args)
                    rows.append(row)
                    print(f"{model} c={concurrency}: {row['images_per_s']:.2f} img/s, p99 {row['p99_ms']:.0f} ms, "
                          f"{row['requests']} requests in {row['executions']} executions", flush=True)
        finally:
            if server:
                server.stop()
    csv_path = args.out / f"sweep-{stamp}.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    png_path = csv_path.with_suffix(".png")
    plot(rows, png_path, f"perf_analyzer sweep, {args.size}x{args.size}, {args.steps} steps")
    print(table(rows))
    print(f"wrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
