"""Which layers of a denoiser can run in fp8: the fidelity guard's measurement, per group of layers.

For one architecture (random weights of its real config, on the GPU) it runs the guard's fixed-seed
call (``pipeline.latents_probe``: the default size, steps and guidance) unquantized, then again with
``quantization`` on (a fresh copy of the denoiser each time):

- every qualifying linear layer;
- every layer but one group (a group: the layers whose qualified name contains one name component,
  e.g. ``feed_forward`` or ``adaLN_modulation``), per group;
- only one group, per group;

and prints the relative L2 error of the latents per trial (``inf``: NaN/inf latents), so the
family's ``fp8_skip`` can name the groups that overflow.

    python perf/fp8_layers.py --arch z-image-turbo --size 1024 --steps 9
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from perf.lib import card_name, log, model_parameters, today, write_results


def groups_of(names: list[str]) -> dict[str, list[str]]:
    """Name component -> the layers containing it, one entry per distinct set of layers."""
    groups: dict[str, list[str]] = {}
    seen: set[tuple[str, ...]] = set()
    for component in sorted({part for name in names for part in name.split(".") if not part.isdigit()}):
        members = [name for name in names if component in name.split(".")]
        key = tuple(members)
        if key not in seen and len(members) < len(names):
            seen.add(key)
            groups[component] = members
    return groups


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="z-image-turbo")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=0, help="0: the architecture's")
    parser.add_argument("--quantization", default="fp8")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    import torch

    from triton_diffusion.acceleration import denoiser_of
    from triton_diffusion.pipeline import PipelineRunner, latents_probe
    from triton_diffusion.quantization import quantizable_layers, relative_error
    from triton_diffusion.settings import ModelSettings

    settings = ModelSettings.from_parameters(model_parameters(args.arch, args.device, (args.size, args.size), args.steps))
    runner = PipelineRunner.load(settings)
    pipe = runner.text_to_image
    attribute = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    original = denoiser_of(pipe)
    probe = latents_probe(pipe, settings)
    started = time.perf_counter()
    reference = probe()
    log(f"{args.arch}: unquantized call {time.perf_counter() - started:.2f}s")
    names = quantizable_layers(original, ())
    groups = groups_of(names)

    def trial(what: str, layers: list[str]) -> dict:
        """The probe with exactly ``layers`` quantized, on a fresh copy of the denoiser."""
        from torchao.quantization import quantize_

        from triton_diffusion.quantization import torchao_config

        wanted = set(layers)
        setattr(pipe, attribute, copy.deepcopy(original))
        try:
            quantize_(getattr(pipe, attribute), torchao_config(args.quantization), filter_fn=lambda module, name: name in wanted)
            error = relative_error(reference, probe())
        finally:
            setattr(pipe, attribute, original)
            torch.cuda.empty_cache()
        log(f"  {what}: {len(wanted)} layers, " + ("NaN/inf" if error == float("inf") else f"relative error {error:.4%}"))
        return {"trial": what, "layers": len(wanted), "relative_error": error}

    rows = [trial("all qualifying layers", names)]
    for group, members in groups.items():
        rows.append(trial(f"all but {group}", [name for name in names if name not in members]))
        rows.append(trial(f"only {group}", members))
    card = card_name()
    header = (f"{args.arch} {args.size}x{args.size}, {settings.defaults.default_steps} steps, {args.quantization}: relative L2 error "
              f"of the fixed-seed latents against unquantized, per group of linear layers ({len(names)} qualify); card: {card}, "
              f"torch {torch.__version__}, {today()}")
    table = "\n".join([header, "| trial | layers quantized | relative error |", "|---|---|---|"] + [
        f"| {row['trial']} | {row['layers']} | {'NaN/inf' if row['relative_error'] == float('inf') else format(row['relative_error'], '.4%')} |"
        for row in rows])
    stem = f"fp8_layers_{card.replace(' ', '_')}_{today()}_{args.arch}"
    write_results(args.out, stem, {"args": vars(args), "groups": groups, "rows": rows}, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
