"""What pairing the guidance passes costs and saves, one denoiser call at a time.

For one architecture with two-pass guidance (random weights of its real config, on the GPU), it
encodes a prompt and the family's negative prompt as the pipeline does, then times the denoiser
(synchronised wall time, after two warm-up calls; median of repeats) at one size and timestep:

- ``apart``: the pipeline's two calls of B rows each (no mask: one caption length per call);
- ``paired``: one call of 2B rows as ``paired_cfg`` runs it (the family's merge: captions of two
  lengths padded under a mask), per attention backend given;
- ``paired, equal lengths``: the same 2B rows with both captions cut to one length, so no mask is
  needed: what pairing would cost without the masked attention.

    python perf/cfg_pairing.py --arch qwen-image --size 1024 --backends native,_native_cudnn,flex
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from perf.lib import card_name, log, today, write_results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="qwen-image")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1, help="B: rows per pass")
    parser.add_argument("--backends", default="native", help="attention backends for the paired call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompt", default="a lighthouse on a rocky coast at dusk, photograph, golden light, waves")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    import torch

    from triton_diffusion.families import build_random_pipeline, family_of

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    pipe = build_random_pipeline(args.arch, args.device, dtype)
    pipe.to(args.device)
    family = family_of(pipe)
    pairing = family.cfg_pairing
    if pairing is None:
        raise SystemExit(f"{args.arch}: its family runs guidance in one call already")
    transformer = pipe.transformer
    rows = args.batch
    with torch.inference_mode():
        positive, positive_mask = pipe.encode_prompt(prompt=[args.prompt] * rows, device=args.device)
        negative, negative_mask = pipe.encode_prompt(prompt=[family.cfg_negative_prompt or " "] * rows, device=args.device)
        channels = transformer.config.in_channels // 4
        latents = pipe.prepare_latents(rows, channels, args.size, args.size, dtype, args.device, None)
        scale = pipe.vae_scale_factor * 2
        shared = {"hidden_states": latents, "timestep": torch.full((rows,), 0.5, device=args.device, dtype=dtype),
                  "guidance": None, "img_shapes": [[(1, args.size // scale, args.size // scale)]] * rows,
                  "attention_kwargs": {}, "return_dict": False}
        cond = {"encoder_hidden_states": positive, "encoder_hidden_states_mask": positive_mask}
        uncond = {"encoder_hidden_states": negative, "encoder_hidden_states_mask": negative_mask}
        doubled = {**shared, "hidden_states": torch.cat([latents, latents]), "timestep": torch.cat([shared["timestep"]] * 2),
                   "img_shapes": shared["img_shapes"] * 2}
        shortest = min(positive.shape[1], negative.shape[1])
        equal = {"encoder_hidden_states": torch.cat([positive[:, :shortest], negative[:, :shortest]]),
                 "encoder_hidden_states_mask": None}

        def timed(run) -> float:
            """Milliseconds per run: median of the repeats, after two warm-up runs."""
            for _ in range(2):
                run()
            times = []
            for _ in range(args.repeats):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                started = time.perf_counter()
                run()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - started) * 1000)
            return statistics.median(times)

        rows_out = []
        transformer.set_attention_backend("native")
        apart = timed(lambda: (transformer(**shared, **cond), transformer(**shared, **uncond)))
        rows_out.append(("apart: 2 calls of B, native", apart))
        for backend in args.backends.split(","):
            try:
                transformer.set_attention_backend(backend)
                rows_out.append((f"paired: 1 call of 2B, masked, {backend}",
                                 timed(lambda: transformer(**doubled, **pairing.merged(cond, uncond)))))
            except Exception as exc:  # an attention backend this host lacks
                rows_out.append((f"paired: 1 call of 2B, masked, {backend}: {type(exc).__name__}: {str(exc)[:120]}", float("nan")))
        transformer.set_attention_backend("native")
        rows_out.append(("paired, equal lengths: 1 call of 2B, no mask, native", timed(lambda: transformer(**doubled, **equal))))

    card = card_name()
    header = (f"card: {card}, torch {torch.__version__}, {args.arch} eager {str(dtype).removeprefix('torch.')}, {args.size}x{args.size}, B={rows}, "
              f"captions {positive.shape[1]} and {negative.shape[1]} tokens, median of {args.repeats}, {today()}")
    lines = [header, "", "| denoiser calls for one step of B images | ms | vs apart |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {ms / apart:.2f} |" for name, ms in rows_out]
    table = "\n".join(lines)
    stem = f"cfg_pairing_{card.replace(' ', '_')}_{today()}_{args.arch}_{args.size}_b{rows}"
    write_results(args.out, stem, {"args": {k: str(v) for k, v in vars(args).items()}, "card": card,
                                   "rows": [{"calls": name, "ms": ms} for name, ms in rows_out]}, table)
    log(f"wrote {stem}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
