"""Triton 2.51: does cancelling a gRPC stream right after its final response strand the request?

Each trial starts a tritonserver with one decoupled model, sends ``--requests`` requests from
``--concurrency`` threads, each request on its own stream with plain ``tritonclient``, and after
each final response stops the stream with or without ``cancel_requests``; then it unloads the
model and records whether the unload completed within ``--unload-timeout`` s (a stranded request
keeps the version UNLOADING forever). Trials alternate the two ways, so both see the same machine.

    python perf/stream_cancel_race.py --trials 6 --requests 32 --concurrency 16
    python perf/stream_cancel_race.py --max-queue-size 1    # some requests refused: queue full
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np


from testing import harness
from triton_diffusion.launcher import DEFAULT_MODEL_REPOSITORY
from triton_diffusion.overrides import BatchingOverrides, derived_repository

MODEL = "stable_diffusion_tiny_continuous"


def one_request(url: str, index: int, cancel: bool) -> None:
    import tritonclient.grpc as grpcclient

    client, answers = grpcclient.InferenceServerClient(url), queue.Queue()
    client.start_stream(lambda result, error: answers.put((result, error)))
    inputs = []
    for name, value, kind in [("PROMPT", np.array([[b"x"]], dtype=object), "BYTES"),
                              ("SEED", np.array([[index]], np.int64), "INT64"),
                              ("NUM_INFERENCE_STEPS", np.array([[2]], np.int32), "INT32"),
                              ("HEIGHT", np.array([[64]], np.int32), "INT32"), ("WIDTH", np.array([[64]], np.int32), "INT32")]:
        inputs.append(grpcclient.InferInput(name, list(value.shape), kind))
        inputs[-1].set_data_from_numpy(value)
    client.async_stream_infer(MODEL, inputs)
    answers.get(timeout=300)  # the image, or an error (queue full): either is the final response
    client.stop_stream(cancel_requests=cancel)
    client.close()


def trial(cancel: bool, requests: int, concurrency: int, unload_timeout: float, log: Path, repository: Path) -> dict:
    server = harness.serve([MODEL], repository, log_path=log, env={"HF_HUB_OFFLINE": "1"})
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda index: one_request(server.grpc_url, index, cancel), range(requests)))
        started = time.monotonic()
        try:
            server._get(f"/v2/repository/models/{MODEL}/unload", method="POST", timeout=unload_timeout)
        except OSError:
            pass
        unloaded = False
        while time.monotonic() - started < unload_timeout:
            if server.model_states()[MODEL].get("state") == "UNAVAILABLE":
                unloaded = True
                break
            time.sleep(0.2)
        return {"cancel_after_answer": cancel, "requests": requests, "concurrency": concurrency, "unloaded": unloaded,
                "seconds": round(time.monotonic() - started, 1)}
    finally:
        server.stop(timeout=5)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6, help="per way (with and without the cancel)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--unload-timeout", type=float, default=30.0)
    parser.add_argument("--max-queue-size", type=int, default=None, help="override the model's queue limit")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    work = Path("perf/out")
    work.mkdir(parents=True, exist_ok=True)
    repository = DEFAULT_MODEL_REPOSITORY
    if args.max_queue_size is not None:
        repository = derived_repository(DEFAULT_MODEL_REPOSITORY, [MODEL], BatchingOverrides(max_queue_size=args.max_queue_size))
    results = []
    for index in range(2 * args.trials):
        outcome = trial(index % 2 == 0, args.requests, args.concurrency, args.unload_timeout, work / "stream_cancel_race.log",
                        repository)
        results.append(outcome)
        print(outcome, flush=True)
    queue_limit = "" if args.max_queue_size is None else f", max_queue_size {args.max_queue_size}"
    lines = [f"Triton 2.51, {MODEL}{queue_limit} on CPU, {args.requests} streamed requests per trial, {args.concurrency} at "
             f"a time, {date.today().isoformat()}",
             "stop_stream after the final response | trials | version stranded (unload not done in "
             f"{args.unload_timeout:g} s)"]
    for cancel in (True, False):
        chosen = [r for r in results if r["cancel_after_answer"] == cancel]
        lines.append(f"{'cancel_requests=True' if cancel else 'cancel_requests=False'} | {len(chosen)} | "
                     f"{sum(not r['unloaded'] for r in chosen)}")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.max_queue_size is None else f"_max-queue-{args.max_queue_size}"
    stem = args.out / f"cpu_stream_cancel_race_{date.today().isoformat()}{suffix}"
    stem.with_suffix(".txt").write_text(table + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"args": {**vars(args), "out": str(args.out)}, "trials": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
