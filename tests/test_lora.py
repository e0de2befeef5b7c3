"""LoRA adapters per row (lora.py): rows with different adapters and rows with none share one denoiser
call, and each row equals the same request alone with diffusers' own ``load_lora_weights`` +
``set_adapters``; adapters that cannot be served are refused with a message naming why."""

from __future__ import annotations

import pytest
import torch

from triton_diffusion.acceleration import denoiser_of
from triton_diffusion.lora import AdapterError, LoraBank, layer_class, read_adapter
from triton_diffusion.pipeline import PipelineRunner
from triton_diffusion.settings import ModelSettings

CPU = {"device": "cpu", "torch_dtype": "float32", "torch_num_threads": 2}
ROWS = (("a red barn in snow", 1), ("a blue car on a road at night, photograph", 2), ("green apple", 3))
STEPS = 4
# batched vs alone differs by the float rounding of batched kernels (~1e-6 relative here); an adapter
# (at the weights below) moves the latents by more than 1e-2
SAME, CHANGED = 1e-4, 1e-2


def runner(arch: str = "flux-dev-tiny") -> PipelineRunner:
    return PipelineRunner.load(ModelSettings.build(pretrained_model=f"random:{arch}", **CPU))


def write_adapter(pipe, folder, seed: int, rank: int, alpha=None, layers=("to_q", "to_k", "to_v", "to_out.0", "proj_out")):
    """A random adapter on the transformer's attention and output layers, saved by diffusers' own
    ``save_lora_weights`` (with peft's metadata, so ``alpha`` sets the scaling alpha / rank)."""
    denoiser = pipe.transformer
    generator = torch.Generator().manual_seed(seed)
    state, targets = {}, []
    for name, module in denoiser.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(layer) for layer in layers) and (
                "blocks" in name or "layers" in name):
            state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.3
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.3
            targets.append(name)
    metadata = {"r": rank, "lora_alpha": alpha or rank, "target_modules": targets}
    type(pipe).save_lora_weights(folder, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata)
    return folder


def latents(pipe, rows, **call) -> torch.Tensor:
    with torch.inference_mode():
        return pipe(prompt=[ROWS[i][0] for i in rows], num_inference_steps=STEPS, height=64, width=64, guidance_scale=3.5,
                    output_type="latent", generator=[torch.Generator().manual_seed(ROWS[i][1]) for i in rows],
                    **call).images.float()


def relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def adapters_for(arch: str, root) -> dict:
    pipe = runner(arch).text_to_image
    return {"x": write_adapter(pipe, root / "x", seed=1, rank=4),
            "y": write_adapter(pipe, root / "y", seed=2, rank=8, alpha=16)}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return adapters_for("flux-dev-tiny", tmp_path_factory.mktemp("loras"))


@pytest.mark.parametrize("arch", [
    "flux-dev-tiny",  # guidance embedded: one row per request
    "sd35-large-tiny",  # classifier-free guidance in one call: [unconditional; conditional] rows
    "z-image-turbo-tiny",  # the same, [conditional; unconditional], captions of different lengths
])
def test_rows_with_different_adapters_in_one_call_each_equal_diffusers_alone(arch, tmp_path):
    """Three rows in one call: adapter x at scale 1.0, no adapter, adapter y (rank 8, alpha 16) at 0.7.
    Each equals the request alone through diffusers' ``load_lora_weights`` + ``set_adapters``."""
    adapters = adapters_for(arch, tmp_path)
    served = runner(arch)
    pipe = served.text_to_image
    bank = LoraBank(denoiser_of(pipe), max_loaded=2, max_rank=8)
    slots = {name: bank.install(read_adapter(pipe, bank.denoiser, name, str(folder), bank.max_rank))
             for name, folder in adapters.items()}
    bank.use([(slots["x"], 1.0), (0, 0.0), (slots["y"], 0.7)])
    together = latents(pipe, range(3))

    plain = runner(arch).text_to_image
    alone = []
    for index, (name, scale) in enumerate([("x", 1.0), (None, 0.0), ("y", 0.7)]):
        reference = runner(arch).text_to_image
        if name:
            reference.load_lora_weights(str(adapters[name]), adapter_name=name)
            reference.set_adapters([name], [scale])
        alone.append(latents(reference, [index])[0])
        without = latents(plain, [index])[0]
        assert (relative(alone[-1], without) > CHANGED) == bool(name), index  # (the adapters do change the image)
    for index, (row, reference) in enumerate(zip(together, alone)):
        assert relative(row, reference) < SAME, (index, relative(row, reference))
    # the next call without adapters is the plain model's
    bank.use(None)
    assert relative(latents(pipe, [1])[0], latents(plain, [1])[0]) < SAME


def test_a_full_bank_evicts_the_least_recently_used_and_an_evicted_slot_is_clean(adapters):
    served = runner()
    pipe = served.text_to_image
    bank = LoraBank(denoiser_of(pipe), max_loaded=1, max_rank=8)
    first = bank.install(read_adapter(pipe, bank.denoiser, "x", str(adapters["x"]), 8))
    second = bank.install(read_adapter(pipe, bank.denoiser, "y", str(adapters["y"]), 8))
    assert first == second == 1 and list(bank.loaded) == ["y"] and bank.evictions == 1
    assert bank.slot("x") is None and bank.slot("y") == 1
    layers = [module for module in bank.denoiser.modules() if isinstance(module, layer_class())]
    assert layers and all(float(layer.up[0].abs().max()) == 0 for layer in layers)  # slot 0 stays "no adapter"


@pytest.mark.parametrize("problem, message", [
    ("rank", "has rank 8, above max_lora_rank=4"),
    ("shape", "does not fit|the adapter's A is"),
    ("nan", "NaN or infinite"),
    ("corrupt", "could not be read"),
    ("missing", "could not be read"),
    ("text encoder", "also adapts text_encoder"),
])
def test_adapters_that_cannot_be_served_are_refused_naming_why(adapters, tmp_path, problem, message):
    from safetensors.torch import load_file, save_file

    pipe = runner().text_to_image
    denoiser = denoiser_of(pipe)
    source = str(adapters["y"])
    weights = load_file(f"{source}/pytorch_lora_weights.safetensors")
    if problem == "shape":
        key = next(key for key in weights if key.endswith("lora_A.weight"))
        weights[key] = torch.zeros(8, weights[key].shape[1] + 16)
        source = weights
    elif problem == "nan":
        key = next(key for key in weights if key.endswith("lora_B.weight"))
        weights[key][0, 0] = float("nan")
        source = weights
    elif problem == "corrupt":
        (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
        source = str(tmp_path)
    elif problem == "missing":
        source = str(tmp_path / "nowhere")
    elif problem == "text encoder":
        save_file({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
                   "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4),
                   **weights}, str(tmp_path / "pytorch_lora_weights.safetensors"))
        source = str(tmp_path)
    with pytest.raises(AdapterError, match=message):
        read_adapter(pipe, denoiser, "bad", source, max_rank=4 if problem == "rank" else 8)
    # nothing of it reached the model
    assert not any(isinstance(module, layer_class()) for module in denoiser.modules())
