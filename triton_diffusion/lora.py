"""LoRA adapters per row: rows with different adapters (and rows with none) share one denoiser call.

diffusers applies one set of adapters to a whole call (``set_adapters``: peft's layers add every
active adapter to every row), so a server that takes an adapter per request must split its batches
by adapter. Here each adapted linear layer of the denoiser computes its base product once for the
batch and adds each row's own low-rank update, gathered by row from a bank of loaded adapters:

    y_i = W x_i + s_i * B[a(i)] (A[a(i)] x_i)        (slot a(i) = 0: no adapter, A = B = 0)

as two batched matrix products per layer (the S-LoRA / Punica idea, with the gather done by
indexing the bank). The bank's shapes are fixed (``max_loaded_loras`` + 1 slots, ranks padded with
zeros to ``max_lora_rank``), so which adapters a batch mixes changes no shape.

Adapters are read with diffusers' own loaders, so a row gets what ``load_lora_weights`` +
``set_adapters`` give it alone: the pipeline's ``lora_state_dict`` converts the published formats
(kohya, xlabs, ... to peft's names), the ``LoraConfig`` is the one ``load_lora_adapter`` builds, and
each layer's scaling follows peft's rules (which layers it targets, ``lora_alpha / r`` with rank and
alpha patterns, rsLoRA); the tensors come from the converted state dict. Text-encoder weights, DoRA and LoRA biases are refused
with a message rather than half-applied.
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

from .core import AdaptersUnavailable, guidance_passes


class AdapterError(ValueError):
    """An adapter that cannot be served (unknown, corrupt, mismatched, too large); the message names why."""


@dataclass(frozen=True)
class Adapter:
    """One adapter, read: per adapted layer of the denoiser, (A [r, in], B [out, r] times peft's scaling)."""

    name: str
    layers: dict  # module name (within the denoiser) -> (A, B scaled)
    rank: int


def _converted(pipe, source):
    """(state dict in peft's names, network alphas or None, metadata or None): the pipeline's own
    ``lora_state_dict``, whose return shape varies with the loader mixin."""
    method = getattr(type(pipe), "lora_state_dict", None)
    if method is None:
        raise AdapterError(f"{type(pipe).__name__} takes no LoRA adapters (diffusers has no LoRA loader for it)")
    # (every loader mixin takes return_lora_metadata through **kwargs; FLUX's also return_alphas)
    alphas = {"return_alphas": True} if "return_alphas" in inspect.signature(method).parameters else {}
    output = method(source, return_lora_metadata=True, **alphas)
    if isinstance(output, dict):
        return output, None, None
    if len(output) == 3:
        return output
    return output[0], None, output[1]


def read_adapter(pipe, denoiser, name: str, source, max_rank: int) -> Adapter:
    """Adapter ``name`` from ``source`` (a file, a folder or hub id diffusers can read, or a state dict)."""
    import torch
    from diffusers.utils import convert_unet_state_dict_to_peft

    from .acceleration import denoiser_name as name_of

    denoiser_name = name_of(pipe)
    try:
        state, alphas, metadata = _converted(pipe, source)
    except AdapterError:
        raise
    except Exception as exc:  # noqa: BLE001 - diffusers raises many types for files it cannot read
        raise AdapterError(f"adapter {name!r} could not be read: {type(exc).__name__}: {exc}") from None
    prefix = f"{denoiser_name}."
    others = sorted({key.split(".")[0] for key in state if not key.startswith(prefix)})
    if others:
        raise AdapterError(f"adapter {name!r} also adapts {', '.join(others)}; only the {denoiser_name}'s layers are served")
    unsupported = [key for key in state if "lora_magnitude_vector" in key or key.endswith("lora_B.bias")]
    if unsupported:
        raise AdapterError(f"adapter {name!r} uses DoRA or LoRA biases ({unsupported[0]}), which are not served")
    try:
        state = {key.removeprefix(prefix): value for key, value in state.items()}
        if "lora_A" not in next(iter(state)):  # (as load_lora_adapter: diffusers' older names to peft's)
            state = convert_unet_state_dict_to_peft(state)
        scalings = _peft_scalings(state, alphas, metadata, prefix, name)
    except AdapterError:
        raise
    except Exception as exc:  # noqa: BLE001 - peft and diffusers raise many types for a mismatched adapter
        raise AdapterError(f"adapter {name!r} does not fit {type(denoiser).__name__}: {type(exc).__name__}: {exc}") from None
    layers, rank = {}, 0
    for module_name, scaling in scalings.items():
        try:
            live = denoiser.get_submodule(module_name)
        except AttributeError:
            raise AdapterError(f"adapter {name!r} does not fit {type(denoiser).__name__}: it has no layer {module_name}") from None
        keys = (f"{module_name}.lora_A.weight", f"{module_name}.lora_B.weight")
        if keys[0] not in state or keys[1] not in state:
            raise AdapterError(f"adapter {name!r}: no weights for {module_name} under the names peft gives them")
        down, up = state[keys[0]], state[keys[1]]
        if not isinstance(live, (torch.nn.Linear, layer_class())) or down.dim() != 2:
            raise AdapterError(f"adapter {name!r} adapts {module_name}, a {type(live).__name__}; only linear layers are served")
        base = live.base if isinstance(live, layer_class()) else live
        if down.shape[1] != base.in_features or up.shape[0] != base.out_features or up.shape[1] != down.shape[0]:
            raise AdapterError(f"adapter {name!r}: {module_name} is {base.in_features} -> {base.out_features}, the "
                               f"adapter's A is {list(down.shape)} and B {list(up.shape)}")
        rank = max(rank, down.shape[0])
        layers[module_name] = (down, up * scaling)
    if not layers:
        raise AdapterError(f"adapter {name!r} adapts no layer of {type(denoiser).__name__}")
    if rank > max_rank:
        raise AdapterError(f"adapter {name!r} has rank {rank}, above max_lora_rank={max_rank}")
    return Adapter(name, layers, rank)


def _peft_scalings(state: dict, alphas, metadata, prefix: str, name: str) -> dict:
    """Per adapted layer of ``state`` (peft's names within the denoiser; ``alphas`` and ``metadata``
    still under ``prefix``), the scaling peft gives it: what diffusers'
    ``load_lora_adapter`` would configure (the same ``LoraConfig`` from the same state dict, network
    alphas or metadata) and peft's own rules for which layers it targets and each one's rank and alpha
    (``LoraModel._create_and_replace``, ``LoraLayer.update_layer``), without building peft's layers on
    a copy of the denoiser (which was most of a read: 0.8 s of 1.2 for a rank-64 FLUX.1 adapter)."""
    import math

    from diffusers.utils.peft_utils import _create_lora_config
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    metadata = {key.removeprefix(prefix): value for key, value in metadata.items() if key.startswith(prefix)} if metadata else None
    alphas = {key.removeprefix(prefix): value for key, value in alphas.items() if key.startswith(prefix)} if alphas else None
    ranks = {f"^{key}": value.shape[1] for key, value in state.items() if "lora_B" in key and value.ndim > 1}
    config = _create_lora_config(state, alphas or None, metadata, ranks, adapter_name=name)
    if config.use_dora:
        raise AdapterError(f"adapter {name!r} uses DoRA, which is not served")
    scalings = {}
    for module_name in dict.fromkeys(key.split(".lora_A.")[0] for key in state if ".lora_A." in key):
        if not check_target_module_exists(config, module_name):  # (peft leaves it out: an unexpected key)
            continue
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module_name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module_name), config.lora_alpha)
        scalings[module_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return scalings


@functools.cache
def layer_class():
    """The torch module that replaces an adapted linear layer (defined on first use: torch is imported lazily)."""
    import torch

    class MultiLoraLinear(torch.nn.Module):
        """A linear layer plus a bank of low-rank updates, one per slot, applied per row."""

        def __init__(self, base, bank: "LoraBank"):
            super().__init__()
            self.base = base
            self.bank = [bank]  # (a list: not a submodule)
            dtype, device = bank.dtype, base.weight.device
            self.register_buffer("down", torch.zeros(bank.slots, bank.max_rank, base.in_features, dtype=dtype, device=device),
                                 persistent=False)
            self.register_buffer("up", torch.zeros(bank.slots, base.out_features, bank.max_rank, dtype=dtype, device=device),
                                 persistent=False)

        @property
        def in_features(self) -> int:
            return self.base.in_features

        @property
        def out_features(self) -> int:
            return self.base.out_features

        @property
        def weight(self):
            return self.base.weight

        @property
        def bias(self):
            return self.base.bias

        def forward(self, x):
            output = self.base(x)
            rows = self.bank[0].rows_for(x.shape[0])
            if rows is None:
                return output
            slots, scales = rows
            flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.down.dtype)
            low = torch.bmm(flat, self.down[slots].transpose(1, 2)) * scales.to(flat.dtype).view(-1, 1, 1)
            update = torch.bmm(low, self.up[slots].transpose(1, 2))
            return output + update.reshape(output.shape).to(output.dtype)

    return MultiLoraLinear


class LoraBank:
    """The adapters loaded on one denoiser (least recently used evicted beyond ``max_loaded``), and which
    slot and scale each row of the next call uses.

    ``compiled``: torch.compile guards on the module tree and on which branch a layer takes, so every
    linear layer of the denoiser is wrapped now (before a warm-up compiles it) and every call takes the
    adapter path (rows without one use the zero slot): which adapters a call mixes, or whether it uses
    any, then changes no graph. Uncompiled, a layer is wrapped when an adapter first adapts it and a
    call without adapters skips the update.
    """

    def __init__(self, denoiser, max_loaded: int, max_rank: int, compiled: bool = False):
        import torch

        if max_loaded < 1 or max_rank < 1:
            raise ValueError("max_loaded_loras and max_lora_rank must be at least 1")
        self.denoiser = denoiser
        self.max_loaded, self.max_rank = max_loaded, max_rank
        self.slots = max_loaded + 1  # slot 0: no adapter
        self.dtype = denoiser.dtype
        self.compiled = compiled
        self.loaded: "OrderedDict[str, int]" = OrderedDict()  # name -> slot, least recently used first
        self._rows = None  # (slots [n] long, scales [n] float) on the denoiser's device, for the next call
        self.evictions = 0
        if compiled:
            for module_name in [name for name, module in denoiser.named_modules() if isinstance(module, torch.nn.Linear)]:
                self._wrapped(module_name)

    def bytes_per_slot(self) -> int:
        """Device memory one slot takes in every wrapped layer (an adapter's cost, whatever its rank)."""
        return sum((layer.down[0].numel() + layer.up[0].numel()) * layer.down.element_size() for layer in self._layers())

    # -- adapters -----------------------------------------------------------------------------------
    def install(self, adapter: Adapter, keep: Sequence[str] = ()) -> int:
        """Put ``adapter`` in a slot (evicting the least recently used, never one named in ``keep``, where
        the bank is full); its slot."""
        import torch

        if adapter.name in self.loaded:
            self.remove(adapter.name)
        if len(self.loaded) >= self.max_loaded:
            evictable = [name for name in self.loaded if name not in keep]
            if not evictable:
                raise AdapterError(f"a call uses more than max_loaded_loras={self.max_loaded} adapters")
            self.remove(evictable[0])
            self.evictions += 1
        slot = min(set(range(1, self.slots)) - set(self.loaded.values()))
        layers = {module_name: self._wrapped(module_name) for module_name in adapter.layers}
        for layer, (down, up) in zip(layers.values(), adapter.layers.values()):
            rank = down.shape[0]
            layer.down[slot, :rank] = down.to(layer.down)
            layer.up[slot, :, :rank] = up.to(layer.up)
        self.loaded[adapter.name] = slot
        # Finite weights, checked here on the device (one synchronisation) rather than on the reader's CPU,
        # where it took a third of a read; a slot that fails is cleared before anything uses it.
        finite = [torch.isfinite(layer.down[slot]).all() & torch.isfinite(layer.up[slot]).all() for layer in layers.values()]
        if not bool(torch.stack(finite).all()):
            self.remove(adapter.name)
            bad = next(module_name for module_name, ok in zip(layers, finite) if not ok)
            raise AdapterError(f"adapter {adapter.name!r}: {bad} holds NaN or infinite weights")
        return slot

    def remove(self, name: str) -> None:
        slot = self.loaded.pop(name)
        for layer in self._layers():
            layer.down[slot].zero_()
            layer.up[slot].zero_()

    def slot(self, name: str) -> Optional[int]:
        """The slot of a loaded adapter (and it becomes the most recently used), or None."""
        if name not in self.loaded:
            return None
        self.loaded.move_to_end(name)
        return self.loaded[name]

    def _layers(self):
        return [module for module in self.denoiser.modules() if isinstance(module, layer_class())]

    def _wrapped(self, module_name: str):
        module = self.denoiser.get_submodule(module_name)
        if isinstance(module, layer_class()):
            return module
        parent_name, _, child = module_name.rpartition(".")
        layer = layer_class()(module, self)
        setattr(self.denoiser.get_submodule(parent_name) if parent_name else self.denoiser, child, layer)
        return layer

    # -- the next call's rows -------------------------------------------------------------------------
    def use(self, rows: Optional[Sequence[tuple[int, float]]]) -> None:
        """Each request row's (slot, scale) for the next call (slot 0: no adapter); None: no row uses one."""
        import torch

        if rows is None or not (self.compiled or any(slot for slot, _ in rows)):
            self._rows = None
            return
        device = next(self.denoiser.parameters()).device
        self._rows = (torch.tensor([slot for slot, _ in rows], dtype=torch.long, device=device),
                      torch.tensor([scale for _, scale in rows], dtype=torch.float32, device=device))

    def rows_for(self, batch: int):
        """(slots, scales) for a denoiser call of ``batch`` rows (``core.guidance_passes``), or None."""
        if self._rows is None:
            return None
        slots, scales = self._rows
        passes = guidance_passes(batch, len(slots))
        if passes is None:
            raise RuntimeError(f"a denoiser call of {batch} rows for {len(slots)} request rows with adapters")
        return (slots, scales) if passes == 1 else (slots.repeat(passes), scales.repeat(passes))


class AdapterLibrary:
    """A model's adapters: found by name in ``lora_dir`` on first use, read, and put in its bank.

    Reading an adapter takes a second or more for a large model (the file, diffusers' conversion, peft's
    layout), longer than a denoising step, so it never runs on the thread that runs the denoiser while
    other rows wait: ``prepare(name)`` (as a request is admitted) refuses a name with no file at once and
    starts reading the others on a reader thread; ``ready(name)`` says whether a call could use it now,
    so that calls and running batches take rows whose adapters are ready first (``Executor``,
    ``ContinuousBatcher``). ``use(items)`` (in the denoiser's thread, before each call or running-batch
    step) puts every row's adapter in a slot, waiting for a read under way and reading again one dropped
    since (``AdaptersUnavailable`` for one that cannot be served: those rows are refused, their
    batch-mates run), and tells the layers which row uses which; ``done()`` after. Counters for the
    metrics: hits, loads (reads), evictions, failures.
    """

    def __init__(self, pipe, denoiser, folder: str, max_loaded: int, max_rank: int, compiled: bool = False):
        import threading
        from concurrent.futures import ThreadPoolExecutor
        from pathlib import Path

        from .settings import resolve_model_location

        self.pipe, self.folder = pipe, Path(resolve_model_location(folder))  # ({repo}, {cache}, ~, $VARS)
        self.bank = LoraBank(denoiser, max_loaded, max_rank, compiled)
        # (the step adapters name each running-batch step's rows; cancellation.py keeps a running call's)
        denoiser._lora_library = self
        self._read: "OrderedDict[str, Adapter]" = OrderedDict()  # read, not yet in the bank (at most max_loaded)
        self._reading: dict = {}  # name -> Future of a read under way
        self._refused: "OrderedDict[str, str]" = OrderedDict()  # name -> why its last read failed (until used)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-reader")
        self._lock = threading.Lock()
        self.hits = self.loads = self.failures = 0

    @property
    def evictions(self) -> int:
        return self.bank.evictions

    def source(self, name: str) -> str:
        """Where adapter ``name`` is: ``lora_dir/NAME/`` (as diffusers saves one) or ``lora_dir/NAME.safetensors``."""
        folder, file = self.folder / name, self.folder / f"{name}.safetensors"
        for candidate in (folder, file):
            # (the name was checked to be a plain name; resolve() also refuses a link leading out of lora_dir)
            if candidate.exists() and candidate.resolve().is_relative_to(self.folder.resolve()):
                return str(candidate)
        raise AdapterError(f"no adapter named {name!r} in lora_dir (looked for {name}/ and {name}.safetensors)")

    def prepare(self, name: str) -> Optional[str]:
        """Why ``name`` cannot be served (no such file), or None: it is loaded, read, or being read now."""
        with self._lock:
            if name in self.bank.loaded or name in self._read or name in self._reading:
                self.hits += 1
                return None
        try:
            self.source(name)
        except AdapterError as exc:
            with self._lock:
                self.failures += 1
            return str(exc)
        self.ready(name)
        return None

    def ready(self, name: str) -> bool:
        """Whether a call can use ``name`` without waiting for a read (a read starts where none is under
        way; an adapter whose read failed is ready: its rows are refused at once)."""
        with self._lock:
            if name in self.bank.loaded or name in self._read or name in self._refused:
                return True
            future = self._reading.get(name)
            if future is None:
                self._reading[name] = self._reader.submit(self._read_in_background, name)
                return False
            return future.done()

    def settle(self) -> None:
        """Return once every read started so far has ended (for tools and tests)."""
        self._reader.submit(lambda: None).result()

    def _read_in_background(self, name: str) -> None:
        try:
            adapter = self._load(name)
        except AdapterError as exc:
            with self._lock:
                self._refused[name] = str(exc)
                while len(self._refused) > 64:  # (names are admitted with a file; this only bounds memory)
                    self._refused.popitem(last=False)
        except Exception as exc:  # noqa: BLE001 - a bug must refuse the rows, not leave them waiting
            with self._lock:
                self.failures += 1
                self._refused[name] = f"adapter {name!r} could not be read: {type(exc).__name__}: {exc}"
        else:
            self._remember({name: adapter})
        finally:
            with self._lock:
                self._reading.pop(name, None)

    def _remember(self, adapters: dict) -> None:
        """Keep adapters read for the calls about to install them (the most recent ``max_loaded``)."""
        with self._lock:
            self._read.update(adapters)
            while len(self._read) > self.bank.max_loaded:
                self._read.popitem(last=False)

    def _load(self, name: str) -> Adapter:
        """Read ``name`` (counted: a load, or a failure)."""
        try:
            adapter = read_adapter(self.pipe, self.bank.denoiser, name, self.source(name), self.bank.max_rank)
        except AdapterError:
            with self._lock:
                self.failures += 1
            raise
        with self._lock:
            self.loads += 1
        return adapter

    def _take(self, name: str) -> Adapter:
        """``name`` read, for the bank: the read one, or the read under way waited for, or read now."""
        with self._lock:
            future = self._reading.get(name)
        if future is not None:
            future.result()
        with self._lock:
            adapter = self._read.pop(name, None)
            refused = self._refused.pop(name, None)
        if refused is not None:
            raise AdapterError(refused)
        return adapter if adapter is not None else self._load(name)

    def use(self, items) -> None:
        """Every row's adapter in a slot, then the rows' slots and scales to the layers (``items``: the
        call's rows, each with ``lora`` and ``lora_scale``). A call names at most ``max_loaded_loras``
        adapters (``PipelineRunner.run`` splits larger calls; a running batch has at most that many rows)."""
        names = list(dict.fromkeys(item.lora for item in items if item.lora))
        # Every adapter not in the bank first (one that cannot be served refuses its rows alone, before
        # anything is installed), then into the bank.
        adapters, reasons = {}, {}
        for name in names:
            if name in self.bank.loaded:
                continue
            try:
                adapters[name] = self._take(name)
            except AdapterError as exc:
                reasons[name] = str(exc)
        if reasons:
            self._remember(adapters)
            raise AdaptersUnavailable(reasons)
        slots = {}
        for name in names:
            try:
                slots[name] = self.bank.install(adapters[name], keep=names) if name in adapters else self.bank.slot(name)
            except AdapterError as exc:  # (non-finite weights: found on the device)
                with self._lock:
                    self.failures += 1
                reasons[name] = str(exc)
        if reasons:
            raise AdaptersUnavailable(reasons)
        self.bank.use([(slots[item.lora], item.lora_scale) if item.lora else (0, 0.0) for item in items])

    def done(self) -> None:
        self.bank.use(None)


def keep_rows(denoiser, positions: list) -> None:
    """A running call dropped rows (cancellation.py): the rows at ``positions`` keep their adapters."""
    library = getattr(denoiser, "_lora_library", None)
    bank = library.bank if library is not None else None
    if bank is not None and bank._rows is not None:
        import torch

        slots, scales = bank._rows
        keep = torch.tensor(positions, device=slots.device)
        bank._rows = (slots.index_select(0, keep), scales.index_select(0, keep))
