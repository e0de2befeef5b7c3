"""Train ``tiny_shapes_dit``: a Z-Image pipeline (single-stream flow-matching DiT, Qwen3 text encoder,
KL VAE) at tiny widths, on the two-object world of ``pairs.py``.

The real diffusers classes (``ZImageTransformer2DModel``, ``Qwen3Model``, ``AutoencoderKL``, the
Z-Image pipeline), every width a multiple of 16 (so fp8 kernels apply on a GPU), trained from
scratch on scenes rendered on the fly, in the pipeline's own convention: the text encoder's
second-to-last hidden states through the pipeline's ``_encode_prompt`` (chat template included),
timestep ``1 - sigma``, the transformer predicting ``x0 - noise`` (the pipeline negates it into the
scheduler's velocity), sigmas shifted as the scheduler shifts them. 10% empty captions teach the
unconditional branch (classifier-free guidance, as the Z-Image pipeline runs it above guidance 0).

Runs on a CUDA GPU (bf16 autocast) or the CPU. ``--seconds`` bounds the transformer stage: a short
probe measures the step rate and the schedule is sized to fit; a checkpoint (the averaged weights,
saved as a pipeline) is written every ``--checkpoint-minutes``, so a run cut short still leaves a model.

    python -m testing.train_pairs --out models/tiny-shapes-dit --seconds 420
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path

import numpy as np

from .pairs import TRAINING_SCENES, WORDS, PairScene, render
from .shapes import SIZE

MAX_TEXT_TOKENS = 32  # the chat-templated caption is ~20 word tokens; served with max_sequence_length 32
SHIFT = 2.0  # the scheduler's sigma shift (64 tokens: less than Z-Image-Turbo's 3.0 at 4,096)


def tokenizer():
    """The word-level CLIP-style tokenizer of ``train_shapes`` over this world's words, with Qwen's chat
    markers and template (the Z-Image pipeline formats every caption through it)."""
    from triton_diffusion.families.weights import qwen_chat

    from .train_shapes import word_tokenizer

    return qwen_chat(word_tokenizer(MAX_TEXT_TOKENS, words=(*WORDS, "user", "assistant")))


def build(seed: int, device):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from triton_diffusion.families.z_image import assemble

    torch.manual_seed(seed)
    words = tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(
        hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        head_dim=32, vocab_size=len(words), max_position_embeddings=64, rope_theta=10000.0,
        bos_token_id=words.bos_token_id, eos_token_id=words.eos_token_id, pad_token_id=words.pad_token_id))
    # Two levels: latents 32x32, so a 2x2 patch token covers 4x4 pixels and an object (14-22 px across)
    # spans 4-6 tokens: with three levels (8x8 pixels a token) the DiT placed and coloured objects
    # right but drew their kinds poorly (shapes 40% held-out after 1,753 steps of batch 256).
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                        norm_num_groups=16, sample_size=SIZE, use_quant_conv=False, use_post_quant_conv=False)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=192, n_layers=5, n_refiner_layers=1,
        n_heads=3, n_kv_heads=3, norm_eps=1e-5, qk_norm=True, cap_feat_dim=128, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[16, 24, 24], axes_lens=[64, 32, 32])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT, use_dynamic_shifting=False)
    pipe = assemble(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=words, transformer=transformer)
    return pipe.to(device)


def encode(pipe, captions: list[str]):
    """The Z-Image pipeline's ``_encode_prompt`` as one padded batch: (hidden states [B, MAX_TEXT_TOKENS, D],
    pad mask [B, MAX_TEXT_TOKENS]); the pipeline's per-caption list is each row's unpadded prefix."""
    texts = [pipe.tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                                add_generation_prompt=True, enable_thinking=True) for caption in captions]
    tokens = pipe.tokenizer(texts, padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True, return_tensors="pt")
    mask = tokens.attention_mask.to(pipe.text_encoder.device).bool()
    hidden = pipe.text_encoder(input_ids=tokens.input_ids.to(mask.device), attention_mask=mask,
                               output_hidden_states=True).hidden_states[-2]
    return hidden, ~mask


def batched_forward(transformer, latents, t, captions, caption_pads):
    """``ZImageTransformer2DModel.forward`` on a batch of equal-sized images whose captions all fit in
    one 32-token block (SEQ_MULTI_OF), as batched tensors: the list API prepares each row with its
    own small kernels (hundreds per row), which makes a training step on a GPU launch-bound. Here
    every row has the same positions (its caption padded to 32, the image after it), so the pad
    tokens are the only per-row difference. ``tests/test_tiny_shapes_dit.py`` checks it equals the
    list API."""
    import torch

    batch, channels, height, width = latents.shape
    rows, cols = height // 2, width // 2
    caption_tokens = caption_pads.shape[1]
    assert caption_tokens == 32 and (rows * cols) % 32 == 0, "one caption block, image tokens a multiple of 32"
    grid = transformer.create_coordinate_grid
    image_freqs = transformer.rope_embedder(grid((1, rows, cols), (caption_tokens + 1, 0, 0), latents.device).flatten(0, 2))
    caption_freqs = transformer.rope_embedder(grid((caption_tokens, 1, 1), (1, 0, 0), latents.device).flatten(0, 2))
    image_freqs, caption_freqs = image_freqs.expand(batch, *image_freqs.shape), caption_freqs.expand(batch, *caption_freqs.shape)
    adaln = transformer.t_embedder(t * transformer.t_scale).type_as(latents)
    # patchify (C, 1, H, W) -> (H/2 * W/2, 2 * 2 * C), per row as _patchify_image does
    x = latents.view(batch, channels, 1, 1, rows, 2, cols, 2).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(batch, rows * cols, -1)
    x = transformer.all_x_embedder["2-1"](x)
    for layer in transformer.noise_refiner:
        x = layer(x, None, image_freqs, adaln)
    caption = transformer.cap_embedder(captions)
    caption = torch.where(caption_pads.unsqueeze(-1), transformer.cap_pad_token, caption)
    for layer in transformer.context_refiner:
        caption = layer(caption, None, caption_freqs)
    unified, freqs = torch.cat([x, caption], dim=1), torch.cat([image_freqs, caption_freqs], dim=1)
    for layer in transformer.layers:
        unified = layer(unified, None, freqs, adaln)
    out = transformer.all_final_layer["2-1"](unified, c=adaln)[:, :rows * cols]
    return out.view(batch, 1, rows, cols, 1, 2, 2, -1).permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(batch, -1, 1, height, width)


def render_batch(seed: int, size: int, scenes=TRAINING_SCENES):
    """(images in [-1, 1] NCHW float32, captions) of ``size`` random scenes, from ``seed`` alone."""
    rng = random.Random(seed)
    chosen = [PairScene(*rng.choice(scenes)) for _ in range(size)]
    images = np.stack([render(scene, rng) for scene in chosen]).astype(np.float32) / 127.5 - 1
    return images.transpose(0, 3, 1, 2).copy(), [scene.caption for scene in chosen]


def batches(seed: int, size: int, workers: int):
    """Endless training batches, rendered by ``workers`` processes a few batches ahead."""
    import multiprocessing

    pool = multiprocessing.get_context("fork").Pool(workers)  # forked now, before CUDA starts in this process
    pending = [pool.apply_async(render_batch, (seed * 1_000_003 + index, size)) for index in range(2 * workers)]

    def endless():
        index = len(pending)
        while True:
            yield pending.pop(0).get()
            pending.append(pool.apply_async(render_batch, (seed * 1_000_003 + index, size)))
            index += 1

    return endless()


def reconstruction_adherence(vae, device, size: int = 256) -> dict:
    """The judge's scores on the VAE's reconstructions of held-out scenes: the ceiling for the DiT."""
    import torch

    from .pairs import HELD_OUT, adherence

    images, captions = render_batch(12345, size, HELD_OUT)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(torch.from_numpy(images).to(device)).latent_dist.mean).sample.float()
    pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return {key: round(value, 3) for key, value in adherence(captions, list(pixels)).items()}


def _vae_recipe(folder: Path) -> dict:
    """Where a reused VAE came from and how it was trained."""
    recipe = json.loads((folder / "training.json").read_text())
    if recipe.get("vae_from"):
        return recipe["vae_from"]
    recipe = next(run for run in recipe.get("earlier_runs", []) + [recipe] if run["vae_steps"])  # the run that trained it
    return {"folder": str(folder), **{key: recipe[key] for key in ("seed", "vae_steps", "batch", "device") if key in recipe}}


def quiet():
    from diffusers.utils import logging

    logging.set_verbosity_error()  # the per-save "kept in float32" notices


def train(out: Path, seed: int, vae_steps: int, seconds: float, batch: int, log=print, ema_decay: float = 0.999,
          checkpoint_minutes: float = 2.0, lr: float = 5e-4, resume: Path | None = None,
          vae_from: Path | None = None) -> dict:
    import torch
    import torch.nn.functional as F

    quiet()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    torch.backends.cuda.matmul.allow_tf32 = True
    rng = random.Random(seed)
    workers = max(1, min(8, (os.cpu_count() or 2) - 2))
    vae_data, data = batches(seed, max(1, batch // 2), workers), batches(seed + 1, batch, workers)
    if resume:  # a saved run's weights (its VAE kept as trained), a fresh optimizer and schedule
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(resume, torch_dtype=torch.float32).to(device)
        vae_steps, earlier = 0, json.loads((Path(resume) / "training.json").read_text())
    else:
        pipe, earlier = build(seed, device), None
        if vae_from:  # an earlier run's VAE (it reads no captions: the held-out scenes stay unseen by the DiT)
            from diffusers import AutoencoderKL

            pipe.register_modules(vae=AutoencoderKL.from_pretrained(Path(vae_from) / "vae").to(device))
            vae_steps = 0
    vae, text_encoder, transformer = pipe.vae, pipe.text_encoder, pipe.transformer
    started = time.perf_counter()
    tensor = lambda array: torch.from_numpy(array).to(device, non_blocking=True)

    # 1. The VAE: L1 + MSE reconstruction (flat colours must come back exact), a small KL term.
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    schedule = vae_steps and torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=vae_steps, pct_start=0.05)
    for step in range(vae_steps):
        images = tensor(next(vae_data)[0])
        with autocast:
            posterior = vae.encode(images).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample.float()
        loss = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == vae_steps - 1:
            log(f"vae {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)")
    vae.requires_grad_(False).eval()
    if vae_steps:
        log(f"vae reconstructions of held-out scenes, judged: {reconstruction_adherence(vae, device)}")
    if resume or vae_from:
        shift_factor, scaling = vae.config.shift_factor, vae.config.scaling_factor
    else:
        with torch.no_grad():  # zero-mean unit-variance latents, as the pipeline decodes them (scale and shift)
            latents = vae.encode(tensor(next(data)[0])).latent_dist.mean
            shift_factor, scaling = float(latents.mean()), float(1 / latents.std())
        vae.register_to_config(scaling_factor=scaling, shift_factor=shift_factor)

    # 2. Text encoder and transformer together, an exponential moving average kept for saving.
    parameters = list(transformer.parameters()) + list(text_encoder.parameters())
    averaged = (copy.deepcopy(transformer).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False))
    averaged_parameters = list(averaged[0].parameters()) + list(averaged[1].parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)

    def step_once(schedule=None):
        images, captions = next(data)
        captions = ["" if rng.random() < 0.1 else caption for caption in captions]
        with torch.no_grad(), autocast:
            x0 = (vae.encode(tensor(images)).latent_dist.mean.float() - shift_factor) * scaling
        noise = torch.randn_like(x0)
        uniform = torch.rand(x0.shape[0], device=device)
        sigma = SHIFT * uniform / (1 + (SHIFT - 1) * uniform)  # the scheduler's shift of a uniform grid
        noisy = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        with autocast:
            embeds, pads = encode(pipe, captions)
            prediction = batched_forward(transformer, noisy, 1 - sigma, embeds, pads).float().squeeze(2)
        loss = F.mse_loss(prediction, x0 - noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if schedule is not None:
            schedule.step()
        return loss

    def average(step):
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(averaged_parameters, parameters, 1 - decay)

    # A probe at a fixed warm-up rate sizes the schedule to the time left.
    for group in optimizer.param_groups:
        group["lr"] = lr * 0.1
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for step in range(40):  # the first steps pay for kernel selection: timed from the 11th on
        if step == 10:
            sync()
            probe_started = time.perf_counter()
        step_once()
        average(step)
    sync()
    rate = 30 / (time.perf_counter() - probe_started)
    total = max(100, int(rate * (seconds - (time.perf_counter() - started)) * 0.93))
    log(f"dit probe: {rate:.1f} steps/s; {total} steps planned")
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=0.05)
    last_checkpoint = time.perf_counter()
    earlier_runs = (earlier.pop("earlier_runs", []) + [earlier]) if earlier else []
    recipe = {"earlier_runs": earlier_runs, "seed": seed, "vae_steps": vae_steps, "vae_from": vae_from and _vae_recipe(Path(vae_from)), "dit_steps": total, "batch": batch, "ema_decay": ema_decay, "lr": lr,
              "shift": SHIFT, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "data": "testing/pairs.py: two shapes (6 colours x 3 kinds each) left of / above each other on a third "
                      "colour, 64x64; the HELD_OUT combinations are never rendered for training"}

    def save(final: bool):
        transformer_copy, text_copy = (averaged if ema_decay else (transformer, text_encoder))
        saved = type(pipe)(scheduler=pipe.scheduler, vae=vae, text_encoder=text_copy, tokenizer=pipe.tokenizer,
                           transformer=transformer_copy)
        saved.to("cpu", torch.float32)
        transformer_copy.to(torch.float16)  # 10 MB instead of 20 (served in float32: the loader casts back)
        saved.save_pretrained(out)
        transformer_copy.to(torch.float32)
        saved.to(device)
        (out / "training.json").write_text(json.dumps({**recipe, "final": final,
                                                       "train_seconds": round(time.perf_counter() - started)}, indent=1) + "\n")

    for step in range(total):
        loss = step_once(schedule)
        average(40 + step)
        if step % 500 == 0 or step == total - 1:
            log(f"dit {step}/{total}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)")
        if time.perf_counter() - last_checkpoint > checkpoint_minutes * 60:
            save(final=False)
            last_checkpoint = time.perf_counter()
    save(final=True)
    return json.loads((out / "training.json").read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/tiny-shapes-dit"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--seconds", type=float, default=420, help="the whole run's time budget (the DiT stage is sized to it)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--checkpoint-minutes", type=float, default=2.0)
    parser.add_argument("--resume", type=Path, help="continue from a saved run (its VAE as trained)")
    parser.add_argument("--vae-from", type=Path, help="a fresh DiT and text encoder on a saved run's VAE")
    args = parser.parse_args(argv)
    print(train(args.out, args.seed, args.vae_steps, args.seconds, args.batch, log=lambda m: print(m, flush=True),
                ema_decay=args.ema_decay, checkpoint_minutes=args.checkpoint_minutes, lr=args.lr, resume=args.resume,
                vae_from=args.vae_from))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
