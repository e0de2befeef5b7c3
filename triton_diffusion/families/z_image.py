"""Z-Image (Turbo): single-stream DiT, Qwen3 text encoder, FLUX's 16-channel VAE; classifier-free guidance
whenever GUIDANCE_SCALE is above 0, as the pipeline's ``do_classifier_free_guidance`` (the Turbo
checkpoint is served at 0: no CFG)."""

from __future__ import annotations

from .base import Architecture, Family
from .stepping import FlowMatchSteps, RowState
from .weights import kl_vae, qwen_tokenizer


class ZImageSteps(FlowMatchSteps):
    """``ZImagePipeline.__call__``: classifier-free guidance per row (GUIDANCE_SCALE above 0), variable
    length captions as lists, float32 latents."""

    def prepare(self, items):
        import torch
        from diffusers.pipelines.z_image import pipeline_z_image

        pipe = self.pipe
        guided = [self.family.guided(item.params.guidance_scale) for item in items]
        # encode_prompt rewrites the list it is given (chat template): hand it fresh lists
        embeds, negative_embeds = pipe.encode_prompt(
            prompt=[item.prompt for item in items],
            negative_prompt=[item.negative_prompt or "" for item in items] if any(guided) else None,
            do_classifier_free_guidance=any(guided), device=self.device,
            max_sequence_length=self.max_sequence_length)
        rows = []
        for index, item in enumerate(items):
            params = item.params
            latents = self._noise(item, (pipe.transformer.in_channels, params.height, params.width), torch.float32)
            image_seq_len = (latents.shape[2] // 2) * (latents.shape[3] // 2)
            sigmas = pipeline_z_image.get_default_z_image_sigmas(params.num_inference_steps)
            mu = self._shift(image_seq_len, pipeline_z_image)
            timesteps, all_sigmas = self._schedule(params.num_inference_steps, sigmas, mu, pipeline_z_image)
            condition = {"embeds": embeds[index], "negative_embeds": negative_embeds[index] if guided[index] else None}
            rows.append(RowState(item, latents, condition, timesteps, all_sigmas))
        return rows

    def step(self, rows):
        import torch

        transformer = self.pipe.transformer
        latents = torch.cat([row.latents for row in rows])
        timestep = (1000 - self._current_timesteps(rows)) / 1000
        guided = [index for index, row in enumerate(rows) if self.guided(row)]
        # Conditional rows first, then the unconditional twins of the guided rows (the pipeline's order).
        typed = latents.to(transformer.dtype).unsqueeze(2)
        inputs = list(typed.unbind(dim=0)) + [typed[index] for index in guided]
        captions = [row.condition["embeds"] for row in rows] + [rows[index].condition["negative_embeds"] for index in guided]
        self._name_rows(rows, guided)
        outputs = transformer(inputs, torch.cat([timestep, timestep[guided]]), captions, joint_attention_kwargs=None,
                              return_dict=False)[0]
        predictions = []
        for index, row in enumerate(rows):
            positive = outputs[index].float()
            if self.guided(row):
                negative = outputs[len(rows) + guided.index(index)].float()
                positive = positive + row.guidance_scale * (positive - negative)
            predictions.append(positive)
        velocity = -torch.stack(predictions, dim=0).squeeze(2)
        self._advance(rows, self._euler(rows, latents, velocity.to(torch.float32)))

    def decode(self, rows):
        import torch

        return self._decode_shifted(torch.cat([row.latents for row in rows]).to(self.pipe.vae.dtype))


def build(tiny: bool):
    """Z-Image-Turbo: 6B single-stream DiT (30 layers + 2+2 refiners, dim 3840, 30 heads), Qwen3-4B text
    encoder, FLUX's 16-ch VAE; 8 denoising steps without CFG."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = qwen_tokenizer(512)
    if tiny:
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0,
            axes_dims=[8, 4, 4], axes_lens=[1024, 64, 64],
        )
        text = Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16, vocab_size=len(tokenizer), max_position_embeddings=1024)
        vae = kl_vae((16, 32, 32, 32), 16, 1, 16, flux=True)
    else:
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
            n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
            t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
        )
        text = Qwen3Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                           rope_theta=1000000.0, tie_word_embeddings=True)
        vae = kl_vae((128, 256, 512, 512), 16, 2, 32, flux=True)
    return assemble(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=vae, text_encoder=Qwen3Model(text).eval(), tokenizer=tokenizer, transformer=transformer,
    )


def assemble(**components):
    """A Z-Image pipeline of these components (the random architectures' and ``tiny_shapes_dit``'s)."""
    from diffusers import ZImagePipeline

    return ZImagePipeline(**components)


FAMILY = Family(
    "z-image",
    pipelines=("ZImagePipeline", "ZImageImg2ImgPipeline"),
    cfg_above=0.0,
    steps=ZImageSteps,
    step_pipelines=("ZImagePipeline",),
    schedulers=("FlowMatchEulerDiscreteScheduler",),
    # ZImageTransformer2DModel takes none of diffusers' cache hooks (no CacheMixin in 0.42), and
    # diffusers registers its block's input as ``hidden_states``; it is ``x``. Captions of different
    # lengths pad each row's sequence to the batch's longest: ``attn_mask`` marks a row's own tokens.
    cache_block_arguments=("x", "attn_mask"),
    text_length_varies=True,  # Qwen3 caption features, the prompt's own token count padded to 32s
    speed={"compile": "regional", "quantization": "fp8"},  # the repeated transformer blocks (docs/benchmarks.md)
    # fp8 query/key/value projections gave NaN latents at 1024 (each alone, on random weights); every
    # other group measured within 3% (perf/results/fp8_layers_NVIDIA_H200_2026-12-01_z-image-turbo.txt)
    fp8_skip=("attention.to_q", "attention.to_k", "attention.to_v"),
    architectures=(
        Architecture("z-image-turbo", lambda: build(tiny=False), guidance=0.0, steps=9),
        Architecture("z-image-turbo-tiny", lambda: build(tiny=True), guidance=0.0, steps=9, tiny=True),
    ),
    test_model="z_image_tiny",
)
