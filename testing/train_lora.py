"""Train a small LoRA adapter for ``tiny_shapes`` that swaps two colours, so a test can see which
adapter each row of a batch got (``tests/test_lora.py``).

The adapter ("swap-red-blue") is a rank-4 LoRA on the UNet's attention layers, trained with peft
through diffusers' own adapter API (``add_adapter``), on the model's own captions and the images
of the same scenes with red and blue exchanged (the shape's colour and the background's): with it,
"a red circle on a white background" draws a blue circle. Saved with the pipeline's
``save_lora_weights``, the format diffusers' loaders (and so the server's ``lora_dir``) read; a few
kilobytes, committed in ``models/tiny-shapes-loras``. On the CPU in minutes:

    python -m testing.train_lora --out models/tiny-shapes-loras/swap-red-blue
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from .shapes import ALL_SCENES, SIZE, TRAINING_SCENES, Scene, judge, render

SWAP = {"red": "blue", "blue": "red"}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def swapped(scene: Scene) -> Scene:
    """The scene the adapter draws for ``scene``'s caption."""
    return Scene(SWAP.get(scene.colour, scene.colour), scene.shape, SWAP.get(scene.background, scene.background))


def train(base: Path, out: Path, seed: int, steps: int, batch: int, rank: int, log=print) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    rng = random.Random(seed)
    pipe = DiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    unet, vae, text_encoder, tokenizer, scheduler = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights="gaussian"))
    parameters = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    scaling = vae.config.scaling_factor
    started = time.perf_counter()
    for step in range(steps):
        scenes = [Scene(*rng.choice(TRAINING_SCENES)) for _ in range(batch)]
        images = np.stack([render(swapped(scene), rng) for scene in scenes]).astype(np.float32) / 127.5 - 1
        with torch.no_grad():
            latents = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist.mean * scaling
            ids = tokenizer([scene.caption for scene in scenes], padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
            embeddings = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        loss = F.mse_loss(unet(scheduler.add_noise(latents, noise, timesteps), timesteps, embeddings).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"lora {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)")
    state = get_peft_model_state_dict(unet)
    metadata = {"r": rank, "lora_alpha": rank, "target_modules": TARGETS}
    type(pipe).save_lora_weights(out, unet_lora_layers=state, unet_lora_adapter_metadata=metadata)
    recipe = {"base": str(base), "seed": seed, "steps": steps, "batch": batch, "rank": rank, "targets": TARGETS,
              "train_seconds": round(time.perf_counter() - started), "torch_threads": torch.get_num_threads(),
              "data": "the base model's training captions, drawn with red and blue exchanged"}
    (out / "training.json").write_text(json.dumps(recipe, indent=1) + "\n")
    return recipe


def evaluate(base: Path, adapter: Path, seeds: int = 1, steps: int = 20) -> dict:
    """Share of every scene (90 captions x ``seeds``) judged as the swapped scene with the adapter, and
    as the captioned one without it, through diffusers' own ``load_lora_weights``."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    scenes = [Scene(*scene) for scene in ALL_SCENES for _ in range(seeds)]

    def draw():
        images = []
        for start in range(0, len(scenes), 30):
            chosen = scenes[start:start + 30]
            with torch.inference_mode():
                output = pipe([scene.caption for scene in chosen], num_inference_steps=steps, guidance_scale=7.5,
                              height=SIZE, width=SIZE, output_type="np",
                              generator=[torch.Generator().manual_seed(100 + start + i) for i in range(len(chosen))])
            images += list((output.images * 255).round().astype(np.uint8))
        return images

    def share(images, wanted):
        return float(np.mean([judge(image) == want for image, want in zip(images, wanted)]))

    plain = share(draw(), scenes)
    pipe.load_lora_weights(str(adapter), adapter_name="swap")
    return {"without adapter: drawn as captioned": plain, "with adapter: drawn swapped": share(draw(), map(swapped, scenes)),
            "scenes": len(scenes)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("models/tiny-shapes"))
    parser.add_argument("--out", type=Path, default=Path("models/tiny-shapes-loras/swap-red-blue"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args(argv)
    recipe = train(args.base, args.out, args.seed, args.steps, args.batch, args.rank)
    recipe["judged"] = evaluate(args.base, args.out)
    (args.out / "training.json").write_text(json.dumps(recipe, indent=1) + "\n")
    print(json.dumps(recipe, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
