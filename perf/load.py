"""Headless locust run (bounded users and duration, loopback only) with a server-side report.

Starts a tritonserver with the tiny model unless ``--host`` names a running one, runs locust
headless with CSV output (and a PNG of throughput and latency over time), then reports failures, realized batch sizes and server memory (RSS of
tritonserver and its Python-backend stubs, at start and end). Exit code 1 on any failure.

    python perf/load.py --users 8 --duration 60s            # short load test
    python perf/load.py --users 16 --duration 5m --soak      # soak: fails if RSS grows > 20% after warm-up
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import threading
import time
from pathlib import Path


from testing.harness import Stats, serve

HERE = Path(__file__).resolve().parent


def server_rss_mib(pid: int) -> float:
    """RSS of a process and its children (the Python-backend stubs), MiB."""
    import psutil

    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def plot_history(history_csv: Path, output: Path) -> None:
    """Throughput and latency percentiles over the run, from locust's ``_stats_history.csv``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in csv.DictReader(history_csv.open()) if r["Name"] == "Aggregated" and r["50%"] != "N/A"]
    if not rows:
        return
    start = int(rows[0]["Timestamp"])
    seconds = [int(r["Timestamp"]) - start for r in rows]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    top.plot(seconds, [float(r["Requests/s"]) for r in rows], label="requests/s")
    top.plot(seconds, [float(r["Failures/s"]) for r in rows], label="failures/s")
    top.set_ylabel("per second")
    top.legend(fontsize=8)
    for column in ("50%", "95%", "99%"):
        bottom.plot(seconds, [float(r[column]) for r in rows], label=f"p{column.rstrip('%')}")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("seconds into the run")
    bottom.legend(fontsize=8)
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(output, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="gRPC address of a running server (default: start one)")
    parser.add_argument("--http-host", help="its HTTP address (statistics); default: port 8000 of --host")
    parser.add_argument("--model", default="stable_diffusion_tiny")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--spawn-rate", type=float, default=4)
    parser.add_argument("--duration", default="60s")
    parser.add_argument("--sizes", default="128x128,64x64")
    parser.add_argument("--i2i-ratio", type=float, default=0.25)
    parser.add_argument("--think-time", default="0,0.5")
    parser.add_argument("--soak", action="store_true", help="fail if server RSS grows more than 20%%")
    parser.add_argument("--out", type=Path, default=Path("perf/out"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / f"locust-{time.strftime('%Y%m%d-%H%M%S')}"
    server = None
    if args.host:
        grpc_url, http_url = args.host, args.http_host or args.host.rsplit(":", 1)[0] + ":8000"
    else:
        server = serve([args.model], log_path=Path(f"{prefix}-server.log"))
        grpc_url, http_url = server.grpc_url, server.http_url
    from locust.util.timespan import parse_timespan

    duration_s = parse_timespan(args.duration)
    samples: list[tuple[float, float]] = []  # (seconds into the run, server RSS MiB)
    stop_sampling = threading.Event()

    def sample_rss():
        started = time.monotonic()
        while not stop_sampling.wait(2.0):
            samples.append((time.monotonic() - started, server_rss_mib(server.process.pid)))

    try:
        rss_idle = server_rss_mib(server.process.pid) if server else None
        sampler = threading.Thread(target=sample_rss, daemon=True)
        if server:
            sampler.start()
        before = Stats.read(http_url, args.model)
        command = [
            str(Path(sys.executable).parent / "locust"), "-f", str(HERE / "locustfile.py"), "--headless",
            "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.duration, "--host", grpc_url,
            "--csv", str(prefix), "--only-summary", "--stop-timeout", "60", "--model", args.model,
            "--sizes", args.sizes, "--i2i-ratio", str(args.i2i_ratio), "--think-time", args.think_time,
        ]
        # Bounded: the run, locust's stop timeout, and a margin; a hung locust is killed.
        completed = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 180)
        stop_sampling.set()
        print(completed.stdout[-3000:] + completed.stderr[-3000:])
        realized = (Stats.read(http_url, args.model) - before).histogram
    finally:
        if server:
            server.stop()
    with open(f"{prefix}_stats.csv") as handle:
        total = next(row for row in csv.DictReader(handle) if row["Name"] == "Aggregated")
    requests, failures = int(total["Request Count"]), int(total["Failure Count"])
    executions = sum(realized.values())
    print(f"requests {requests}, failures {failures}, {float(total['Requests/s']):.2f} req/s, "
          f"p50 {total['50%']} ms, p99 {total['99%']} ms")
    print(f"realized batch sizes (size: executions): {dict(sorted(realized.items()))}, "
          f"mean {sum(b * n for b, n in realized.items()) / max(1, executions):.2f}")
    status = 0 if failures == 0 and requests > 0 else 1
    if samples:
        # Allocators and kernel caches grow during the first batches of each shape: compare the
        # end of the run with the RSS once a quarter of it has passed, not with the idle server.
        warm = next(rss for at, rss in samples if at >= duration_s / 4) if samples[-1][0] >= duration_s / 4 else samples[0][1]
        end, peak = samples[-1][1], max(rss for _, rss in samples)
        growth = end / warm - 1
        print(f"server RSS: idle {rss_idle:.0f} MiB, after warm-up {warm:.0f} MiB, end {end:.0f} MiB "
              f"({growth:+.1%} since warm-up), peak {peak:.0f} MiB, {len(samples)} samples")
        if args.soak and growth > 0.20:
            print("soak FAILED: server RSS grew more than 20% after warm-up")
            status = 1
    plot_history(Path(f"{prefix}_stats_history.csv"), Path(f"{prefix}.png"))
    print(f"CSV: {prefix}_stats.csv, plot: {prefix}.png")
    return status


if __name__ == "__main__":
    sys.exit(main())
