"""One instance on several processes (parallel.py): the row split's decisions, and real worker
processes joined over gloo on the CPU giving the single-process images."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from triton_diffusion.parallel import ParallelPlan, batch_rows, row_parts, take_rows
from triton_diffusion.pipeline import PipelineRunner
from triton_diffusion.requests import text_to_image
from triton_diffusion.settings import ModelSettings, SettingsError

CPU = {"device": "cpu", "torch_dtype": "float32", "torch_num_threads": 1}
PROMPTS = (("a red barn in snow", 1), ("a blue car on a road at night, photograph", 2), ("green apple", 3))


def test_rows_split_into_contiguous_parts_the_first_ranks_taking_the_remainder():
    assert row_parts(4, 2) == [(0, 2), (2, 4)]  # guidance rows [uncond; cond] of 2 requests: one half each
    assert row_parts(3, 2) == [(0, 2), (2, 3)]
    assert row_parts(1, 2) == [(0, 1), (1, 1)]  # one row, two ranks: the second gets none
    assert row_parts(7, 3) == [(0, 3), (3, 5), (5, 7)]


def test_only_arguments_with_the_batch_dimension_are_split():
    latents, positions, timestep = torch.zeros(4, 8, 3), torch.zeros(8, 3), torch.zeros(4)
    kwargs = {"hidden_states": latents, "img_ids": positions, "timestep": timestep, "scalar": torch.tensor(1.0),
              "added_cond_kwargs": {"text_embeds": torch.zeros(4, 5), "time_ids": torch.zeros(4, 6)},
              "x": [torch.zeros(3, 2)] * 4, "return_dict": False}
    assert batch_rows((), kwargs) == 4
    taken = take_rows(kwargs, 4, 2, 4)
    assert taken["hidden_states"].shape == (2, 8, 3) and taken["img_ids"] is positions and taken["timestep"].shape == (2,)
    assert taken["scalar"].dim() == 0 and taken["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    assert len(taken["x"]) == 2 and taken["return_dict"] is False


@pytest.mark.parametrize("value, message", [
    ("ring=2", "ring attention"), ("cfg=2,ulysses=2", "the two combined"), ("cfg=1", "N must be 2 to 16"),
    ("cfg=two", "the form is"),
])
def test_a_parallel_setting_that_cannot_be_served_fails_the_load_naming_it(value, message):
    with pytest.raises(ValueError, match=message):
        ParallelPlan.parse(value)
    with pytest.raises(SettingsError, match=message):
        ModelSettings.from_parameters({"pretrained_model": "random:sd15-tiny", "parallel": value})
    with pytest.raises(SettingsError, match="not served with batching=continuous"):
        ModelSettings.from_parameters({"pretrained_model": "random:sd15-tiny", "parallel": "cfg=2", "batching": "continuous"})


def test_a_worker_that_ran_out_of_memory_makes_the_calls_error_an_out_of_memory_one():
    """(So that the executor retries the rows in smaller calls, as on one device.)"""
    from types import SimpleNamespace

    from triton_diffusion.parallel import OUT_OF_MEMORY, Group, ParallelError
    from triton_diffusion.pipeline import is_out_of_memory

    group = Group(ModelSettings.build(pretrained_model="random:sd15-tiny", parallel="cfg=3"), "cpu")
    group.workers = [SimpleNamespace(poll=lambda: None), SimpleNamespace(poll=lambda: OUT_OF_MEMORY)]
    assert group.dead() == "rank 2 exited with 4 (out of memory)"
    assert is_out_of_memory(ParallelError(f"a parallel worker died during the call ({group.dead()})"))
    group.workers[1] = SimpleNamespace(poll=lambda: 3)
    assert not is_out_of_memory(ParallelError(f"a parallel worker died during the call ({group.dead()})"))


def test_a_worker_that_dies_while_loading_fails_the_load_at_once_naming_it():
    """The worker is killed as soon as it appears (a thread watching this process's children): the
    load fails with the worker's exit status rather than waiting in a collective, and nothing is left."""
    import threading

    import psutil

    from triton_diffusion.pipeline import ModelLoadError

    def kill_the_worker():
        while True:
            for child in psutil.Process().children(recursive=True):
                if "triton_diffusion.parallel" in " ".join(child.cmdline()):
                    child.kill()
                    return

    killer = threading.Thread(target=kill_the_worker, daemon=True)
    killer.start()
    with pytest.raises(ModelLoadError, match=r"parallel='cfg=2': the parallel workers did not load the model \(rank 1 exited with -9"):
        PipelineRunner.load(ModelSettings.build(pretrained_model="random:sd15-tiny", parallel="cfg=2", **CPU))
    killer.join(timeout=60)
    assert not [child for child in psutil.Process().children(recursive=True) if "triton_diffusion.parallel" in " ".join(child.cmdline())]


def test_sequence_parallel_is_refused_for_a_family_that_does_not_declare_it():
    from triton_diffusion.pipeline import ModelLoadError

    with pytest.raises(ModelLoadError, match="the stable-diffusion family is not served with sequence parallelism"):
        PipelineRunner.load(ModelSettings.build(pretrained_model="random:sd15-tiny", parallel="ulysses=2", **CPU))


def listening_beyond_loopback(pids) -> list:
    """The listening sockets of ``pids`` bound to anything but loopback."""
    import psutil

    return [(pid, connection.laddr) for pid in pids for connection in psutil.Process(pid).net_connections(kind="inet")
            if connection.status == psutil.CONN_LISTEN and connection.laddr.ip not in ("127.0.0.1", "::1")]


def images(runner, steps: int = 3, guidance: float = 5.0) -> list:
    items = [text_to_image(prompt, seed, steps, guidance, 64, 64) for prompt, seed in PROMPTS]
    return runner.run(items[0].params, items)


@pytest.mark.parametrize("arch, guidance, parallel", [
    ("sd15-tiny", 5.0, "cfg=2"),  # guidance rows [uncond; cond] in one call: each process denoises one half (CFG parallel)
    ("flux-dev-tiny", 3.5, "cfg=2"),  # guidance embedded: the requests' rows split 2 + 1
    ("flux-dev-tiny", 3.5, "ulysses=2"),  # each process holds half of every sequence (diffusers' context parallelism)
    ("z-image-turbo-tiny", 2.0, "cfg=2"),  # per-row lists of tensors, captions of different lengths
    ("qwen-image-tiny", 4.0, "cfg=2"),  # two denoiser calls per step (true CFG): each call's 3 rows split 2 + 1
])
def test_two_processes_give_the_single_process_images_and_a_dead_worker_fails_one_call_then_recovers(arch, guidance,
                                                                                                      parallel):
    alone = PipelineRunner.load(ModelSettings.build(pretrained_model=f"random:{arch}", **CPU))
    expected = images(alone, guidance=guidance)
    runner = PipelineRunner.load(ModelSettings.build(pretrained_model=f"random:{arch}", parallel=parallel, **CPU))
    try:
        assert len(runner.group.workers) == 1
        assert listening_beyond_loopback([os.getpid(), runner.group.workers[0].pid]) == []  # (closed by default)
        split = runner.group.row_split
        if split is not None:
            split.rows_run.clear()
        together = images(runner, guidance=guidance)
        for got, want in zip(together, expected):
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
        if split is not None:  # this process denoised its part of every call's rows: 3 of [3 uncond; 3 cond], or 2 of 3
            assert set(split.rows_run) == ({3} if arch in ("sd15-tiny", "z-image-turbo-tiny") else {2})
        else:  # the sequences were split by diffusers' hooks
            assert runner.text_to_image.transformer._parallel_config.context_parallel_config.ulysses_degree == 2
        # one request: the rows cannot split evenly, the images still equal
        one = text_to_image(*PROMPTS[1], 3, guidance, 64, 64)
        assert np.abs(runner.run(one.params, [one])[0].astype(int) - expected[1].astype(int)).max() <= 1
        # a worker killed mid-call (at the first step's callback) fails that call with a message ...
        worker = runner.group.workers[0]
        items = [text_to_image(prompt, seed, 3, guidance, 64, 64) for prompt, seed in PROMPTS]

        def kill_at_first_step(rows):
            if worker.poll() is None:
                worker.kill()
                worker.wait()
            return set()

        with pytest.raises(Exception, match="a parallel worker died during the call"):
            runner.run(items[0].params, items, kill_at_first_step)
        # ... and the next call starts the workers again and gives the same images
        again = runner.run(items[0].params, items)
        assert runner.group.restarts == 1 and runner.group.workers[0].poll() is None
        for got, want in zip(again, expected):
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    finally:
        runner.group.stop()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def test_paired_guidance_passes_divide_one_request_over_two_processes():
    """Qwen-Image runs true CFG as two denoiser calls of one row each; with ``batched_cfg`` they are one
    call of two rows (paired_cfg.py), which the row split divides: each process denoises one row of
    it, and the image equals the one-process, unpaired one."""
    arch, guidance = "qwen-image-tiny", 4.0
    one = text_to_image(*PROMPTS[0], 3, guidance, 64, 64)
    alone = PipelineRunner.load(ModelSettings.build(pretrained_model=f"random:{arch}", **CPU))
    expected = alone.run(one.params, [one])[0]
    runner = PipelineRunner.load(ModelSettings.build(pretrained_model=f"random:{arch}", parallel="cfg=2", batched_cfg=True, **CPU))
    try:
        got = runner.run(one.params, [one])[0]
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
        assert runner.pairing.stats.paired > 0 and max(runner.group.row_split.rows_run) == 1
    finally:
        runner.group.stop()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def test_served_a_parallel_instance_starts_its_worker_gives_the_one_process_images_and_ends_it(tmp_path):
    """Through tritonserver: ``parallel: "cfg=2"`` on stable_diffusion_tiny starts one worker process
    under the stub; a batch of requests gets the images the one-process model gives them; unloading
    (stopping the server) ends the worker."""
    import psutil

    from client import DiffusionClient, GenerationRequest
    from triton_diffusion import model_config

    from .conftest import batch_histogram, start_server

    repository = tmp_path / "repo"
    for name, parameters in (("sd_one", {}), ("sd_two", {"parallel": "cfg=2"})):
        model_config.write_model(repository, model_config.variant(name, parameters, base="stable_diffusion_tiny"))
    server = start_server(tmp_path, ["sd_one", "sd_two"], {"TRITONSERVER_DELAY_SCHEDULER": "3"}, repository=repository,
                          require_ready=True)
    try:
        workers = [child for child in psutil.Process(server.process.pid).children(recursive=True)
                   if "triton_diffusion.parallel" in " ".join(child.cmdline())]
        assert len(workers) == 1
        requests = [GenerationRequest(prompt, seed=seed, steps=3) for prompt, seed in PROMPTS]
        results = {}
        for name in ("sd_one", "sd_two"):
            with DiffusionClient(f"grpc://{server.grpc_url}", name, timeout_s=120) as client:
                results[name] = client.generate_many(requests, concurrency=3)
        assert batch_histogram(server, "sd_two") == {3: 1}
        for one, two in zip(results["sd_one"], results["sd_two"]):
            assert np.abs(one.array.astype(int) - two.array.astype(int)).max() <= 1
    finally:
        server.stop()
    assert not any(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE for worker in workers)
