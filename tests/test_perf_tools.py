"""The benchmark tools run for real against a live server (short, bounded, loopback only)."""

import csv
import math
import subprocess
import sys
import time
from pathlib import Path

from client import DiffusionClient, GenerationRequest

from .conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


def test_short_locust_run_has_no_failures_and_writes_csv(server, tmp_path):
    # The run must be long enough for each user to finish a few requests: size it from how long a
    # batch of four takes on this machine now (seconds quiet, much longer beside busy processes).
    with DiffusionClient(f"grpc://{server.grpc_url}", TINY) as client:
        started = time.perf_counter()
        client.generate_many([GenerationRequest(f"probe {i}", seed=i, height=128, width=128) for i in range(4)], concurrency=4)
        batch_seconds = time.perf_counter() - started
    duration = max(12, math.ceil(4 * batch_seconds))
    completed = subprocess.run(
        [sys.executable, str(ROOT / "perf" / "load.py"), "--host", server.grpc_url, "--http-host", server.http_url,
         "--users", "4", "--spawn-rate", "4", "--duration", f"{duration}s", "--sizes", "64x64,128x128",
         "--i2i-ratio", "0.3", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=duration + 300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    stats_file = next(tmp_path.glob("locust-*_stats.csv"))
    rows = {row["Name"]: row for row in csv.DictReader(stats_file.open())}
    assert int(rows["Aggregated"]["Request Count"]) >= 4
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert any(name.startswith("text-to-image") for name in rows)
    assert "realized batch sizes" in completed.stdout
    assert next(tmp_path.glob("locust-*.png")).stat().st_size > 0


def test_perf_analyzer_sweep_writes_csv_and_plot(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(ROOT / "perf" / "sweep.py"), "--variants", "tiny_none,tiny_dynamic_p16",
         "--concurrency", "4", "--min-requests", "8", "--steps", "2", "--size", "64", "--out", str(tmp_path),
         # a smoke test of the tool, not a measurement: on a busy machine windows vary by more than 100%
         "--stability-percentage", "10000"],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    rows = list(csv.DictReader(next(tmp_path.glob("sweep-*.csv")).open()))
    assert {r["model"] for r in rows} == {"tiny_none", "tiny_dynamic_p16"}
    none = next(r for r in rows if r["model"] == "tiny_none")
    assert float(none["mean_batch"]) == 1.0  # no batching: one execution per request
    # Four clients and a 100 ms wait for a batch of 16: perf_analyzer resends within that window,
    # so executions hold several requests (4 when all arrive in time).
    dynamic = next(r for r in rows if r["model"] == "tiny_dynamic_p16")
    assert float(dynamic["mean_batch"]) >= 2.0, dynamic
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    assert next(tmp_path.glob("sweep-*.png")).stat().st_size > 0


def readme_perf_analyzer_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return [line for line in readme.splitlines() if line.startswith("perf_analyzer -m ")]


def test_the_readme_perf_analyzer_recipe_runs_as_written(server):
    """The README's perf_analyzer lines, only the server address changed: every request succeeds and
    requests share executions (all entries send the same inputs)."""
    from perf.sweep import perf_analyzer_binary
    from testing import harness

    commands = readme_perf_analyzer_commands()
    assert len(commands) == 3
    for command in commands:
        model = command.split()[2]
        if server.model_states().get(model, {}).get("state") != "READY":
            server.load_model(model)  # the session server starts with the tiny model only
        before = harness.Stats.read(server, model)
        failures_before = harness.metric(server, "nv_inference_request_failure", model)
        program, *arguments = command.replace("localhost:8001", server.grpc_url).split()
        completed = subprocess.run([perf_analyzer_binary(), *arguments], capture_output=True, text=True, cwd=ROOT)
        assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
        delta = harness.wait_until(lambda: (d := harness.Stats.read(server, model) - before).inferences >= 24 and d,
                                   "perf_analyzer's requests counted")
        assert harness.metric(server, "nv_inference_request_failure", model) == failures_before
        assert delta.executions < delta.inferences, f"no request shared an execution: {delta.histogram}"


def test_the_open_loop_benchmark_compares_both_batching_modes_on_the_same_arrivals(tmp_path):
    """perf/open_loop.py on the tiny FLUX (both models in one server, ``--together``): both modes
    measured at the same rates, a table, a JSON and a plot written."""
    import json

    completed = subprocess.run(
        [sys.executable, str(ROOT / "perf" / "open_loop.py"), "--arch", "flux-dev-tiny", "--device", "cpu", "--size", "64",
         "--steps", "2,4", "--max-rows", "2", "--fractions", "0.5", "--requests", "6", "--together", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    saved = json.loads(next(tmp_path.glob("open_loop_CPU_*_flux-dev-tiny_mixed-steps.json")).read_text())
    dynamic, continuous = saved["results"]["dynamic"], saved["results"]["continuous"]
    assert [p["rate"] for p in dynamic["points"]] == [p["rate"] for p in continuous["points"]]
    assert all(p["n"] == 6 and p["p99_s"] >= p["p50_s"] > 0 for p in dynamic["points"] + continuous["points"])
    assert sum(continuous["admissions"].values()) >= 6
    assert continuous["running_batch"]["mean_rows"] >= 1 and dynamic["running_batch"]["steps"] == 0
    assert continuous["points"][0]["running_batch"]["steps"] > 0 and len(continuous["points"][0]["latencies_s"]) == 6
    assert "p50 ratio" in completed.stdout
    assert next(tmp_path.glob("open_loop_*.png")).stat().st_size > 0


def test_the_adherence_tables_are_generated_from_the_results():
    """docs/tiny-model.md's adherence tables equal what perf/adherence.py makes of the results files."""
    from perf import adherence

    assert adherence.main(["--check-docs"]) == 0, "stale adherence tables: python perf/adherence.py --docs"


def test_the_quality_speed_table_is_generated_from_the_results():
    from perf import quality_speed

    assert quality_speed.main(["--check-docs"]) == 0, "stale quality table: python perf/quality_speed.py --docs"


def test_the_cache_drift_table_is_generated_from_the_results():
    from perf import cache_drift

    assert cache_drift.main(["--check-docs"]) == 0, "stale table: python perf/cache_drift.py --docs"


def test_the_headline_tables_are_generated_from_the_results_and_show_the_shipped_knobs():
    """README's and docs/benchmarks.md's headline tables equal what perf/headline.py makes of the
    results files, and each measured row ran at the size it names with exactly the speed knobs its
    shipped config has."""
    import json

    from perf import headline
    from triton_diffusion import model_config

    assert headline.main(["--check"]) == 0, "stale headline table: python perf/headline.py"
    for model, size, stem in headline.ROWS:
        shipped = model_config.parameters(model_config.shipped(model))
        if stem is None:
            continue
        assert headline.measured_size(stem) == size, (model, size, stem)
        measured = json.loads((headline.RESULTS / f"{stem}.json").read_text())["results"][0]["speed_parameters"]
        knobs = set(headline._KNOBS)
        assert ({k: v for k, v in measured.items() if k in knobs} == {k: v for k, v in shipped.items() if k in knobs}), model


def test_the_lora_tables_are_generated_from_the_results():
    from perf import lora_bench

    assert lora_bench.main(["--check-docs"]) == 0, "stale LoRA tables: python -m perf.lora_bench --docs"


def test_the_parallel_bench_serves_each_config_and_writes_its_table(tmp_path):
    """perf/parallel_bench.py on the CPU (its check run): one device and cfg=2 served in turn, c=1 and a
    closed loop each, one results file with both rows."""
    import json

    completed = subprocess.run(
        [sys.executable, "-m", "perf.parallel_bench", "--arch", "flux-dev-tiny", "--device", "cpu", "--size", "64",
         "--steps", "2", "--speed", "eager", "--configs", "none,cfg=2", "--requests", "2", "--concurrency", "2",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("parallel_bench_*.json")).read_text())
    assert set(result["configs"]) == {"none", "cfg=2"} and result["configs"]["cfg=2"]["devices"] == 2
    assert all(len(config["c1"]["latencies"]) == 2 and config["loop"]["failures"] == 0 for config in result["configs"].values())
    assert "| cfg=2 | 2 |" in completed.stdout


def test_the_warm_up_bench_times_each_warm_up_call_and_counts_compilations_after_it(tmp_path):
    """perf/warmup_bench.py on the CPU (its check run): Z-Image's warm-up calls, timed with the graphs
    each compiled, then VBench prompts at the warmed batch sizes compile nothing (exit status 0)."""
    import json

    completed = subprocess.run(
        [sys.executable, "-m", "perf.warmup_bench", "--arch", "z-image-turbo-tiny", "--device", "cpu", "--size", "64",
         "--steps", "2", "--batch-sizes", "1,3", "--calls", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("warmup_bench_*.json")).read_text())
    assert len(result["warmup_calls"]) == result["warmup"]["calls"] == 6  # 3 prompt rounds x 2 batch sizes
    assert sum(call["graphs"] for call in result["warmup_calls"]) == result["warmup"]["compiled_graphs"] > 0
    assert result["after_warmup"]["compiled_graphs"] == 0 and len(result["after_warmup"]["seconds"]["3"]) == 2
    assert 0 < max(result["compile_phases_s"].values()) <= result["warmup"]["seconds"]


def test_the_gpu_bench_check_run_serves_and_traces_each_batch_it_formed(tmp_path):
    """perf/gpu_bench.py on the CPU (its check run; the GPU host is too scarce to find a broken harness
    there): offline and served interleaved, a tax for every batch size formed, the backend's seconds per
    stage, no pipeline call out of memory, and the size in the results file's name."""
    import json

    completed = subprocess.run(
        [sys.executable, "perf/gpu_bench.py", "--archs", "z-image-turbo-tiny", "--device", "cpu", "--size", "64",
         "--steps", "2", "--repeats", "1", "--modes", "dynamic", "--concurrency", "1,2", "--batch-sizes", "1,2",
         "--max-batch", "2", "--min-requests", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("gpu_bench_*_z-image-turbo-tiny_64x64_eager.json")).read_text())["results"][0]
    for level in result["served"]["dynamic"].values():
        assert level["failures"] == 0 and set(level["server_tax"]) == set(level["histogram"])
        assert set(level["server_tax"]) <= set(result["offline"])
        assert level["stage_s_per_execution"]["pipeline"] > 0 and level["pipeline_calls"]["out_of_memory"] == 0
        assert level["pipeline_calls"]["ok"] == sum(level["histogram"].values())
    assert "s per execution: validate / pipeline / respond" in completed.stdout


def test_an_offline_call_runs_the_prompts_and_seeds_of_its_repeats_first_served_requests():
    from argparse import Namespace

    from perf.gpu_bench import items_for, repeat_offset
    from perf.prompts import prompt_at

    prompts = [f"prompt {i}" for i in range(50)]
    args = Namespace(steps=2, size="64", frames=0)
    for repeat in (0, 1):
        items = items_for(prompts, 3, args, "z-image-turbo-tiny", offset=repeat_offset(repeat))
        served = [(prompt_at(prompts, repeat_offset(repeat) + i), repeat_offset(repeat) + i) for i in range(3)]
        assert [(item.prompt, item.seed) for item in items] == served
