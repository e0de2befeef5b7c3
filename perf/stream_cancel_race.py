"""Triton 2.51: does cancelling a gRPC stream right after its final response strand the request?

Each trial starts a tritonserver with one decoupled model, sends ``--requests`` requests one after
another, each on its own stream with plain ``tritonclient``, and after each final response stops
the stream with or without ``cancel_requests``; then it unloads the model and records whether the
unload completed within ``--unload-timeout`` s (a stranded request keeps the version UNLOADING
forever). Trials alternate the two ways, so both see the same machine.

    python perf/stream_cancel_race.py --trials 6 --requests 24
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from triton_diffusion import harness  # noqa: E402
from triton_diffusion.launcher import DEFAULT_MODEL_REPOSITORY  # noqa: E402

MODEL = "stable_diffusion_tiny_continuous"


def trial(cancel: bool, requests: int, unload_timeout: float, log: Path) -> dict:
    import tritonclient.grpc as grpcclient

    server = harness.serve([MODEL], DEFAULT_MODEL_REPOSITORY, log_path=log, env={"HF_HUB_OFFLINE": "1"})
    try:
        for index in range(requests):
            client, answers = grpcclient.InferenceServerClient(server.grpc_url), queue.Queue()
            client.start_stream(lambda result, error: answers.put((result, error)))
            inputs = []
            for name, value, kind in [("PROMPT", np.array([[b"x"]], dtype=object), "BYTES"),
                                      ("SEED", np.array([[index]], np.int64), "INT64"),
                                      ("NUM_INFERENCE_STEPS", np.array([[2]], np.int32), "INT32"),
                                      ("HEIGHT", np.array([[64]], np.int32), "INT32"), ("WIDTH", np.array([[64]], np.int32), "INT32")]:
                inputs.append(grpcclient.InferInput(name, list(value.shape), kind))
                inputs[-1].set_data_from_numpy(value)
            client.async_stream_infer(MODEL, inputs)
            result, error = answers.get(timeout=120)
            assert error is None, error
            client.stop_stream(cancel_requests=cancel)
            client.close()
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
        return {"cancel_after_answer": cancel, "requests": requests, "unloaded": unloaded,
                "seconds": round(time.monotonic() - started, 1)}
    finally:
        server.stop(timeout=5)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6, help="per way (with and without the cancel)")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--unload-timeout", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    work = Path("perf/out")
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for index in range(2 * args.trials):
        outcome = trial(index % 2 == 0, args.requests, args.unload_timeout, work / "stream_cancel_race.log")
        results.append(outcome)
        print(outcome, flush=True)
    lines = [f"Triton 2.51, {MODEL} on CPU, {args.requests} streamed requests per trial, {date.today().isoformat()}",
             "stop_stream after the final response | trials | version stranded (unload not done in "
             f"{args.unload_timeout:g} s)"]
    for cancel in (True, False):
        chosen = [r for r in results if r["cancel_after_answer"] == cancel]
        lines.append(f"{'cancel_requests=True' if cancel else 'cancel_requests=False'} | {len(chosen)} | "
                     f"{sum(not r['unloaded'] for r in chosen)}")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"cpu_stream_cancel_race_{date.today().isoformat()}"
    stem.with_suffix(".txt").write_text(table + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"args": {**vars(args), "out": str(args.out)}, "trials": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
