"""The family registry against diffusers itself (in-process, each family's tiny random weights):
when classifier-free guidance runs, that every step adapter reproduces its pipeline's ``__call__``
for every scheduler its family declares, and that only ``triton_diffusion/families/`` names a
pipeline class. Every test here reads the registry: a new family module is covered without a line
added."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from triton_diffusion import families
from triton_diffusion.acceleration import denoiser_of
from triton_diffusion.families import FAMILIES, ContinuousUnsupported
from triton_diffusion.pipeline import PipelineRunner
from triton_diffusion.requests import text_to_image
from triton_diffusion.settings import ModelSettings

from .conftest import assert_same_image

ROOT = Path(__file__).resolve().parent.parent
SIZE, STEPS = 64, 4
_RUNNERS: dict[str, PipelineRunner] = {}


def tiny_runner(family) -> PipelineRunner:
    """The family's tiny architecture, loaded as a served model loads it (cached per module)."""
    architecture = next(a for a in family.architectures if a.tiny)
    if architecture.name not in _RUNNERS:
        _RUNNERS[architecture.name] = PipelineRunner.load(ModelSettings.build(
            pretrained_model=f"random:{architecture.name}", device="cpu", torch_dtype="float32", torch_num_threads=2,
            default_num_frames=5 if family.video else 0))
    return _RUNNERS[architecture.name]


def item(family, seed: int, guidance: float, steps: int = STEPS):
    return text_to_image(f"a red circle on a blue background, {seed}", seed, steps, guidance, SIZE, SIZE,
                         num_frames=5 if family.video else 0)


def by_name(collection):
    return pytest.mark.parametrize("family", collection, ids=[f.name for f in collection])


@by_name(FAMILIES)
@pytest.mark.parametrize("guidance", [0.0, 1.0, 1.5])
def test_classifier_free_guidance_runs_exactly_when_the_family_says(family, guidance):
    """Two steps through the pipeline's own ``__call__`` (as the server calls it): the denoiser sees
    two rows per image and step (negative and positive) exactly when ``family.guided(guidance)``."""
    runner = tiny_runner(family)
    pipe = runner.text_to_image
    rows, scheduler_steps = [], []

    def count(_module, args, kwargs):
        sample = args[0] if args else next(kwargs[k] for k in ("hidden_states", "sample", "x") if k in kwargs)
        rows.append(len(sample) if isinstance(sample, list) else sample.shape[0])

    step = pipe.scheduler.step
    pipe.scheduler.step = lambda *args, **kwargs: (scheduler_steps.append(1), step(*args, **kwargs))[1]
    hook = denoiser_of(pipe).register_forward_pre_hook(count, with_kwargs=True)
    try:
        one = item(family, 0, guidance, steps=2)
        runner.run(one.params, [one])
    finally:
        hook.remove()
        del pipe.scheduler.step
    # denoiser rows per scheduler step: some families batch negative and positive, others call twice
    assert scheduler_steps and sum(rows) == len(scheduler_steps) * (2 if family.guided(guidance) else 1), (
        family.name, guidance, rows, len(scheduler_steps))


STEPPED = [family for family in FAMILIES if family.steps is not None]


@pytest.mark.parametrize("family, scheduler", [(f, s) for f in STEPPED for s in f.schedulers],
                         ids=[f"{f.name}-{s}" for f in STEPPED for s in f.schedulers])
def test_the_step_adapter_reproduces_the_pipeline_for_every_declared_scheduler(family, scheduler):
    """A guided and an unguided row, the second joining two steps after the first (rows at different
    steps in one denoiser call): each equals the image the pipeline's own ``__call__`` makes for it
    alone with the same scheduler."""
    import diffusers

    runner = tiny_runner(family)
    pipe = runner.text_to_image
    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, scheduler).from_config(original.config)
    try:
        guided_scale = max(1.5, next(a for a in family.architectures if a.tiny).guidance)
        items = [item(family, 1, guided_scale), item(family, 2, 0.0)]
        alone = [runner.run(one.params, [one])[0] for one in items]
        adapter = families.step_model_for(pipe, runner.device)
        first = adapter.prepare(items[:1])
        for _ in range(2):
            adapter.step(first)
        rows, images = first + adapter.prepare(items[1:]), {}
        while rows:
            adapter.step(rows)
            done = [row for row in rows if row.finished]
            if done:
                images.update(zip([id(row.item) for row in done], adapter.decode(done)))
            rows = [row for row in rows if not row.finished]
    finally:
        pipe.scheduler = original
    for one, reference in zip(items, alone):
        assert_same_image(images[id(one)], reference)


def test_a_scheduler_the_adapter_cannot_reproduce_fails_the_load_by_name():
    flow = next(f for f in STEPPED if "FlowMatchEulerDiscreteScheduler" in f.schedulers)
    pipe = tiny_runner(flow).text_to_image
    original = pipe.scheduler
    import diffusers

    pipe.scheduler = diffusers.DPMSolverMultistepScheduler()
    try:
        with pytest.raises(ContinuousUnsupported, match="this model's is DPMSolverMultistepScheduler"):
            families.step_model_for(pipe, "cpu")
    finally:
        pipe.scheduler = original
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(original.config, stochastic_sampling=True)
    try:
        with pytest.raises(ContinuousUnsupported, match="stochastic_sampling"):
            families.step_model_for(pipe, "cpu")
    finally:
        pipe.scheduler = original


def test_the_registry_is_consistent():
    pipelines = [name for family in FAMILIES for name in family.pipelines]
    assert len(pipelines) == len(set(pipelines)), "a pipeline class in two families"
    for family in FAMILIES:
        assert set(family.shrink) <= set(family.pipelines) and set(family.step_pipelines) <= set(family.pipelines)
        assert (family.steps is None) == (not family.schedulers) == (not family.step_pipelines), family.name
        assert any(a.tiny for a in family.architectures), f"{family.name}: no tiny architecture for the tests"
        assert (ROOT / "model_repository" / family.test_model / "config.pbtxt").is_file(), family.name
        if family.steps is not None:
            assert (ROOT / "model_repository" / f"{family.test_model}_continuous" / "config.pbtxt").is_file()
        assert families.family_of(type(family.pipelines[0], (), {})) is family
    assert families.family_of(type("SomeNewPipeline", (), {})) is families.GENERIC


def test_no_module_outside_families_names_a_pipeline_class():
    """Family facts live in ``triton_diffusion/families/``; everything else asks the registry."""
    import diffusers

    names = sorted((n for n in dir(diffusers) if n.endswith("Pipeline") and n != "DiffusionPipeline"), key=len,
                   reverse=True)
    pattern = re.compile(r"\b(" + "|".join(names) + r")\b")
    offenders = []
    for folder in ("triton_diffusion", "client", "perf", "tests", "scripts", "model_repository", "testing"):
        for path in (ROOT / folder).rglob("*.py"):
            if "families" in path.relative_to(ROOT).parts[:2]:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{number}: {match.group(1)}"
                          for number, line in enumerate(path.read_text().splitlines(), 1)
                          for match in pattern.finditer(line)]
    assert not offenders, offenders
    # the check can fail: a family module does name its classes
    assert pattern.search((ROOT / "triton_diffusion" / "families" / "flux.py").read_text())
