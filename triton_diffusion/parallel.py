"""One model instance on several devices: classifier-free-guidance (row) parallel or sequence
parallel denoising.

``parallel: "cfg=N"`` or ``"ulysses=N"`` in config.pbtxt makes an instance span N processes, each
with the whole pipeline on its own device (the instance's device and the N-1 after it; CPU: N
processes on the CPU). The Triton stub is rank 0; at load it starts N-1 workers
(``python -m triton_diffusion.parallel``) and joins them in a torch.distributed group (NCCL on GPUs,
with NVLink multicast off; gloo on the CPU).

Every call runs on every rank, SPMD: rank 0 sends the call's parameters and rows (prompts, seeds,
sizes, never tensors) down each worker's stdin before running it, and each worker runs the same call
of the same pipeline with the same per-row generators, so text encoding, noise, scheduler steps and
decoding are the same everywhere without moving a tensor. Only the denoiser is divided:

- ``cfg=N``: a hook splits each denoiser call's rows (the batch dimension of every argument that has
  it) into N contiguous parts, each rank computes its part, and an all-gather puts the rows back
  together on every rank. A guidance call's rows are [unconditional; conditional] (or the reverse),
  so with N = 2 one device denoises the unconditional half and the other the conditional half: CFG
  parallel. Rows with no guidance split the same way, so a batch of requests is divided too.
- ``ulysses=N``: diffusers' context parallelism (``enable_parallelism``, Ulysses attention): each
  rank holds 1/N of every sequence, and attention exchanges heads for sequence by all-to-all. For
  the families that declare ``sequence_parallel`` (their transformer has a context-parallel plan and
  the pipeline pads captions to one length); this is what divides a single row.

Not yet: the two combined, ring attention, rows leaving a running call when their request is
cancelled (all ranks must run the same rows, so a cancelled row is computed and dropped at the end),
continuous batching, adapters, step caches. Qwen-Image's and Wan's guidance passes (two denoiser
calls) divide as one call under ``batched_cfg`` (the pairing hook stays outside the row split). A
worker that dies fails the call it was in (or the next one) with a message naming it, and the
instance starts its workers again before the call after.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Sequence

log = logging.getLogger("triton_diffusion")

HOOK_NAME = "triton_diffusion.parallel"
# NVLink multicast (NVLS, symmetric memory) is off: the lent hosts do not support it (KINDS.md).
NCCL_ENVIRONMENT = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
# Closed by default: the ranks are processes of one host, so gloo's and NCCL's sockets (NCCL's bootstrap;
# its data goes over NVLink or PCIe) listen on the loopback interface only (an operator's setting wins).
# The rendezvous is a file in a private folder, not a TCP store (which listens on every interface).
LOOPBACK_ENVIRONMENT = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}


def group_environment(environment: dict) -> dict:
    """``environment`` with what every rank of a group needs set (the operator's loopback choice kept)."""
    return {**LOOPBACK_ENVIRONMENT, **environment, **NCCL_ENVIRONMENT}


OUT_OF_MEMORY = 4  # a worker's exit status when its call ran out of memory


class ParallelError(RuntimeError):
    """The instance's group cannot run a call (a worker died or timed out); the message says which."""


@dataclass(frozen=True)
class ParallelPlan:
    """``parallel: "cfg=N"``: N ranks, each denoising a contiguous part of every denoiser call's rows;
    ``"ulysses=N"``: N ranks, each holding a part of every sequence (diffusers' context parallelism,
    Ulysses attention: heads exchanged by all-to-all around each attention)."""

    cfg: int = 1
    ulysses: int = 1

    @property
    def world(self) -> int:
        return self.cfg * self.ulysses

    @classmethod
    def parse(cls, text: str) -> "ParallelPlan":
        text = text.strip()
        if not text:
            return cls()
        match = re.fullmatch(r"(cfg|ulysses)\s*=\s*(\d+)", text)
        if not match:
            raise ValueError(f"parallel={text!r}: the form is \"cfg=N\" (N processes, each denoising part of every "
                             "call's rows) or \"ulysses=N\" (each holding part of every sequence); ring attention and "
                             "the two combined are not served yet")
        degree = int(match.group(2))
        if not 2 <= degree <= 16:
            raise ValueError(f"parallel={text!r}: N must be 2 to 16")
        return cls(**{match.group(1): degree})


# -- the decisions (pure: tested without processes) ---------------------------------------------------

def row_parts(rows: int, world: int) -> list[tuple[int, int]]:
    """The contiguous (start, end) of each rank's rows; the first ``rows % world`` ranks take one more.
    A rank may get none (fewer rows than ranks)."""
    size, extra = divmod(rows, world)
    parts, start = [], 0
    for rank in range(world):
        end = start + size + (rank < extra)
        parts.append((start, end))
        start = end
    return parts


def batch_rows(args: tuple, kwargs: dict) -> Optional[int]:
    """The row count of a denoiser call: its latents' batch dimension (``hidden_states``, ``sample``,
    Z-Image's list ``x``, or the first argument); None if there is none."""
    import torch

    for value in [kwargs.get(name) for name in ("hidden_states", "sample", "x")] + list(args[:1]):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
        if isinstance(value, list) and value:
            return len(value)
    return None


def take_rows(value: Any, rows: int, start: int, end: int) -> Any:
    """``value`` with only rows [start, end) where it has a batch dimension of ``rows`` (a tensor whose
    first dimension is ``rows``; a list of ``rows`` items, as Z-Image's per-row tensors or Qwen-Image's
    per-row image shapes and caption lengths; dicts and tuples of such inside); anything else (shared
    tensors such as positions, scalars) as it is."""
    import torch

    if isinstance(value, torch.Tensor):
        return value[start:end] if value.dim() > 0 and value.shape[0] == rows else value
    if isinstance(value, list) and len(value) == rows:
        return value[start:end]
    if isinstance(value, dict):
        return {key: take_rows(item, rows, start, end) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        taken = [take_rows(item, rows, start, end) for item in value]
        return type(value)(taken) if isinstance(value, tuple) else taken
    return value


# -- the hook: each rank denoises its rows, an all-gather joins them ----------------------------------

class RowParallel:
    """Splits every denoiser call's rows over the group's ranks and gathers the outputs."""

    def __init__(self, rank: int, world: int, group=None):
        self.rank, self.world, self.group = rank, world, group
        self.rows_run: list[int] = []  # per denoiser call, the rows this rank computed of it (tests, logs)

    def forward(self, original, args: tuple, kwargs: dict):
        import torch
        import torch.distributed as dist

        rows = batch_rows(args, kwargs)
        if rows is None:
            return original(*args, **kwargs)
        parts = row_parts(rows, self.world)
        start, end = parts[self.rank]
        self.rows_run.append(end - start)
        # A rank with no rows (fewer rows than ranks) still runs one, for the output's shape, and sends none of it.
        run_start, run_end = (start, end) if end > start else (0, 1)
        sample, rebuild = _sample_of(original(*take_rows(args, rows, run_start, run_end),
                                              **take_rows(kwargs, rows, run_start, run_end)))
        padded = torch.zeros((max(e - s for s, e in parts), *sample.shape[1:]), dtype=sample.dtype, device=sample.device)
        padded[:end - start] = sample[:end - start]
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded, group=self.group)
        return rebuild(torch.cat([part[:e - s] for part, (s, e) in zip(gathered, parts)]))


def _sample_of(output):
    """(the batch tensor of a denoiser's output, a function that puts a joined tensor back in its place)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output, lambda joined: joined
    if isinstance(output, tuple):
        first = output[0]
        if isinstance(first, list):  # Z-Image: a list of per-row tensors of one shape
            return torch.stack(first), lambda joined: (list(joined.unbind(0)), *output[1:])
        return first, lambda joined: (joined, *output[1:])
    return output.sample, lambda joined: type(output)(sample=joined)


def install(denoiser, rank: int, world: int, group=None) -> RowParallel:
    """Register the row split on ``denoiser`` as a diffusers hook, inside the guidance pairing's hook
    where there is one (paired_cfg.py: its one call of [cond; uncond] rows is what divides at batch 1)."""
    from diffusers.hooks import HookRegistry, ModelHook

    from . import paired_cfg

    split = RowParallel(rank, world, group)

    class _Hook(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            return split.forward(self.fn_ref.original_forward, args, kwargs)

    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    pairing = registry.get_hook(paired_cfg.HOOK_NAME)  # (the hook registered last runs outermost)
    if pairing is not None:
        registry.remove_hook(paired_cfg.HOOK_NAME, recurse=False)
    registry.register_hook(_Hook(), HOOK_NAME)
    if pairing is not None:
        registry.register_hook(pairing, paired_cfg.HOOK_NAME)
    return split


# -- the group: rank 0 (the Triton stub) and its workers ----------------------------------------------

def devices_for(device: str, world: int) -> list[str]:
    """Each rank's device: the instance's device and the ``world - 1`` after it (the CPU: all on it)."""
    if not device.startswith("cuda"):
        return [device] * world
    first = int(device.split(":")[1]) if ":" in device else 0
    return [f"cuda:{first + rank}" for rank in range(world)]


def _python() -> str:
    """This environment's interpreter (inside Triton's stub ``sys.executable`` is the stub)."""
    for candidate in (os.path.join(sys.prefix, "bin", "python3"), os.path.join(sys.prefix, "bin", "python"), sys.executable):
        if candidate and os.path.basename(candidate).startswith("python") and os.access(candidate, os.X_OK):
            return candidate
    raise ParallelError(f"no Python interpreter under {sys.prefix} to start the parallel workers with")


class Group:
    """Rank 0's side: starts the workers, sends each call down their stdin (a worker waits for the next
    call there, with no timeout; a call's collectives time out after ``timeout_s``), and restarts them
    after a failure."""

    def __init__(self, settings, device: str, runner=None, timeout_s: float = 1800):
        self.settings, self.device, self.runner, self.timeout_s = settings, device, runner, timeout_s
        self.plan = settings.calls.parallel_plan
        self.world = self.plan.world
        self.row_split: Optional[RowParallel] = None  # rank 0's row split (cfg=N)
        self.devices = devices_for(device, self.world)
        self.workers: list[subprocess.Popen] = []
        self.restarts = 0
        self.folder = ""  # the rendezvous file's private folder

    def start(self) -> "Group":
        """Start the workers and join them (each loads the model first: this waits for that)."""
        import torch.distributed as dist

        self.folder = tempfile.mkdtemp(prefix="triton-diffusion-parallel-")  # (0700: this user's alone)
        rendezvous = f"file://{os.path.join(self.folder, 'rendezvous')}"
        os.environ.update(group_environment(dict(os.environ)))  # (this rank's, and the workers' it starts)
        self.workers = [subprocess.Popen([_python(), "-m", "triton_diffusion.parallel", str(rank), str(self.world), rendezvous,
                                          self.devices[rank], str(self.timeout_s)], stdin=subprocess.PIPE)
                        for rank in range(1, self.world)]
        try:
            self._send(self.settings)
        except OSError:  # (a worker that exited already)
            pass
        self._wait_loaded()
        try:
            dist.init_process_group(_backend(self.device), init_method=rendezvous, rank=0,
                                    world_size=self.world, timeout=timedelta(seconds=self.timeout_s))
            if self.runner is not None:
                self.row_split = install_on(self.runner, 0, self.plan, self.row_split)
            dist.barrier()  # (after each worker loaded the model and installed the plan)
        except Exception as exc:  # noqa: BLE001 - gloo and NCCL raise many types
            self.stop()
            raise ParallelError(f"the parallel workers did not start ({self._dead()}): {type(exc).__name__}: {exc}") from None
        return self

    def _wait_loaded(self) -> None:
        """Until every worker has loaded the model (its marker file), before any collective: a worker
        that dies while loading (or takes longer than ``timeout_s``) fails the start at once, with its
        exit status, where a collective would wait for it."""
        deadline = time.monotonic() + self.timeout_s
        markers = [os.path.join(self.folder, f"loaded-{rank}") for rank in range(1, self.world)]
        while not all(os.path.exists(marker) for marker in markers):
            if self.dead() or time.monotonic() > deadline:
                problem = self.dead(settle_s=2.0) or f"not loaded after {self.timeout_s:.0f} s"
                self.stop()
                raise ParallelError(f"the parallel workers did not load the model ({problem}; their log is the server's)")
            time.sleep(0.1)

    def _send(self, message) -> None:
        line = pickle.dumps(message).hex().encode() + b"\n"
        for worker in self.workers:
            worker.stdin.write(line)
            worker.stdin.flush()

    def dead(self, settle_s: float = 0.0) -> str:
        """Which workers have exited, and how ("" if none), waiting up to ``settle_s`` for one to (a worker
        whose call failed exits; this rank's collective may fail before its exit status is known). A
        worker that ran out of memory says so, so that the call's error is an out-of-memory one (the
        executor retries it in smaller calls)."""
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline and all(worker.poll() is None for worker in self.workers):
            time.sleep(0.05)
        return "; ".join(f"rank {rank} exited with {worker.poll()}" + (" (out of memory)" if worker.poll() == OUT_OF_MEMORY else "")
                         for rank, worker in enumerate(self.workers, 1) if worker.poll() is not None)

    def _dead(self) -> str:
        return self.dead() or "every worker is running"

    def announce(self, call: tuple) -> None:
        """Send a call (picklable, small) to every worker before running it here; first start the
        workers again if one has exited since the last call."""
        if any(worker.poll() is not None for worker in self.workers):
            self.restart(self._dead())
        try:
            self._send(call)
        except OSError:  # (a worker exited just now)
            self.restart(self._dead())
            self._send(call)

    def failed(self) -> None:
        """This rank's call failed: a worker may wait in a collective of it, or be gone; stop them all
        (the next call starts them again)."""
        for worker in self.workers:
            worker.kill()
            worker.wait()

    def restart(self, why: str) -> None:
        import torch.distributed as dist

        log.warning("parallel: starting the workers again: %s", why)
        self.stop()
        if dist.is_initialized():
            dist.destroy_process_group()
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        for worker in self.workers:
            try:
                worker.stdin.close()  # (end of input: the worker exits)
                worker.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                worker.kill()
                worker.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def worker_main(argv: Sequence[str]) -> int:
    """A worker: load the model as rank 0 did, then run every call rank 0 sends until its input ends.
    A call that fails here ends the worker (rank 0's collective then fails, and it starts a new one):
    carrying on could leave the ranks in different collectives."""
    import torch
    import torch.distributed as dist

    from .pipeline import PipelineRunner, is_out_of_memory

    rank, world, rendezvous, device, timeout_s = int(argv[0]), int(argv[1]), argv[2], argv[3], float(argv[4])
    messages = (pickle.loads(bytes.fromhex(line.strip())) for line in sys.stdin if line.strip())
    settings = next(messages)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    runner = PipelineRunner.load(settings, device, worker=True)
    open(os.path.join(os.path.dirname(rendezvous.removeprefix("file://")), f"loaded-{rank}"), "w").close()
    dist.init_process_group(_backend(device), init_method=rendezvous, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    install_on(runner, rank, settings.calls.parallel_plan)
    dist.barrier()  # (rank 0's install is before its barrier too: the mesh is made by all ranks together)
    for params, items in messages:
        try:
            runner.run_here(params, items)
        except Exception as exc:  # noqa: BLE001
            log.error("parallel rank %d: the call failed: %s: %s", rank, type(exc).__name__, exc)
            return OUT_OF_MEMORY if is_out_of_memory(exc) else 3
    dist.destroy_process_group()
    return 0


def install_on(runner, rank: int, plan: ParallelPlan, installed: Optional[RowParallel] = None) -> Optional[RowParallel]:
    """The plan on the runner's denoiser (one module, whichever pipeline calls it): the row split
    (returned; ``installed``: already there, it reads the current default group at every call), or
    diffusers' context parallelism (bound to the group: installed again when the group starts anew)."""
    from .acceleration import denoiser_of

    denoiser = denoiser_of(runner.text_to_image)
    if plan.cfg > 1:
        return installed or install(denoiser, rank, plan.cfg)
    sequence_parallel(denoiser, plan.ulysses, runner.device)
    return None


def sequence_parallel(denoiser, degree: int, device: str) -> None:
    """diffusers' context parallelism (Ulysses) on ``denoiser``, over the default process group."""
    import contextlib
    from unittest import mock

    import torch
    from diffusers import ContextParallelConfig
    from diffusers.hooks.context_parallel import remove_context_parallel

    if getattr(denoiser, "_parallel_config", None) is not None:  # (the group was started anew: bind the new one)
        remove_context_parallel(denoiser, denoiser._cp_plan)
        denoiser._parallel_config = None
    # diffusers places a rank on ``rank % torch.accelerator.device_count()``, which is 0 on the CPU: there,
    # every rank's device is the CPU.
    cpu = mock.patch.object(torch.accelerator, "device_count", lambda: 1) if not device.startswith("cuda") else contextlib.nullcontext()
    with cpu:
        denoiser.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s parallel %(message)s")
    raise SystemExit(worker_main(sys.argv[1:]))
