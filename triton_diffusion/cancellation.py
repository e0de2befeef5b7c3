"""Stop cancelled requests inside a running diffusers call, one row at a time.

A chunk is one pipeline call over several requests. When one of them is cancelled mid-denoise,
its rows are dropped from the call at the next step (``callback_on_step_end``) and its batch-mates
go on with a smaller batch. Dropping a row means slicing every batch-sized tensor the denoising
loop carries from step to step:

- the tensors the pipeline hands to the callback and takes back (latents, text embeddings; under
  classifier-free guidance the embeddings are ``[negative; positive]``, twice the batch),
- the scheduler's history (PNDM's ``ets``, DPM-Solver's ``model_outputs``, ...): tensors shaped
  like the latents,
- the list of per-row generators, which the scheduler reads for its noise (ancestral samplers):
  it is shrunk in place, since the pipeline holds the same list object.

- batch-sized tensors a pipeline builds before its loop and never hands to the callback (FLUX's
  guidance and pooled text embedding): a forward pre-hook on the denoiser slices those arguments
  to the live rows on every call after a drop.

Only pipelines whose per-row loop state is known are shrunk: their family declares a ``ShrinkSpec``
(``families/``) once a test showed batch-mates still equal their solo images. Others keep computing a cancelled
row until the call ends; its result is discarded. With every row cancelled, any pipeline is
interrupted at the next step.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

from . import lora, row_cache
from .acceleration import denoiser_of
from .families import ShrinkSpec, shrink_spec

log = logging.getLogger(__name__)


def _slice_rows(tensor, rows: int, keep):
    """``tensor`` with only the kept rows; a ``[negative; positive]`` tensor (2x rows) keeps both halves."""
    import torch

    if tensor.shape[0] == rows:
        return tensor[keep]
    if tensor.shape[0] == 2 * rows:
        return torch.cat([tensor[:rows][keep], tensor[rows:][keep]])
    raise ValueError(f"a tensor of batch {tensor.shape[0]} in a call of {rows} rows")


def _shrink_scheduler_state(scheduler, rows: int, keep, latent_shape) -> None:
    """Slice the scheduler's latent-shaped history tensors (and lists of them) to the kept rows."""
    import torch

    def is_row_state(value) -> bool:
        return isinstance(value, torch.Tensor) and value.dim() == len(latent_shape) and value.shape[0] == rows and tuple(
            value.shape[1:]
        ) == tuple(latent_shape[1:])

    for name, value in list(vars(scheduler).items()):
        if is_row_state(value):
            setattr(scheduler, name, value[keep])
        elif isinstance(value, (list, tuple)) and any(is_row_state(v) for v in value):
            shrunk = [v[keep] if is_row_state(v) else v for v in value]
            setattr(scheduler, name, type(value)(shrunk) if isinstance(value, tuple) else shrunk)


def per_row_checks(checks: Sequence[Callable[[], bool]]) -> Callable[[Sequence[int]], set]:
    """``cancelled_rows`` from one check per row (benchmarks and tests; the server asks per request)."""
    return lambda live: {row for row in live if checks[row]()}


def never_cancelled(_live: Sequence[int]) -> set:
    return set()


class RowCancellation:
    """A ``callback_on_step_end`` that drops cancelled rows and interrupts when none is left.

    ``cancelled_rows(live)`` is called once per step with the rows (original indices) still in the
    call and returns those whose requests were cancelled. After the call, ``live`` holds the rows
    that the pipeline's output images belong to, in order, and ``dropped`` the rows whose images
    were not finished (``wanted`` lists the others).
    """

    def __init__(self, rows: int, cancelled_rows: Callable[[Sequence[int]], set], generators: list,
                 filler_rows: int = 0, can_shrink: bool = True):
        """``filler_rows``: the last rows only pad the call to a warmed batch size (nobody waits for
        them); ``can_shrink=False`` keeps the batch size fixed (static compiled graphs), so a
        cancelled row rides to the end unless every row is cancelled."""
        self.rows = rows
        self.cancelled_rows = cancelled_rows
        self.generators = generators
        self.requested_rows = rows - filler_rows
        self.can_shrink = can_shrink
        self.live = list(range(rows))
        self.dropped: dict[int, int] = {}  # row -> step after which it was dropped
        self.spec: Optional[ShrinkSpec] = None
        self._hook = None

    def wanted(self) -> list[tuple[int, int]]:
        """``(row, position in the pipeline's output)`` of each row whose image was finished."""
        return [(row, position) for position, row in enumerate(self.live)
                if row not in self.dropped and row < self.requested_rows]

    def tensor_inputs(self, pipe) -> list[str]:
        """What to ask the pipeline for (``callback_on_step_end_tensor_inputs``)."""
        self.spec = shrink_spec(pipe) if self.can_shrink else None
        return list(self.spec.callback_inputs if self.spec else ("latents",))

    def close(self) -> None:
        """Remove the denoiser hook (after the call)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _slice_denoiser_arguments(self, _module, args, kwargs):
        """Forward pre-hook: arguments still at the full batch size keep only the live rows."""
        import torch

        rows, current = self.rows, len(self.live)
        for name in self.spec.denoiser_arguments:
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows != current:
                kwargs[name] = value[torch.tensor(self.live, device=value.device)]
        return args, kwargs

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        wanted = [row for row in self.live if row < self.requested_rows and row not in self.dropped]
        gone = sorted(self.cancelled_rows(wanted))
        if not gone:
            return callback_kwargs
        if len(gone) == len(wanted):
            pipe._interrupt = True  # nobody is waiting for this call any more
            self.dropped.update((row, step) for row in gone)
            return callback_kwargs
        if self.spec is None:  # the batch cannot shrink: the rows ride to the end, unwanted
            self.dropped.update((row, step) for row in gone)
            return callback_kwargs
        return self._drop(pipe, step, gone, callback_kwargs)

    def _drop(self, pipe, step: int, gone: list[int], callback_kwargs: dict) -> dict:
        import torch

        rows = len(self.live)
        positions = [position for position, row in enumerate(self.live) if row not in gone]
        keep = torch.tensor(positions, device=callback_kwargs["latents"].device)
        latent_shape = tuple(callback_kwargs["latents"].shape)
        try:
            shrunk = {name: _slice_rows(callback_kwargs[name], rows, keep) for name in self.spec.callback_inputs}
        except ValueError as exc:  # unexpected layout: keep computing rather than corrupt batch-mates
            log.warning("cannot drop cancelled rows from %s: %s", type(pipe).__name__, exc)
            return callback_kwargs
        _shrink_scheduler_state(pipe.scheduler, rows, keep, latent_shape)
        row_cache.keep_rows(denoiser_of(pipe), positions, rows)
        lora.keep_rows(denoiser_of(pipe), positions)
        self.generators[:] = [self.generators[position] for position in positions]
        for row in gone:
            self.dropped[row] = step
        self.live = [self.live[position] for position in positions]
        if self.spec.denoiser_arguments and self._hook is None:
            self._hook = getattr(pipe, self.spec.denoiser).register_forward_pre_hook(
                self._slice_denoiser_arguments, with_kwargs=True
            )
        callback_kwargs.update(shrunk)
        return callback_kwargs
