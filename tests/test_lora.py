"""LoRA adapters per row (lora.py): rows with different adapters and rows with none share one denoiser
call, and each row equals the same request alone with diffusers' own ``load_lora_weights`` +
``set_adapters``; adapters that cannot be served are refused with a message naming why."""

from __future__ import annotations

import pytest
import torch

from testing.adapters import random_adapter
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


def latents(pipe, rows, **call) -> torch.Tensor:
    with torch.inference_mode():
        return pipe(prompt=[ROWS[i][0] for i in rows], num_inference_steps=STEPS, height=64, width=64, guidance_scale=3.5,
                    output_type="latent", generator=[torch.Generator().manual_seed(ROWS[i][1]) for i in rows],
                    **call).images.float()


def relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# Which layers the test adapters adapt: on the random tiny SDXL, adapting every attention layer as
# strongly makes the image chaotic (a 1e-6 change of the scale moves its latents by 6%, so no two float
# orders agree); its key and value projections alone do not.
LAYERS = {"sdxl-tiny": ("to_k", "to_v")}


def adapters_for(arch: str, root) -> dict:
    pipe = runner(arch).text_to_image
    layers = {"layers": LAYERS[arch]} if arch in LAYERS else {}
    return {"x": random_adapter(pipe, root / "x", seed=1, rank=4, **layers),
            "y": random_adapter(pipe, root / "y", seed=2, rank=8, alpha=16, **layers)}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return adapters_for("flux-dev-tiny", tmp_path_factory.mktemp("loras"))


@pytest.mark.parametrize("arch", [
    "flux-dev-tiny",  # guidance embedded: one row per request
    "sd35-large-tiny",  # classifier-free guidance in one call: [unconditional; conditional] rows
    "z-image-turbo-tiny",  # the same, [conditional; unconditional], captions of different lengths
    "sdxl-tiny",  # a UNet (its attention layers), classifier-free guidance in one call
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
    if problem == "nan":  # (read; its weights are checked on the device, as the bank installs them)
        bank = LoraBank(denoiser, max_loaded=2, max_rank=8)
        with pytest.raises(AdapterError, match=message):
            bank.install(read_adapter(pipe, denoiser, "bad", source, max_rank=8))
        # its slot was cleared before anything could use it
        assert not bank.loaded and all(float(layer.up.abs().max()) == float(layer.down.abs().max()) == 0 for layer in bank._layers())
        return
    with pytest.raises(AdapterError, match=message):
        read_adapter(pipe, denoiser, "bad", source, max_rank=4 if problem == "rank" else 8)
    # nothing of it reached the model
    assert not any(isinstance(module, layer_class()) for module in denoiser.modules())


@pytest.mark.parametrize("variant", ["metadata", "mixed ranks", "rslora and patterns", "network alphas"])
def test_each_layers_scaling_is_the_one_peft_gives_it(variant):
    """The scalings ``read_adapter`` works out (without building peft's layers) equal those peft's
    own layers get from diffusers' ``load_lora_adapter`` for the same state dict: with metadata, with
    ranks that differ per layer and no metadata, with rsLoRA and rank/alpha patterns, with network alphas."""
    from peft.tuners.lora import LoraLayer

    from triton_diffusion import families
    from triton_diffusion.lora import _peft_scalings

    with torch.device("meta"):
        pipe = families.architecture("flux-dev-tiny")[1].build()
    denoiser = denoiser_of(pipe)
    targets = [name for name, module in denoiser.named_modules()
               if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "proj_out")) and "blocks" in name]
    ranks = {name: 4 if (index % 2 if variant in ("mixed ranks", "network alphas") else variant != "metadata" and index == 1) else 8
             for index, name in enumerate(targets)}
    state = {}
    for name in targets:
        module = denoiser.get_submodule(name)
        state[f"transformer.{name}.lora_A.weight"] = torch.zeros(ranks[name], module.in_features, device="meta")
        state[f"transformer.{name}.lora_B.weight"] = torch.zeros(module.out_features, ranks[name], device="meta")
    metadata = alphas = None
    if variant == "metadata":
        metadata = {"transformer.r": 8, "transformer.lora_alpha": 16, "transformer.target_modules": targets}
    elif variant == "rslora and patterns":
        metadata = {"transformer.r": 8, "transformer.lora_alpha": 8, "transformer.use_rslora": True,
                    "transformer.target_modules": targets, "transformer.rank_pattern": {targets[1]: 4},
                    "transformer.alpha_pattern": {targets[2]: 32, "to_k": 3}}
    elif variant == "network alphas":
        alphas = {f"transformer.{name}.alpha": (2.0 if index % 3 else 6.0) for index, name in enumerate(targets)}
    fast = _peft_scalings({key.removeprefix("transformer."): value for key, value in state.items()}, alphas, metadata,
                          "transformer.", "a")
    with torch.device("meta"):
        skeleton = type(denoiser).from_config(denoiser.config)
        skeleton.load_lora_adapter(state, network_alphas=alphas, adapter_name="a", metadata=metadata, prefix="transformer")
    reference = {name: module.scaling["a"] for name, module in skeleton.named_modules() if isinstance(module, LoraLayer)}
    assert fast == pytest.approx(reference)
    if variant in ("rslora and patterns", "network alphas"):
        assert len(set(reference.values())) > 1  # (the patterns do give layers different scalings)


# -- through the runner (what the served model runs) --------------------------------------------------

def items_with(rows):
    """Generation items for ROWS[index] with (adapter, scale) each."""
    import dataclasses

    from triton_diffusion.requests import text_to_image

    return [dataclasses.replace(text_to_image(ROWS[index][0], ROWS[index][1], STEPS, 3.5, 64, 64), lora=name, lora_scale=scale)
            for index, (name, scale) in rows]


def test_the_runner_loads_adapters_by_name_on_first_use_and_splits_a_call_the_bank_cannot_hold(adapters, tmp_path):
    """A folder of adapters (NAME/ and NAME.safetensors); a name that is not there is refused for that
    request alone; with room for one adapter, a call naming two runs as two calls, with the same images."""
    import shutil

    import numpy as np

    folder = tmp_path / "loras"
    shutil.copytree(adapters["x"], folder / "x")
    shutil.copy(adapters["y"] / "pytorch_lora_weights.safetensors", folder / "y.safetensors")
    wide = PipelineRunner.load(ModelSettings.build(pretrained_model="random:flux-dev-tiny", **CPU, lora_dir=str(folder),
                                                   max_loaded_loras=2, max_lora_rank=8))
    narrow = PipelineRunner.load(ModelSettings.build(pretrained_model="random:flux-dev-tiny", **CPU, lora_dir=str(folder),
                                                     max_loaded_loras=1, max_lora_rank=8))
    mixed = items_with([(0, ("x", 1.0)), (1, ("", 1.0)), (2, ("y", 0.7))])
    for loaded in (wide, narrow):
        assert loaded.unsupported(items_with([(0, ("absent", 1.0))])[0]).startswith("no adapter named 'absent' in lora_dir")
        assert all(loaded.unsupported(item) is None for item in mixed)
    together = wide.run(mixed[0].params, mixed)
    split = narrow.run(mixed[0].params, mixed)
    assert narrow.adapters.evictions >= 1
    for index, (image, other) in enumerate(zip(together, split)):
        assert np.abs(image.astype(int) - other.astype(int)).max() <= 1, index
        alone = wide.run(mixed[index].params, [mixed[index]])[0]
        assert np.abs(image.astype(int) - alone.astype(int)).max() <= 1, index
    assert (wide.adapters.loads, wide.adapters.hits, wide.adapters.failures) == (2, 0, 1)
    assert wide.unsupported(mixed[0]) is None and wide.adapters.hits == 1  # the next request naming x


# -- served ----------------------------------------------------------------------------------------

def test_served_requests_with_different_adapters_share_an_execution_and_bad_ones_fail_alone(adapters, tmp_path_factory):
    """Through tritonserver: a FLUX model with a lora_dir declares LORA and LORA_SCALE; three requests
    (adapter x, none, adapter y at 0.7) form one execution and each equals itself served alone; an
    unknown adapter, a corrupt file and a scale out of range are INVALID_ARG for that request alone,
    and its batch-mate is served; a file added to the folder while serving is used; the adapter metrics
    count the loads, hits and failures."""
    import shutil

    import numpy as np

    from client import DiffusionClient, GenerationRequest, ServerError
    from testing import harness
    from triton_diffusion import model_config

    from .conftest import batch_histogram, start_server

    root, name = tmp_path_factory.mktemp("lora_served"), "flux_tiny_lora"
    for adapter, folder in adapters.items():
        shutil.copytree(folder, root / "loras" / adapter)
    model_config.write_model(root / "repo", model_config.variant(
        name, {"lora_dir": str(root / "loras"), "max_lora_rank": "8"}, base="flux_tiny"))
    server = start_server(root, [name], {"TRITONSERVER_DELAY_SCHEDULER": "3"}, repository=root / "repo",
                          require_ready=True)
    try:
        requests = [GenerationRequest(ROWS[0][0], seed=ROWS[0][1], lora="x"),
                    GenerationRequest(ROWS[1][0], seed=ROWS[1][1]),
                    GenerationRequest(ROWS[2][0], seed=ROWS[2][1], lora="y", lora_scale=0.7)]
        with DiffusionClient(f"grpc://{server.grpc_url}", name, timeout_s=120) as client:
            together = client.generate_many(requests, concurrency=3)
            assert batch_histogram(server, name) == {3: 1}
            plain = client.generate(GenerationRequest(ROWS[0][0], seed=ROWS[0][1])).array
            assert np.abs(together[0].array.astype(int) - plain.astype(int)).max() > 1  # the adapter changed it
            for request, result in zip(requests, together):
                alone = client.generate(request).array
                assert np.abs(result.array.astype(int) - alone.astype(int)).max() <= 1, request
            (root / "loras" / "corrupt.safetensors").write_bytes(b"not a safetensors file")
            bad = [GenerationRequest("a cat", seed=4, lora="absent"), GenerationRequest("a cat", seed=4, lora="x"),
                   GenerationRequest("a cat", seed=4, lora="x", lora_scale=3.0),
                   GenerationRequest("a cat", seed=4, lora="corrupt")]
            results = client.generate_many(bad, concurrency=4)
            # an adapter added to the folder while serving is used without a restart
            shutil.copy(adapters["y"] / "pytorch_lora_weights.safetensors", root / "loras" / "added.safetensors")
            added = client.generate(GenerationRequest(ROWS[2][0], seed=ROWS[2][1], lora="added", lora_scale=0.7)).array
            assert np.abs(added.astype(int) - together[2].array.astype(int)).max() <= 1
        assert isinstance(results[0], ServerError) and "INVALID_ARG" in str(results[0].status)
        assert "no adapter named 'absent' in lora_dir" in str(results[0])
        assert results[1].array.shape == (64, 64, 3)
        assert isinstance(results[2], ServerError) and "LORA_SCALE=3.0 is outside the allowed range" in str(results[2])
        # a file that is there but cannot be read: refused once its read (in the background) failed
        assert isinstance(results[3], ServerError) and "INVALID_ARG" in str(results[3].status)
        assert "adapter 'corrupt' could not be read" in str(results[3])
        events = {event: harness.metric(server, "diffusion_lora_adapters_total", name, event=event)
                  for event in ("load", "hit", "failure", "eviction")}
        assert events["load"] == 3 and events["failure"] == 2 and events["hit"] >= 3 and events["eviction"] == 0, events
    finally:
        server.stop()


def test_an_adapter_removed_after_its_request_was_admitted_refuses_that_request_alone(adapters, tmp_path):
    """x is read when its request is admitted, then dropped from the read adapters (room for one: y was
    read after it) and its file removed before the call: the call refuses x's request alone (INVALID_ARG,
    nothing run), and its batch-mate runs and equals itself alone."""
    import shutil

    import numpy as np

    from triton_diffusion.batching import CallBudget
    from triton_diffusion.core import Images, Rejected
    from triton_diffusion.executor import Executor
    from triton_diffusion.requests import ParsedRequest

    for name, folder in adapters.items():
        shutil.copytree(folder, tmp_path / name)
    loaded = PipelineRunner.load(ModelSettings.build(pretrained_model="random:flux-dev-tiny", **CPU, lora_dir=str(tmp_path),
                                                     max_loaded_loras=1, max_lora_rank=8))
    requests = items_with([(0, ("x", 1.0)), (1, ("", 1.0))])
    assert all(loaded.unsupported(item) is None for item in requests + items_with([(2, ("y", 1.0))]))
    loaded.adapters.settle()
    shutil.rmtree(tmp_path / "x")
    run = Executor(loaded.run, CallBudget(4, 10**9), lambda exc: False)
    outcomes = run.run([ParsedRequest((item,)) for item in requests], [lambda: False] * 2)
    assert outcomes[0] == Rejected("no adapter named 'x' in lora_dir (looked for x/ and x.safetensors)")
    assert isinstance(outcomes[1], Images) and loaded.adapters.failures == 1
    alone = loaded.run(requests[1].params, [requests[1]])[0]
    assert np.abs(outcomes[1].images[0].astype(int) - alone.astype(int)).max() <= 1


def test_an_adapter_with_non_finite_weights_refuses_its_request_alone_and_never_serves(adapters, tmp_path):
    """An adapter whose file holds a NaN reads (finiteness is checked on the device, as it is installed):
    its call refuses its request alone (INVALID_ARG naming the layer), counted as a failure; the
    batch-mate with a good adapter runs and equals itself alone; the bad adapter holds no slot."""
    import shutil

    import numpy as np
    from safetensors.torch import load_file, save_file

    from triton_diffusion.batching import CallBudget
    from triton_diffusion.core import Images, Rejected
    from triton_diffusion.executor import Executor
    from triton_diffusion.requests import ParsedRequest

    shutil.copytree(adapters["x"], tmp_path / "x")
    weights = load_file(f"{adapters['y']}/pytorch_lora_weights.safetensors")
    weights[next(key for key in weights if key.endswith("lora_B.weight"))][0, 0] = float("inf")
    save_file(weights, str(tmp_path / "broken.safetensors"))
    loaded = PipelineRunner.load(ModelSettings.build(pretrained_model="random:flux-dev-tiny", **CPU, lora_dir=str(tmp_path),
                                                     max_lora_rank=8))
    requests = items_with([(0, ("broken", 1.0)), (1, ("x", 1.0))])
    assert all(loaded.unsupported(item) is None for item in requests)
    outcomes = Executor(loaded.run, CallBudget(4, 10**9), lambda exc: False).run(
        [ParsedRequest((item,)) for item in requests], [lambda: False] * 2)
    assert isinstance(outcomes[0], Rejected) and "adapter 'broken'" in outcomes[0].message
    assert "holds NaN or infinite weights" in outcomes[0].message
    assert isinstance(outcomes[1], Images) and loaded.adapters.failures == 1
    assert list(loaded.adapters.bank.loaded) == ["x"]
    alone = loaded.run(requests[1].params, [requests[1]])[0]
    assert np.abs(outcomes[1].images[0].astype(int) - alone.astype(int)).max() <= 1


def test_a_new_adapter_is_read_off_the_calling_thread_and_its_rows_run_after_the_others(adapters, tmp_path):
    """Admitting a request names its adapter's read and returns at once; while the read is under way the
    adapter is not ready (the executor runs its rows last); a file that exists but cannot be read
    refuses its request alone when its call comes, the batch-mates run."""
    import shutil
    import threading

    from triton_diffusion.batching import CallBudget
    from triton_diffusion.core import Images, Rejected
    from triton_diffusion.executor import Executor
    from triton_diffusion.requests import ParsedRequest

    shutil.copytree(adapters["x"], tmp_path / "x")
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    loaded = PipelineRunner.load(ModelSettings.build(pretrained_model="random:flux-dev-tiny", **CPU, lora_dir=str(tmp_path),
                                                     max_lora_rank=8))
    library = loaded.adapters
    release = threading.Event()
    read = library._load
    library._load = lambda name: (release.wait(60), read(name))[1]  # the reader thread holds until released
    requests = items_with([(0, ("x", 1.0)), (1, ("", 1.0)), (2, ("corrupt", 1.0))])
    assert all(loaded.unsupported(item) is None for item in requests)  # returned with the reads under way
    assert not loaded.ready(requests[0]) and loaded.ready(requests[1]) and library.loads == 0
    calls = []
    run = Executor(lambda params, items, poll: (calls.append([item.lora for item in items]), loaded.run(params, items, poll))[1],
                   CallBudget(4, 10**9), lambda exc: False, ready=loaded.ready)
    release.set()  # (the executor has planned by now only if it ran: it runs below, after the release)
    outcomes = run.run([ParsedRequest((item,)) for item in requests], [lambda: False] * 3)
    assert isinstance(outcomes[0], Images) and isinstance(outcomes[1], Images)
    assert isinstance(outcomes[2], Rejected) and "adapter 'corrupt' could not be read" in outcomes[2].message
    assert (library.loads, library.failures) == (1, 1)


def test_compiled_every_layer_is_wrapped_before_the_warm_up_and_mixing_adapters_compiles_nothing(adapters, tmp_path):
    """Compiled (regional, dynamo with the eager backend here), static buckets: after the warm-up,
    batches mixing x, y and no adapter in any order, or using none, compile no graph; each row equals
    the uncompiled model's image."""
    import shutil

    import numpy as np

    from triton_diffusion.acceleration import compiled_graphs

    for name, folder in adapters.items():
        shutil.copytree(folder, tmp_path / name)
    common = dict(pretrained_model="random:flux-dev-tiny", **CPU, lora_dir=str(tmp_path), max_lora_rank=8,
                  max_images_per_call=4, warmup_sizes=((64, 64),), default_guidance_scale=3.5)
    compiled = PipelineRunner.load(ModelSettings.build(**common, compile="regional", compile_backend="eager", speed_devices=("cpu",),
                                                       compile_dynamic="false", batch_buckets=(1, 2, 4)))
    eager = PipelineRunner.load(ModelSettings.build(**common))
    bank = compiled.adapters.bank
    linear = [name for name, module in bank.denoiser.named_modules() if isinstance(module, layer_class())]
    assert len(linear) == len(bank._layers()) > 0 and not any(
        isinstance(module, torch.nn.Linear) and not name.endswith(".base") for name, module in bank.denoiser.named_modules())
    assert bank.bytes_per_slot() == sum(8 * (m.in_features + m.out_features) * 4 for m in bank._layers())
    report = compiled.warm_up()
    assert report.compiled_graphs > 0
    graphs = compiled_graphs()
    for rows in ([(0, ("x", 1.0)), (1, ("", 1.0)), (2, ("y", 0.7))], [(2, ("y", 0.7)), (0, ("x", 1.0))],
                 [(1, ("", 1.0))], [(0, ("y", 1.0)), (1, ("y", 1.0)), (2, ("x", 0.5)), (0, ("", 1.0))]):
        items = items_with(rows)
        assert all(compiled.unsupported(item) is None and eager.unsupported(item) is None for item in items)
        for ours, reference in zip(compiled.run(items[0].params, items), eager.run(items[0].params, items)):
            assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1, rows
    assert compiled_graphs() == graphs


def test_a_cancelled_batch_mate_leaves_the_call_and_the_others_keep_their_adapters(adapters, tmp_path):
    """FLUX drops a cancelled row from the running call (cancellation.py); the rows left keep their
    own adapters (the bank's rows shrink with the call), so each equals itself alone."""
    import shutil

    import numpy as np

    from testing.rows import CancelAfter
    from triton_diffusion.cancellation import per_row_checks

    for name, folder in adapters.items():
        shutil.copytree(folder, tmp_path / name)
    loaded = PipelineRunner.load(ModelSettings.build(pretrained_model="random:flux-dev-tiny", **CPU, lora_dir=str(tmp_path),
                                                     max_lora_rank=8))
    # the cancelled row sits between two adapted rows: if the bank kept its slot list, y's row would get none
    mixed = items_with([(0, ("x", 1.0)), (1, ("x", 1.0)), (2, ("y", 0.7))])
    assert all(loaded.unsupported(item) is None for item in mixed)
    never = lambda: False  # noqa: E731
    outputs = loaded.run(mixed[0].params, mixed, per_row_checks([never, CancelAfter(1), never]))
    assert outputs[1] is None and loaded.can_shrink
    for index in (0, 2):
        alone = loaded.run(mixed[index].params, [mixed[index]])[0]
        assert np.abs(outputs[index].astype(int) - alone.astype(int)).max() <= 1, index


@pytest.mark.parametrize("arch", ["flux-dev-tiny", "z-image-turbo-tiny"])
def test_rows_with_adapters_joining_a_running_batch_equal_their_solo_images(arch, tmp_path):
    """Continuous batching: rows with adapter x, none and adapter y join a running batch at different
    steps; each step's call names its rows' adapters (``_name_rows``), so each row ends with the image
    the dynamic model gives it alone."""
    import numpy as np

    from testing.rows import run_joining
    from triton_diffusion.families import step_model_for

    adapters = adapters_for(arch, tmp_path / "loras")
    settings = dict(pretrained_model=f"random:{arch}", **CPU, lora_dir=str(tmp_path / "loras"), max_lora_rank=8)
    dynamic = PipelineRunner.load(ModelSettings.build(**settings))
    running = PipelineRunner.load(ModelSettings.build(**settings, batching="continuous"))
    assert set(adapters) == {"x", "y"}
    items = items_with([(0, ("x", 1.0)), (1, ("", 1.0)), (2, ("y", 0.7))])
    assert all(running.unsupported(item) is None and dynamic.unsupported(item) is None for item in items)
    model = step_model_for(running.text_to_image, "cpu")
    every = run_joining(model, items, {1: [1], 2: [2]})  # row 1 joins at the second step, row 2 at the third
    for index, row in enumerate(every):
        alone = dynamic.run(items[index].params, [items[index]])[0]
        assert np.abs(model.decode([row])[0].astype(int) - alone.astype(int)).max() <= 1, index


def test_served_continuous_a_request_with_an_adapter_joins_mid_flight_and_equals_its_dynamic_image(adapters,
                                                                                                    tmp_path_factory):
    """Through tritonserver, continuous batching: a long request with adapter x is denoising when a
    short one with adapter y joins; each gets the image the dynamic model gives it alone."""
    import shutil

    import numpy as np

    from client import DiffusionClient, GenerationRequest
    from triton_diffusion import model_config

    from .conftest import start_server
    from .test_continuous import join_mid_flight

    root = tmp_path_factory.mktemp("lora_continuous")
    for adapter, folder in adapters.items():
        shutil.copytree(folder, root / "loras" / adapter)
    lora = {"lora_dir": str(root / "loras"), "max_lora_rank": "8"}
    model_config.write_model(root / "repo", model_config.variant("flux_lora", lora, base="flux_tiny"), base="flux_tiny")
    model_config.write_model(root / "repo", model_config.variant("flux_lora_running", lora, base="flux_tiny_continuous"),
                             base="flux_tiny_continuous")
    server = start_server(root, ["flux_lora", "flux_lora_running"], repository=root / "repo", require_ready=True)
    try:
        long = GenerationRequest(ROWS[0][0], seed=ROWS[0][1], steps=60, lora="x")
        short = GenerationRequest(ROWS[2][0], seed=ROWS[2][1], lora="y", lora_scale=0.7)
        finished, long_result, short_result = join_mid_flight(server, "flux_lora_running", long, short)
        assert finished == ["short", "long"]
        with DiffusionClient(f"grpc://{server.grpc_url}", "flux_lora", timeout_s=120) as client:
            for request, result in ((long, long_result), (short, short_result)):
                alone = client.generate(request).array
                assert np.abs(result.array.astype(int) - alone.astype(int)).max() <= 1, request.lora
    finally:
        server.stop()
