"""Pieces the families' random-weight builders share: tokenizers that need no download, CLIP and
T5 text encoders, KL VAEs, and building on the target device in the target dtype.

``pretrained_model: "random:<name>"`` in a ``config.pbtxt`` serves a family's ``Architecture``: the
real pipeline classes and shapes (so timings and memory are those of the real model), no weights
to download. GPU benchmarks use the full-size ones; the ``-tiny`` ones check the same code path on
a CPU.
"""

from __future__ import annotations

import contextlib

def byte_level_tokenizer(max_length: int):
    """A byte-level BPE tokenizer with no merges (every character a token, ids < 514)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    base = list(bytes_to_unicode().values())
    vocab = {token: index for index, token in enumerate(base + [t + "</w>" for t in base])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


@contextlib.contextmanager
def default_device_and_dtype(device, dtype):
    """Create parameters directly on ``device`` in ``dtype`` (a 12B model never exists in fp32)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def clip_text(hidden: int, layers: int, heads: int, intermediate: int, tokenizer, projection: int = 0,
               act: str = "quick_gelu"):
    """A CLIP text encoder; with ``projection``, the variant with a projection head (pooled output)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=max(49408 if hidden >= 768 else 0, len(tokenizer)),
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **({"projection_dim": projection} if projection else {}),
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def kl_vae(channels: tuple, latent_channels: int, layers: int, groups: int, flux: bool = False):
    from diffusers import AutoencoderKL

    extra = {"use_quant_conv": False, "use_post_quant_conv": False, "scaling_factor": 0.3611, "shift_factor": 0.1159} if flux else {}
    return AutoencoderKL(
        block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels), latent_channels=latent_channels,
        layers_per_block=layers, norm_num_groups=groups, **extra,
    )


def t5_encoder(tiny: bool, tokenizer, umt5: bool = False):
    """T5 v1.1 XXL encoder (FLUX, SD3) or UMT5-XXL (Wan): 24 layers, d_model 4096, 64 heads."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    if tiny:
        config = config_cls(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                            feed_forward_proj="gated-gelu")
    else:
        config = config_cls(vocab_size=256384 if umt5 else 32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64,
                            num_layers=24, feed_forward_proj="gated-gelu")
    return model_cls(config).eval()


# The Qwen chat template (Qwen3's, without tool calls): Z-Image formats every prompt through it.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# Wan VAE latent statistics (shared by Qwen-Image's VAE), per channel.
WAN_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                   3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def qwen_tokenizer(max_length: int):
    """Byte-level tokenizer with Qwen's chat markers as single tokens (templates stay short)."""
    return qwen_chat(byte_level_tokenizer(max_length))


def qwen_chat(tokenizer):
    """``tokenizer`` with Qwen's chat markers as single tokens and its chat template."""
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer
