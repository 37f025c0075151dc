"""Tiny configs for the SD-family parts: the real diffusers/transformers classes at toy size.

``tiny`` presets build the *same* classes as the real models (``UNet2DConditionModel``,
``AutoencoderKL``, ``CLIPTextModel``, ``CLIPVisionModelWithProjection``, ``CLIPTokenizer``)
from these configs with seeded random weights, so tests and the quickstart need no download.

Sizes (chosen for speed on 2 CPU cores, shapes kept like the real ones):

- VAE: 4 latent channels, downsampling factor 8 (four blocks), like SD1.5's VAE, so a
  512² render gives 64² latents; channels (8, 16, 16, 32) instead of (128, 256, 512, 512).
- UNet: block_out_channels (32, 64), one layer per block, cross-attention only in the
  first/last block, 8 heads of width 4 (32 channels), ``cross_attention_dim`` 32.
- CLIP text: hidden 32, 2 layers, 77 positions (SD's context length), byte-level vocabulary.
- CLIP vision: image 32², patch 8 (17 tokens), hidden 32, projection 16.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from transformers import CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

TINY_CONTEXT_LENGTH = 77
"""Text tokens per prompt, as in SD1.5 (CLIP-L)."""

TINY_RENDER_RESOLUTION = 32
"""Renders are resized to this before the tiny VAE (the tiny optimiser renders 32², so nothing is
resized): 4² latents, which the tiny UNets take down to 2²."""


def tiny_vae_config() -> dict[str, Any]:
    """``AutoencoderKL`` config: 4 latent channels, downsampling factor 8 (like SD1.5)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 16, 16, 32],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 0.18215,
    }


def tiny_unet_config(cross_attention_dim: int = 32) -> dict[str, Any]:
    """``UNet2DConditionModel`` config with SD1.5's layout at toy width."""
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "cross_attention_dim": int(cross_attention_dim),
        "norm_num_groups": 32,
    }


def tiny_clip_text_config(hidden_size: int = 32) -> CLIPTextConfig:
    """``CLIPTextConfig`` matching :func:`tiny_tokenizer` (vocabulary) and SD's 77 tokens."""
    return CLIPTextConfig(
        vocab_size=len(_byte_vocab()),
        hidden_size=int(hidden_size),
        intermediate_size=2 * int(hidden_size),
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_CONTEXT_LENGTH,
        projection_dim=int(hidden_size),
        bos_token_id=_byte_vocab()["<|startoftext|>"],
        eos_token_id=_byte_vocab()["<|endoftext|>"],
        pad_token_id=_byte_vocab()["<|endoftext|>"],
    )


def tiny_clip_vision_config() -> CLIPVisionConfig:
    """``CLIPVisionConfig`` of the tiny image encoder (stand-in for CLIP ViT-H/14)."""
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )


def tiny_tokenizer() -> CLIPTokenizer:
    """A deterministic, offline ``CLIPTokenizer`` over a byte-level vocabulary (no merges).

    Every UTF-8 byte is a token (plus its end-of-word form), so any prompt tokenizes; the
    padding/truncation behaviour (77 tokens, bos/eos) is the real CLIP tokenizer's.
    """
    return CLIPTokenizer(vocab=dict(_byte_vocab()), merges=[], model_max_length=TINY_CONTEXT_LENGTH)


@lru_cache(maxsize=1)
def _byte_vocab() -> dict[str, int]:
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable unicode map."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))
