"""Random LoRA adapters of a model's real layer shapes, saved as diffusers saves them, for the tests
(``tests/test_lora.py``) and the GPU benchmark (``perf/lora_bench.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

# What published adapters adapt: attention projections (and, for the DiTs, the feed-forward and
# output projections of the blocks).
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
COMMON = ATTENTION + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp", "proj_out",
                      "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


def random_adapter(pipe, folder: Path, seed: int, rank: int, alpha=None, layers: Sequence[str] = ATTENTION + ("proj_out",),
                   scale: float = 0.3, dtype=None) -> Path:
    """A random rank-``rank`` adapter of the linear layers in the denoiser's blocks whose names end with
    one of ``layers`` (weights ``scale`` * N(0, 1)), saved by the pipeline's own ``save_lora_weights``
    with peft's metadata (``alpha``: the scaling alpha / rank; default alpha = rank). ``pipe`` may be
    on the meta device (only the layers' shapes are read)."""
    import torch

    from triton_diffusion.acceleration import denoiser_name

    part = denoiser_name(pipe)
    generator = torch.Generator().manual_seed(seed)
    state, targets = {}, []
    for name, module in getattr(pipe, part).named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(layer) for layer in layers) and (
                "blocks" in name or "layers" in name):
            for key, shape in ((f"{name}.lora_A.weight", (rank, module.in_features)),
                               (f"{name}.lora_B.weight", (module.out_features, rank))):
                state[key] = (torch.randn(*shape, generator=generator) * scale).to(dtype or torch.float32)
            targets.append(name)
    metadata = {"r": rank, "lora_alpha": alpha or rank, "target_modules": targets}
    type(pipe).save_lora_weights(folder, **{f"{part}_lora_layers": state, f"{part}_lora_adapter_metadata": metadata})
    return Path(folder)
