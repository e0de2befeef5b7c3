"""Qwen-Image: MMDiT, Qwen2.5-VL text encoder, Wan-style 16-channel VAE. Its classifier-free guidance is
``true_cfg_scale`` (``guidance_scale`` only feeds guidance-distilled checkpoints) and runs only with a
negative prompt, so the family's default one is sent when a request has none."""

from __future__ import annotations

from ..paired_cfg import CfgPairing
from .base import Architecture, ContinuousUnsupported, Family
from .stepping import FlowMatchSteps, RowState
from .weights import WAN_LATENTS_MEAN, WAN_LATENTS_STD, qwen_tokenizer


def _unpadded(embeds, mask) -> list:
    """[B, tokens, D] captions and their mask (None: none padded) -> one unpadded [1, tokens, D] per row."""
    lengths = [embeds.shape[1]] * embeds.shape[0] if mask is None else mask.sum(dim=1).tolist()
    return [embeds[index:index + 1, :length] for index, length in enumerate(lengths)]


def _padded(captions: list):
    """Captions padded to the longest, and their mask (None when none is padded, as the pipeline)."""
    import torch

    longest = max(caption.shape[1] for caption in captions)
    embeds = torch.cat([torch.nn.functional.pad(caption, (0, 0, 0, longest - caption.shape[1])) for caption in captions])
    mask = torch.stack([torch.arange(longest, device=embeds.device) < caption.shape[1] for caption in captions]).long()
    return embeds, None if bool(mask.all()) else mask


def _merge_captions(cond: dict, uncond: dict) -> dict:
    """The prompts' and the negative prompts' captions (different lengths) as one padded batch."""
    embeds, mask = _padded(_unpadded(cond["encoder_hidden_states"], cond["encoder_hidden_states_mask"])
                           + _unpadded(uncond["encoder_hidden_states"], uncond["encoder_hidden_states_mask"]))
    return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}


class QwenImageSteps(FlowMatchSteps):
    """``QwenImagePipeline.__call__``: true CFG per row (GUIDANCE_SCALE above 1, with the family's
    negative prompt when a request sends none) and its norm rescale; captions of different
    lengths padded to the longest in the call, with the attention mask the pipeline builds."""

    def __init__(self, pipe, device: str, max_sequence_length: int = 0):
        super().__init__(pipe, device, max_sequence_length)
        if pipe.transformer.config.guidance_embeds:
            raise ContinuousUnsupported("guidance-distilled Qwen-Image checkpoints (guidance_embeds) have no step model")

    def _captions(self, prompts: list[str]) -> list:
        """One unpadded [1, tokens, D] caption per prompt."""
        embeds, mask = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                               max_sequence_length=self.max_sequence_length)
        return _unpadded(embeds, mask)

    def prepare(self, items):
        import numpy as np
        from diffusers.pipelines.qwenimage import pipeline_qwenimage as module

        pipe = self.pipe
        guided = [index for index, item in enumerate(items) if self.family.guided(item.params.guidance_scale)]
        captions = self._captions([item.prompt for item in items])
        negatives = self._captions([items[index].negative_prompt or self.family.cfg_negative_prompt for index in guided]) if guided else []
        channels = pipe.transformer.config.in_channels // 4
        rows = []
        for index, item in enumerate(items):
            params = item.params
            latents = self._noise(item, (channels, params.height, params.width), captions[index].dtype)
            sigmas = np.linspace(1.0, 1 / params.num_inference_steps, params.num_inference_steps)
            timesteps, all_sigmas = self._schedule(params.num_inference_steps, sigmas,
                                                   self._shift(latents.shape[1], module), module)
            condition = {"caption": captions[index],
                         "negative_caption": negatives[guided.index(index)] if index in guided else None}
            rows.append(RowState(item, latents, condition, timesteps, all_sigmas))
        return rows

    def step(self, rows):
        import torch

        pipe = self.pipe
        guided = [index for index, row in enumerate(rows) if self.guided(row)]
        latents = torch.cat([row.latents for row in rows])
        timestep = self._current_timesteps(rows).to(latents.dtype)
        height, width = rows[0].size
        scale = pipe.vae_scale_factor * 2
        captions = [row.condition["caption"] for row in rows] + [rows[index].condition["negative_caption"] for index in guided]
        embeds, mask = _padded(captions)
        count = len(rows) + len(guided)
        self._name_rows(rows, guided)
        output = pipe.transformer(
            hidden_states=torch.cat([latents, latents[guided]]),
            timestep=torch.cat([timestep, timestep[guided]]) / 1000,
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds,
            img_shapes=[[(1, height // scale, width // scale)]] * count,
            attention_kwargs={},
            return_dict=False,
        )[0]
        velocity = []
        for index, row in enumerate(rows):
            prediction = output[index:index + 1]
            if self.guided(row):
                negative = output[len(rows) + guided.index(index)][None]
                combined = negative + row.guidance_scale * (prediction - negative)
                prediction = combined * (torch.norm(prediction, dim=-1, keepdim=True)
                                         / torch.norm(combined, dim=-1, keepdim=True))
            velocity.append(prediction)
        self._advance(rows, self._euler(rows, latents, torch.cat(velocity)))

    def decode(self, rows):
        import torch

        pipe = self.pipe
        height, width = rows[0].size
        latents = pipe._unpack_latents(torch.cat([row.latents for row in rows]), height, width, pipe.vae_scale_factor)
        latents = latents.to(pipe.vae.dtype)
        config = pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        image = pipe.vae.decode(latents / inverse_std + mean, return_dict=False)[0][:, :, 0]
        return self._to_uint8(image)


def build(tiny: bool):
    """Qwen-Image: 20B MMDiT (60 blocks, 24x128 heads), Qwen2.5-VL-7B text encoder, Wan-style 16-ch VAE."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer(1024 + 34)
    if tiny:
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
        )
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 2, "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default"}}
        vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32}
        vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, True],
                                     latents_mean=WAN_LATENTS_MEAN, latents_std=WAN_LATENTS_STD)
        vocab = len(tokenizer)
    else:
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
        )
        text = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                "num_key_value_heads": 4, "rope_theta": 1000000.0, "max_position_embeddings": 128000,
                "rms_norm_eps": 1e-6, "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default"}}
        vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
                  "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112}
        vae = AutoencoderKLQwenImage(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                     temperal_downsample=[False, True, True],
                                     latents_mean=WAN_LATENTS_MEAN, latents_std=WAN_LATENTS_STD)
        vocab = 152064
    config = Qwen2_5_VLConfig(text_config={**text, "vocab_size": vocab}, vision_config=vision, vocab_size=vocab,
                              hidden_size=text["hidden_size"])
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
    )
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(),
        tokenizer=tokenizer, transformer=transformer,
    )


FAMILY = Family(
    "qwen-image",
    pipelines=("QwenImagePipeline", "QwenImageImg2ImgPipeline"),
    guidance_argument="true_cfg_scale",
    cfg_above=1.0,
    cfg_negative_prompt=" ",
    # diffusers runs true CFG as two transformer calls per step: paired into one (paired_cfg.py)
    cfg_pairing=CfgPairing(("encoder_hidden_states", "encoder_hidden_states_mask"), _merge_captions),
    steps=QwenImageSteps,
    step_pipelines=("QwenImagePipeline",),
    schedulers=("FlowMatchEulerDiscreteScheduler",),
    text_length_varies=True,  # Qwen2.5-VL prompt embeddings, the prompt's own token count
    speed={"compile": "regional"},  # the repeated transformer blocks (docs/benchmarks.md)
    architectures=(
        Architecture("qwen-image", lambda: build(tiny=False), guidance=4.0),
        Architecture("qwen-image-tiny", lambda: build(tiny=True), guidance=4.0, tiny=True),
    ),
    test_model="qwen_image_tiny",
)
