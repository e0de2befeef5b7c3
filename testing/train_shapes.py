"""Train the tiny default model on coloured shapes (``shapes.py``), on the CPU, in minutes.

A real Stable Diffusion pipeline, small: a KL VAE (64x64 RGB <-> 16x16x4 latents), a CLIP text
encoder over a word-level tokenizer of the captions' words, and a UNet with cross-attention,
trained from scratch on scenes rendered on the fly. Saved with ``save_pretrained``, so the server
loads it like any checkpoint. The weights are committed (``models/tiny-shapes``); set-up never
retrains. Re-run (same seed, same recipe, same result up to float nondeterminism of threads):

    python -m testing.train_shapes --out models/tiny-shapes
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from .shapes import COLOURS, SHAPES, SIZE, TRAINING_SCENES, Scene, render

WORDS = ["a", "on", "background", *COLOURS, *SHAPES]


def word_tokenizer(max_length: int = 16, words=WORDS):
    """A CLIP tokenizer whose BPE merges spell each of ``words`` as one token."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    base = list(bytes_to_unicode().values())
    vocab = {token: index for index, token in enumerate(base + [t + "</w>" for t in base])}
    merges = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            merged = parts[0] + parts[1]
            vocab.setdefault(merged, len(vocab))
            parts = [merged] + parts[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=max_length)


def build(seed: int):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        sample_size=SIZE)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        # cross-attention at 8x8 and in the mid block: enough for one object's colour and kind
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return tokenizer, text_encoder, vae, unet, scheduler


def batches(rng: random.Random, size: int, scenes=TRAINING_SCENES):
    """Endless (images in [-1, 1] NCHW, captions) batches of random training scenes."""
    import torch

    while True:
        chosen = [Scene(*rng.choice(scenes)) for _ in range(size)]
        images = np.stack([render(scene, rng) for scene in chosen]).astype(np.float32) / 127.5 - 1
        yield torch.from_numpy(images).permute(0, 3, 1, 2), [scene.caption for scene in chosen]


def train(out: Path, seed: int, vae_steps: int, unet_steps: int, batch: int, log=print, ema_decay: float = 0.0) -> dict:
    import copy

    import torch
    import torch.nn.functional as F

    from triton_diffusion.families.stable_diffusion import assemble

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = random.Random(seed)
    tokenizer, text_encoder, vae, unet, scheduler = build(seed)
    data = batches(rng, batch)
    started = time.perf_counter()

    # 1. The VAE: L1 + MSE reconstruction (flat colours must come back exact) with a small KL
    # term, on half batches (it is the slower network per image).
    vae_data = batches(rng, max(1, batch // 2))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=vae_steps, pct_start=0.05)
    for step in range(vae_steps):
        images, _ = next(vae_data)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == vae_steps - 1:
            log(f"vae {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)")
    vae.requires_grad_(False).eval()
    with torch.no_grad():  # unit-variance latents for the UNet
        images, _ = next(data)
        scaling = float(1 / vae.encode(images).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=scaling)

    # 2. Text encoder and UNet together; 10% empty captions teach the unconditional branch (CFG).
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    # An exponential moving average of the weights (saved instead of the last ones when ema_decay > 0)
    averaged = (copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False))
    averaged_parameters = list(averaged[0].parameters()) + list(averaged[1].parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=unet_steps, pct_start=0.05)
    for step in range(unet_steps):
        images, captions = next(data)
        captions = ["" if rng.random() < 0.1 else caption for caption in captions]
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mean * scaling
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if ema_decay:
            with torch.no_grad():
                decay = min(ema_decay, (1 + step) / (10 + step))
                for average, current in zip(averaged_parameters, parameters):
                    average.lerp_(current, 1 - decay)
        if step % 200 == 0 or step == unet_steps - 1:
            log(f"unet {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)")
    if ema_decay:
        unet, text_encoder = averaged

    pipe = assemble(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                    scheduler=scheduler)
    pipe.save_pretrained(out)
    recipe = {"seed": seed, "vae_steps": vae_steps, "unet_steps": unet_steps, "batch": batch, "ema_decay": ema_decay,
              "train_seconds": round(time.perf_counter() - started), "torch_threads": torch.get_num_threads(),
              "data": "testing/shapes.py: one shape of 6 colours x 3 kinds on another colour, 64x64; "
                      "the HELD_OUT combinations are never rendered for training"}
    (out / "training.json").write_text(json.dumps(recipe, indent=1) + "\n")
    return recipe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/tiny-shapes"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--unet-steps", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ema-decay", type=float, default=0.999, help="save an exponential moving average of the weights (0: the last weights)")
    args = parser.parse_args(argv)
    print(train(args.out, args.seed, args.vae_steps, args.unet_steps, args.batch, log=lambda m: print(m, flush=True),
                ema_decay=args.ema_decay))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
