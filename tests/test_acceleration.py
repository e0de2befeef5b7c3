"""Speed knobs, warm-up and batch buckets, in-process on the tiny pipelines (CPU).

torch.compile runs with the ``eager`` backend here: dynamo traces, guards and counts graphs
exactly as with inductor (what these tests check), without inductor's minutes of C++ builds on a
2-core CI machine. Inductor itself is exercised by ``perf/gpu_bench.py --speed compiled``.
"""

from __future__ import annotations

import numpy as np
import pytest

from testing.rows import CancelAfter
from triton_diffusion.acceleration import SpeedSettingError, bucket_for, compiled_graphs, step_cache_config
from triton_diffusion.cancellation import per_row_checks
from triton_diffusion.pipeline import ModelLoadError, PipelineRunner
from triton_diffusion.requests import text_to_image
from triton_diffusion.settings import ModelSettings
from triton_diffusion.tiny import ensure_tiny_model

from .conftest import FLUX_ROUNDING_SHARE, assert_same_image

SIZE, STEPS = 64, 4
CPU = {"device": "cpu", "torch_dtype": "float32", "torch_num_threads": 2, "speed_devices": ("cpu",)}
COMPILED = {**CPU, "compile": "full", "compile_backend": "eager", "warmup_sizes": ((SIZE, SIZE),)}


def tiny_sd(**settings) -> PipelineRunner:
    return PipelineRunner.load(ModelSettings.build(pretrained_model=str(ensure_tiny_model()), **{**CPU, **settings}))


def batch(count: int, size: int = SIZE, guidance: float = 7.5):
    return [text_to_image(f"a red barn in snow, view {row}", 300 + row, STEPS, guidance, size, size) for row in range(count)]


def run(runner, items, checks=None):
    return runner.run(items[0].params, items, per_row_checks(checks or [lambda: False] * len(items)))


@pytest.fixture(scope="module")
def eager():
    return tiny_sd()


@pytest.fixture(scope="module")
def solo_images(eager):
    """Each row of ``batch(3)`` served alone by the uncompiled pipeline."""
    return [run(eager, [item])[0] for item in batch(3)]


def test_bucket_is_the_smallest_that_holds_the_call():
    assert [bucket_for(rows, (1, 2, 4, 8, 16)) for rows in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert bucket_for(5, ()) == 5


def test_step_cache_configs_are_diffusers_own_and_typos_are_named():
    config = step_cache_config("FirstBlockCache threshold=0.08")
    assert type(config).__name__ == "FirstBlockCacheConfig" and config.threshold == 0.08
    with pytest.raises(SpeedSettingError, match="'FirstBlok' is not a diffusers cache config; known: .*FirstBlockCache"):
        step_cache_config("FirstBlok threshold=0.08")
    with pytest.raises(SpeedSettingError, match="'treshold' is not one of its options \\['threshold'\\]"):
        step_cache_config("FirstBlockCache treshold=0.08")


def test_the_output_is_the_pipelines_own_image_rounded_to_uint8(eager):
    """Images go to uint8 on the device (one copy to the host); same values as diffusers' numpy output."""
    import torch

    item = batch(1)[0]
    ours = run(eager, [item])[0]
    reference = eager.text_to_image(
        prompt=[item.prompt], num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE, output_type="np",
        generator=[torch.Generator("cpu").manual_seed(item.seed)]).images[0]
    assert np.array_equal(ours, (reference * 255).round().clip(0, 255).astype(np.uint8))


def test_buckets_pad_calls_to_warmed_static_graphs_and_serving_compiles_nothing(solo_images):
    runner = tiny_sd(**COMPILED, compile_dynamic="false", batch_buckets=(1, 2, 4), max_images_per_call=4)
    warmup = runner.warm_up()
    assert warmup.calls == 3 and warmup.compiled_graphs >= 3  # one static graph per bucket
    graphs = compiled_graphs()
    outputs = run(runner, batch(3))  # padded to the bucket of 4
    assert compiled_graphs() == graphs and runner.padded_rows == 1
    assert len(outputs) == 3
    for output, solo in zip(outputs, solo_images):
        assert_same_image(output, solo)
    # The counter can move: a size no warm-up covered compiles (what the served metric reports).
    run(runner, batch(1, size=2 * SIZE))
    assert compiled_graphs() > graphs


def test_a_cancelled_row_of_a_padded_call_rides_along_and_is_dropped_at_the_end(solo_images):
    runner = tiny_sd(**COMPILED, compile_dynamic="false", batch_buckets=(4,), max_images_per_call=4)
    runner.warm_up()
    graphs = compiled_graphs()
    never = lambda: False  # noqa: E731
    outputs = run(runner, batch(3), [never, CancelAfter(1), never])
    assert outputs[1] is None and compiled_graphs() == graphs  # the batch kept its warmed size
    assert_same_image(outputs[0], solo_images[0])
    assert_same_image(outputs[2], solo_images[2])
    # Every real row cancelled: the filler row alone does not keep the call going.
    assert run(runner, batch(3), [CancelAfter(1)] * 3) == [None, None, None]


def test_dynamic_batch_graphs_serve_every_batch_size_after_warm_up(solo_images):
    runner = tiny_sd(**COMPILED, compile_vae=True, max_images_per_call=4)
    assert runner.warm_up().calls == 3  # batch 1, 2 (the batch dimension becomes dynamic) and 4
    graphs = compiled_graphs()
    outputs = run(runner, batch(3))
    assert compiled_graphs() == graphs and runner.padded_rows == 0
    for output, solo in zip(outputs, solo_images):
        assert_same_image(output, solo)


def test_fused_qkv_drops_the_separate_projections_and_keeps_the_images(eager, solo_images):
    """diffusers keeps to_q/to_k/to_v beside the fused to_qkv (FLUX.1-dev: 4 GB that fp8 would also
    quantize); they are dropped, and the images stay the unfused pipeline's: self-attention loses
    all three, cross-attention (key and value fused) keeps its query."""
    fused = tiny_sd(fuse_qkv=True)
    unet = fused.text_to_image.unet
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in eager.text_to_image.unet.parameters())
    attentions = [module for module in unet.modules() if getattr(module, "fused_projections", False)]
    dropped = sum(p.numel() for module in attentions for name in ("to_qkv", "to_kv") if hasattr(module, name)
                  for p in getattr(module, name).parameters())  # the fused layers hold exactly the dropped weights
    assert attentions and any(f"separate projections dropped: {dropped:,} parameters" in applied for applied in fused.speed)
    for module in attentions:
        assert not hasattr(module, "to_k") and not hasattr(module, "to_v")
        assert hasattr(module, "to_q") == (not hasattr(module, "to_qkv"))
    for output, solo in zip(run(fused, batch(3)), solo_images):
        assert_same_image(output, solo)


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"attention_backend": "native"}, "does not go through diffusers' attention dispatcher"),
        ({"step_cache": "FirstBlockCache threshold=0.05"}, "UNet2DConditionModel has 0 transformer blocks"),
    ],
)
def test_a_knob_the_pipeline_cannot_take_fails_the_load_with_a_reason(knobs, message):
    with pytest.raises(ModelLoadError, match=message):
        tiny_sd(**knobs)


def test_speed_knobs_are_ignored_on_devices_not_listed():
    runner = tiny_sd(**{**COMPILED, "speed_devices": ("cuda",)})
    assert runner.speed == ("speed knobs ignored on cpu (speed_devices=cuda)",) and not runner.settings.speed.compiles


def test_flux_with_attention_backend_regional_compile_and_a_step_cache_that_never_skips():
    """diffusers' dispatcher, compile_repeated_blocks and a cache hook together; a threshold of 0
    never skips a block, so images equal the plain pipeline's; the cache state is reset between
    calls of different batch sizes."""
    plain = PipelineRunner.load(ModelSettings.build(pretrained_model="random:flux-dev-tiny", **CPU))
    fast = PipelineRunner.load(ModelSettings.build(
        pretrained_model="random:flux-dev-tiny", **CPU, attention_backend="native", compile="regional", compile_backend="eager",
        step_cache="FirstBlockCache threshold=0", fuse_qkv=True))
    assert any("compiled repeated blocks" in applied for applied in fast.speed)
    assert not any(hasattr(module, "to_q") or hasattr(module, "add_q_proj")
                   for module in fast.text_to_image.transformer.modules() if getattr(module, "fused_projections", False))
    items = batch(2, guidance=3.5)
    for count in (2, 1):
        for ours, reference in zip(run(fast, items[:count]), run(plain, items[:count])):
            assert_same_image(ours, reference, FLUX_ROUNDING_SHARE)


def test_the_continuous_warm_up_covers_every_row_count_and_an_unguided_row_alone():
    """The step loop's own warm-up (continuous mode): guided rows at every row count, plus one
    unguided row (a UNet batch of 1, which guided rows never form); serving then compiles nothing,
    whatever mix of guided and unguided rows joins."""
    from triton_diffusion.families import step_model_for

    settings = ModelSettings.build(pretrained_model=str(ensure_tiny_model()), **COMPILED, batching="continuous",
                             max_images_per_call=3, default_height=SIZE, default_width=SIZE, default_guidance_scale=7.5)
    assert settings.warmup_plan()[0] == (1, 2, 3)
    runner = PipelineRunner.load(settings)
    steps = step_model_for(runner.text_to_image, runner.device)
    report = steps.warm_up(*settings.warmup_plan())
    assert report.calls == 4 and report.compiled_graphs > 0
    graphs = compiled_graphs()
    for guidance_scales in ([0.0], [7.5, 0.0], [0.0, 0.0, 7.5]):
        rows = steps.prepare([text_to_image("a red barn", 300 + row, 2, scale, SIZE, SIZE)
                              for row, scale in enumerate(guidance_scales)])
        while not rows[0].finished:
            steps.step(rows)
        steps.decode(rows)
    assert compiled_graphs() == graphs


def test_cuda_graph_recordings_are_counted_from_torchs_recording_callbacks():
    """The counter listens where torch's CUDA-graph trees announce each recording (no GPU here to record)."""
    from torch._dynamo.callback import CallbackTrigger, callback_handler

    from triton_diffusion.acceleration import cuda_graph_recordings

    before = cuda_graph_recordings()
    with callback_handler.install_callbacks(CallbackTrigger.CUDAGRAPH_RECORDING, "0/0"):
        pass
    with callback_handler.install_callbacks(CallbackTrigger.DYNAMO, "0/1"):  # a compilation is not a recording
        pass
    assert cuda_graph_recordings() == before + 1


def test_the_warm_up_runs_its_plan_again_while_a_pass_records_cuda_graphs():
    """CUDA-graph trees record a shape on its second call: a module called once per pipeline call
    records in the second pass, and the warm-up stops after the first pass that records nothing."""
    from torch._dynamo.callback import CallbackTrigger, callback_handler

    from triton_diffusion.pipeline import run_warm_up

    plan = [(batch(1)[0].params, 1), (batch(2)[0].params, 2)]
    recordings_per_pass = iter([3, 1, 0, 0])
    calls = []

    def run(items):
        calls.append(len(items))
        if len(calls) % len(plan) == 0:  # the pass's last call: as many recordings as this pass makes
            for _ in range(next(recordings_per_pass)):
                with callback_handler.install_callbacks(CallbackTrigger.CUDAGRAPH_RECORDING, "0/0"):
                    pass

    report = run_warm_up(plan, run)
    assert calls == [1, 2] * 3 and report.calls == 6 and report.cuda_graphs == 4
    assert run_warm_up(plan, lambda items: None).calls == 2  # nothing recorded: one pass


@pytest.mark.parametrize("arch, guidance", [("z-image-turbo-tiny", 0.0), ("qwen-image-tiny", 4.0)])
def test_a_family_whose_text_length_is_the_prompts_own_compiles_nothing_after_the_warm_up(arch, guidance):
    """Z-Image and Qwen-Image pass each prompt's own token count (padded per batch, masked once the rows
    differ): the warm-up shows the compiled blocks several lengths, alone and mixed in a batch, so
    that prompts of lengths it never ran (short, long, mixed, at a batch size between the warmed
    ones) compile nothing while serving."""
    runner = PipelineRunner.load(ModelSettings.build(
        pretrained_model=f"random:{arch}", **CPU, compile="regional", compile_backend="eager", warmup_sizes=((SIZE, SIZE),),
        warmup_batch_sizes=(1, 2, 4), warmup_guidance_scales=(guidance,)))
    assert runner.family.text_length_varies
    runner.warm_up()
    prompts = ["a cat", "a photo of a dog running on the beach at sunset, cinematic, detailed",
               "an old lighthouse on a cliff above a stormy sea at night, waves crashing, gulls circling " * 3, "x"]
    before = compiled_graphs()
    for rows in (1, 2, 4, 3):
        for first in range(len(prompts)):
            items = [text_to_image(prompts[(first + row) % len(prompts)], row, 2, guidance, SIZE, SIZE) for row in range(rows)]
            runner.run(items[0].params, items)
    assert compiled_graphs() == before


def test_the_continuous_warm_up_of_a_family_whose_text_length_varies_covers_prompts_it_never_ran():
    """The same for the step loop (continuous mode): after its warm-up, rows of unwarmed prompt lengths,
    joining a running batch, compile nothing."""
    from triton_diffusion.families import step_model_for

    settings = ModelSettings.build(pretrained_model="random:z-image-turbo-tiny", **{**COMPILED, "compile": "regional"},
                                   batching="continuous", max_images_per_call=3, default_height=SIZE, default_width=SIZE,
                                   default_guidance_scale=0.0)
    runner = PipelineRunner.load(settings)
    steps = step_model_for(runner.text_to_image, runner.device)
    steps.warm_up(*settings.warmup_plan())
    graphs = compiled_graphs()
    running = steps.prepare([text_to_image("a cat", 1, 3, 0.0, SIZE, SIZE)])
    steps.step(running)
    joining = steps.prepare([text_to_image("an old lighthouse on a cliff above a stormy sea at night " * 4, 2, 3, 0.0, SIZE, SIZE),
                             text_to_image("two dogs", 3, 3, 0.0, SIZE, SIZE)])
    rows = running + joining
    while not all(row.finished for row in rows):
        live = [row for row in rows if not row.finished]
        steps.step(live)
    steps.decode(rows)
    assert compiled_graphs() == graphs


def test_a_video_model_warms_every_listed_clip_length_and_refuses_one_it_cannot_make():
    video = {**COMPILED, "pretrained_model": "random:wan2.1-t2v-1.3b-tiny", "default_num_frames": 5,
             "max_num_frames": 9, "warmup_batch_sizes": (1,)}
    runner = PipelineRunner.load(ModelSettings.build(**video, warmup_num_frames=(5, 9)))
    before = compiled_graphs()
    report = runner.warm_up()
    assert report.calls == 2 and report.compiled_graphs == compiled_graphs() - before > 0
    clip = text_to_image("a red barn in snow", 1, 2, 5.0, SIZE, SIZE, num_frames=9)
    before = compiled_graphs()
    assert runner.run(clip.params, [clip])[0].shape == (9, SIZE, SIZE, 3)
    assert compiled_graphs() == before  # the 9-frame clip was warmed
    with pytest.raises(ModelLoadError, match="warmup_num_frames: 6 frames: \\w+ makes 4k\\+1 frames"):
        PipelineRunner.load(ModelSettings.build(**video, warmup_num_frames=(6,))).warm_up()
