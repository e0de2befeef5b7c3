"""First-block cache that decides per row, so that a cached image does not depend on its batch-mates.

diffusers' ``FirstBlockCache`` runs the first transformer block, compares its residual with the one
kept from the last computed step, and then skips the remaining blocks (reusing their kept residual)
or runs them, for the whole batch at once, from one number averaged over all rows. A request's
image then depends on what it was batched with, which breaks this server's first promise (a
batched request gets the image it would get alone).

Here each row keeps its own residuals and decides alone, with the same rule and threshold:

    skip row i  <=>  mean|r_i - r_i,kept| / mean|r_i,kept| <= threshold

where r_i is row i's first-block residual this step and r_i,kept the one from the last step at which
row i ran every block. Rows that compute run the remaining blocks together, on only their rows (every
batch-sized block argument sliced to them); rows that skip pass through and get their kept tail
residual added at the last block. All rows skipping or all computing take the plain paths.

Per ``cache_context`` (the pipeline's "cond" and "uncond" passes each keep their own residuals, as
diffusers' does). A call whose batch differs from the kept state's (a new call, a cancelled row)
computes every row and starts over.

Continuous batching (a running batch whose rows join, leave and sit at different steps) keeps the
residuals with each row instead: before each denoiser call its step adapter names, in the call's
order, every denoiser row's own store (``resume``); the head gathers the kept residuals from them
(zero-padded or cut to this call's sequence length: past a row's own tokens there is only padding)
and a row without any computes; after the call ``suspend`` puts each opted-in row's residuals back.
A row's decisions then depend on its own history alone, whatever joined or left around it.

``config.pbtxt``'s ``step_cache: "FirstBlockCache threshold=..."`` applies this one (acceleration.py);
the other diffusers caches still decide per batch.
"""

from __future__ import annotations

from typing import Optional

HEAD_HOOK, BLOCK_HOOK = "triton_diffusion.row_cache.head", "triton_diffusion.row_cache.block"
# The step caches (``step_cache``'s first word, with or without diffusers' "Config") this module runs.
PER_ROW_CACHES = ("FirstBlockCache", "FirstBlockCacheConfig")
ONE_PASS = "all rows"  # the context name where the pipeline names none
# Block keyword arguments that are never per-row even when their first dimension happens to equal the
# batch (positional ones go by their shape: Z-Image passes its per-row rotary table positionally).
_NOT_PER_ROW = ("rotary", "freqs", "pos_embed", "position")


def decides_per_row(step_cache: str) -> bool:
    """Whether a ``step_cache`` setting runs as this per-row cache (and so takes STEP_CACHE per request)."""
    return (step_cache.split() or [""])[0] in PER_ROW_CACHES


def rows_to_compute(residual, kept, threshold: float, tokens=None):
    """Bool [B]: which rows run the remaining blocks (their first-block residual moved more than
    ``threshold``, relative, since the residual kept for them). ``tokens`` (bool [B, L], optional):
    each row's own tokens, where rows of different lengths are padded to the batch's (the padding
    differs with the batch-mates, so it must not count)."""
    change, scale = (residual - kept).abs().float(), kept.abs().float()
    if tokens is not None:
        weight = tokens.view(*tokens.shape, *[1] * (residual.dim() - tokens.dim())).float()
        return (change * weight).flatten(1).sum(dim=1) / (scale * weight).flatten(1).sum(dim=1) > threshold
    return change.flatten(1).mean(dim=1) / scale.flatten(1).mean(dim=1) > threshold


class RowState:
    """One pass's kept residuals, row by row."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.head_residual = None  # [B, ...] first-block residual at each row's last computed step
        self.tail_residuals: Optional[tuple] = None  # (hidden, encoder hidden or None) added to a skipping row
        self.head_output: Optional[tuple] = None  # this step's first-block output (hidden, encoder hidden or None)
        self.compute = None  # bool [B] this step; None: every row
        self.rows = None  # long [k]: the computing rows, when some skip


def _split(output, metadata):
    """A block's output -> (hidden states, encoder hidden states or None)."""
    if isinstance(output, tuple):
        encoder = None if metadata.return_encoder_hidden_states_index is None else output[
            metadata.return_encoder_hidden_states_index]
        return output[metadata.return_hidden_states_index], encoder
    return output, None


def _joined(hidden, encoder, like, metadata):
    """(hidden, encoder hidden) -> a block's output shaped as ``like``."""
    if not isinstance(like, tuple):
        return hidden
    output = list(like)
    output[metadata.return_hidden_states_index] = hidden
    if metadata.return_encoder_hidden_states_index is not None:
        output[metadata.return_encoder_hidden_states_index] = encoder
    return tuple(output)


def _rows_of(value, batch: int, rows, name: str = ""):
    """``value`` with only ``rows`` where it is per-row (a tensor whose first dimension is the batch)."""
    import torch

    if any(part in name for part in _NOT_PER_ROW):
        return value
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows)
    if isinstance(value, (tuple, list)):
        return type(value)(_rows_of(item, batch, rows) for item in value)
    if isinstance(value, dict):
        return {key: _rows_of(item, batch, rows, key) for key, item in value.items()}
    return value


def _per_row(mask, like):
    """A bool [B] mask shaped to broadcast over ``like`` [B, ...]."""
    return mask.view(-1, *[1] * (like.dim() - 1))


def apply(denoiser, threshold: float, block_arguments: tuple = ()) -> None:
    """Register the per-row first-block cache on ``denoiser``'s transformer blocks (diffusers hooks).
    ``block_arguments``: (the blocks' hidden-states argument, their token-mask argument), where
    diffusers' block registry has them wrong (the block's output is then the hidden states alone)."""
    import torch
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
    from diffusers.hooks.hooks import BaseState, CacheContext, HookRegistry, ModelHook, StateManager

    class _State(RowState, BaseState):
        pass

    class _Passes(StateManager):
        def get_state(self):
            if self._context is None:  # a pipeline that names no cache context (Z-Image: its guidance rows in one call)
                self.set_context(CacheContext(ONE_PASS))
            return super().get_state()

    passes = _Passes(_State)
    cache = _Cache(passes)
    blocks = [block for name, child in denoiser.named_children()
              if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList) for block in child]
    if len(blocks) < 2:
        raise ValueError(f"{type(denoiser).__name__} has {len(blocks)} transformer blocks; a first-block cache needs 2 or more")
    declared, mask_argument = None, None
    if block_arguments:  # the block's output is its hidden states alone
        hidden_argument, mask_argument = block_arguments
        declared = TransformerBlockMetadata(return_hidden_states_index=0, hidden_states_argument_name=hidden_argument)
        declared._cls = type(blocks[0])

    class _OnBlock(ModelHook):
        def initialize_hook(self, module):
            self.metadata = declared or TransformerBlockRegistry.get(type(module))  # where the block's outputs are
            return module

    class _Head(_OnBlock):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self.passes = passes

        def new_forward(self, module, *args, **kwargs):
            hidden_in = self.metadata._get_parameter_from_args_kwargs(self.metadata.hidden_states_argument_name, args, kwargs)
            output = self.fn_ref.original_forward(*args, **kwargs)
            hidden, encoder = _split(output, self.metadata)
            residual = hidden - hidden_in
            state = self.passes.get_state()
            state.head_output = (hidden, encoder)
            state.rows = None
            if cache.resumed is not None:  # continuous: the rows' own stores
                allowed = _gather(cache, state, residual, hidden, encoder)
            elif cache.rows_named:
                raise RuntimeError("the per-row step cache runs in a running batch only with each call's rows named "
                                   "(row_cache.resume)")
            elif (state.tail_residuals is None or state.head_residual is None
                  or state.head_residual.shape != residual.shape):
                state.compute, state.head_residual, state.tail_residuals = None, residual, None
                return output
            else:
                allowed = _allowed(cache.allowed, residual.shape[0])
            if allowed is not None and not allowed[1]:  # no row of this call asked for the cache
                state.compute, state.head_residual = None, residual
                return output
            tokens = mask_argument and self.metadata._get_parameter_from_args_kwargs(mask_argument, args, kwargs)
            compute, every, none = _decide(residual, state.head_residual, threshold,
                                           None if allowed is None else allowed[0], tokens)
            if every:
                state.compute, state.head_residual = None, residual
                return output
            state.compute = compute
            state.head_residual = torch.where(_per_row(compute, residual), residual, state.head_residual)
            if none:  # every row skips: the rest of the blocks pass it through
                tail_hidden, tail_encoder = state.tail_residuals
                return _joined(hidden + tail_hidden, encoder if tail_encoder is None else encoder + tail_encoder,
                               output, self.metadata)
            state.rows = compute.nonzero().flatten()
            return output

        def reset_state(self, module):
            self.passes.reset()
            return module

    class _Block(_OnBlock):
        def __init__(self, tail: bool):
            super().__init__()
            self.tail = tail

        def new_forward(self, module, *args, **kwargs):
            state = passes.get_state()
            if state.compute is None:  # every row computes
                output = self.fn_ref.original_forward(*args, **kwargs)
                if self.tail:
                    self._keep_tail(state, *_split(output, self.metadata), None)
                return output
            metadata = self.metadata
            hidden_in = metadata._get_parameter_from_args_kwargs(metadata.hidden_states_argument_name, args, kwargs)
            encoder_in = (None if metadata.return_encoder_hidden_states_index is None else
                          metadata._get_parameter_from_args_kwargs(metadata.encoder_hidden_states_argument_name, args, kwargs))
            like = hidden_in if encoder_in is None else _joined(hidden_in, encoder_in, (None, None), self.metadata)
            if state.rows is None:  # every row skips: the head already added the kept residual
                return like
            batch, rows = hidden_in.shape[0], state.rows
            output = self.fn_ref.original_forward(*_rows_of(args, batch, rows),
                                                  **_rows_of(kwargs, batch, rows))
            computed_hidden, computed_encoder = _split(output, self.metadata)
            hidden = hidden_in.index_copy(0, rows, computed_hidden)
            encoder = None if encoder_in is None or computed_encoder is None else encoder_in.index_copy(0, rows, computed_encoder)
            if self.tail:
                hidden, encoder = self._keep_tail(state, hidden, encoder, rows)
            return _joined(hidden, encoder, output if isinstance(output, tuple) else hidden, self.metadata)

        @staticmethod
        def _keep_tail(state, hidden, encoder, rows):
            """At the last block: keep the computing rows' tail residuals; the skipping rows' output is
            their first-block output plus their kept residual."""
            head_hidden, head_encoder = state.head_output
            hidden_residual = hidden - head_hidden
            encoder_residual = None if encoder is None else encoder - head_encoder
            if rows is None:
                state.tail_residuals = (hidden_residual, encoder_residual)
                return hidden, encoder
            kept_hidden, kept_encoder = state.tail_residuals
            computed = _per_row(state.compute, hidden)
            hidden, kept_hidden = (torch.where(computed, hidden, head_hidden + kept_hidden),
                                   torch.where(computed, hidden_residual, kept_hidden))
            if encoder is not None:
                computed = _per_row(state.compute, encoder)
                encoder, kept_encoder = (torch.where(computed, encoder, head_encoder + kept_encoder),
                                         torch.where(computed, encoder_residual, kept_encoder))
            state.tail_residuals = (kept_hidden, kept_encoder)
            return hidden, encoder

    @torch.compiler.disable
    def _decide(residual, kept, limit, allowed, tokens):
        """(bool [B] on the residual's device, every row computes, no row computes): decided on the
        host, as diffusers' ``.item()``, outside any compiled graph; counts the skips. A row not
        ``allowed`` to skip computes."""
        decided = rows_to_compute(residual, kept, limit, tokens if tokens is not None and tokens.dim() == 2 else None).cpu()
        if allowed is not None:
            decided |= ~allowed
        cache.skipped += int((~decided).sum())
        return decided.to(residual.device), bool(decided.all()), not bool(decided.any())

    HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(_Head(), HEAD_HOOK)
    for index, block in enumerate(blocks[1:], start=1):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_Block(index == len(blocks) - 1), BLOCK_HOOK)
    denoiser._row_cache = cache  # reset_step_cache resets the passes; tests read skipped_rows
    # A call before now (the fp8 guard's probe) may have listed the denoiser's hooked modules without
    # these blocks: the pipeline's cache contexts ("cond", "uncond") would then never reach them.
    HookRegistry.check_if_exists_or_initialize(denoiser).invalidate_child_registries_cache()


class _Cache:
    """A denoiser's per-row cache: its passes' states and what the next call may do."""

    def __init__(self, passes):
        self.passes = passes
        self.skipped = 0  # row-steps skipped so far (never reset: diffusers resets the states after each call)
        self.allowed = None  # the call's rows that may skip (``allow``); None: every row
        self.rows_named = False  # continuous batching: every call must name its rows (``resume``)
        self.resumed = None  # (stores, flags) of the next call's rows (``resume``)
        self.state = None  # the pass state that call used, for ``suspend``


def _fitted(kept: list, like):
    """The rows' kept tensors (each [1, L_then, ...] or None) as one tensor shaped as ``like`` [B, L_now, ...]:
    cut or zero-padded along the sequence (past a row's own tokens there is only padding); zeros where
    a row has none."""
    import torch

    out = torch.zeros_like(like)
    for index, tensor in enumerate(kept):
        if tensor is not None:
            length = min(tensor.shape[1], like.shape[1])
            out[index, :length] = tensor[0, :length]
    return out


def _kept_fits(store: dict, residual) -> bool:
    """Whether a row's store holds residuals that this call can use (the same width)."""
    head, tail = store.get("head"), store.get("tail")
    return head is not None and tail is not None and head.shape[2:] == residual.shape[2:]


def _gather(cache, state, residual, hidden, encoder):
    """Continuous batching: this call's kept residuals from the rows' stores, into ``state``; the
    rows that may skip (opted in and holding residuals), as ``_allowed`` gives them."""
    import torch

    stores, flags = cache.resumed
    if len(stores) != residual.shape[0]:
        raise RuntimeError(f"the step named {len(stores)} rows for a denoiser call of {residual.shape[0]}")
    cache.state = state
    usable = [flag and _kept_fits(store, residual) for store, flag in zip(stores, flags)]
    if not any(usable):  # every row computes (and keeps its residuals)
        state.head_residual, state.tail_residuals = None, None
        return torch.zeros(len(stores), dtype=torch.bool), False
    kept = [store if use else {} for store, use in zip(stores, usable)]
    state.head_residual = _fitted([store.get("head") for store in kept], residual)
    tails = [store["tail"] for store in kept if store]
    # (the last block of some transformers returns no encoder hidden states: then no row keeps any)
    encoder_kept = encoder is not None and all(tail[1] is not None for tail in tails)
    state.tail_residuals = (_fitted([store["tail"][0] if store else None for store in kept], hidden),
                            _fitted([store["tail"][1] if store else None for store in kept], encoder)
                            if encoder_kept else None)
    return torch.tensor(usable, dtype=torch.bool), True


def name_rows(denoiser) -> None:
    """From now on every call of ``denoiser`` names its rows (``resume``): a running batch's rows change
    between calls, so residuals kept by position would be another row's."""
    cache = getattr(denoiser, "_row_cache", None)
    if cache is not None:
        cache.rows_named = True


def resume(denoiser, stores: list, flags: list) -> None:
    """The next call's denoiser rows, in order: each row's own store (a dict that lives with the row
    across steps) and whether it opted in (STEP_CACHE=1)."""
    cache = getattr(denoiser, "_row_cache", None)
    if cache is not None:
        cache.resumed, cache.state = (list(stores), [bool(flag) for flag in flags]), None


def suspend(denoiser, completed: bool = True) -> None:
    """After the call named by ``resume``: each opted-in row's residuals back into its store (a cut-off
    copy, so a store never holds its batch's tensors); nothing if the call did not complete."""
    cache = getattr(denoiser, "_row_cache", None)
    if cache is None or cache.resumed is None:
        return
    (stores, flags), state = cache.resumed, cache.state
    cache.resumed, cache.state = None, None
    if not completed or state is None or state.head_residual is None or state.tail_residuals is None:
        return
    hidden, encoder = state.tail_residuals
    for index, (store, flag) in enumerate(zip(stores, flags)):
        if flag:
            store["head"] = state.head_residual[index:index + 1].clone()
            store["tail"] = (hidden[index:index + 1].clone(), None if encoder is None else encoder[index:index + 1].clone())


def _allowed(flags, batch: int):
    """The call's per-request flags as (bool [batch] on the host, any row allowed), or None (every
    row may skip). A denoiser batch of twice the rows is [negative; positive] (guidance in one call);
    any other size than the flags' computes every row."""
    import torch

    from .core import guidance_passes

    if flags is None:
        return None
    passes = guidance_passes(batch, len(flags))
    if passes is None:
        return torch.zeros(batch, dtype=torch.bool), False
    allowed = torch.tensor(flags * passes, dtype=torch.bool)
    return allowed, bool(allowed.any())


def allow(denoiser, flags) -> None:
    """Which rows of the next call may skip blocks (the requests that sent STEP_CACHE=1); None: all."""
    cache = getattr(denoiser, "_row_cache", None)
    if cache is not None:
        cache.allowed = None if flags is None else [bool(flag) for flag in flags]


def keep_rows(denoiser, positions: list, rows: int) -> None:
    """A running call dropped rows (cancellation.py): keep each pass's residuals and the flags of
    the rows at ``positions`` of the ``rows`` it had, so they go on deciding as alone."""
    cache = getattr(denoiser, "_row_cache", None)
    if cache is None:
        return
    import torch

    from .cancellation import _slice_rows

    for state in cache.passes._state_cache.values():
        if state.head_residual is None:
            continue
        keep = torch.tensor(positions, device=state.head_residual.device)
        state.head_residual = _slice_rows(state.head_residual, rows, keep)
        if state.tail_residuals is not None:
            state.tail_residuals = tuple(None if tensor is None else _slice_rows(tensor, rows, keep)
                                         for tensor in state.tail_residuals)
    if cache.allowed is not None:
        cache.allowed = [cache.allowed[position] for position in positions]


def reset(denoiser) -> None:
    """Forget every pass's kept residuals (a call that raised or was interrupted never reset them)."""
    cache = getattr(denoiser, "_row_cache", None)
    if cache is not None:
        cache.passes.reset()


def skipped_rows(denoiser) -> int:
    """Row-steps that skipped the remaining blocks (every pass) since the cache was applied."""
    cache = getattr(denoiser, "_row_cache", None)
    return 0 if cache is None else cache.skipped


def remove(denoiser) -> None:
    """Take the cache's hooks off ``denoiser`` (a benchmark that tries several thresholds on one model)."""
    from diffusers.hooks.hooks import HookRegistry

    if getattr(denoiser, "_row_cache", None) is None:
        return
    for module in denoiser.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry):
            for name in (HEAD_HOOK, BLOCK_HOOK):
                if name in registry.hooks:
                    registry.remove_hook(name, recurse=False)
    HookRegistry.check_if_exists_or_initialize(denoiser).invalidate_child_registries_cache()
    del denoiser._row_cache
