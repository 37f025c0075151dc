"""MVDream's multi-view UNet on diffusers building blocks.

MVDream (Shi et al. 2023, ``bytedance/MVDream``) is SD2.1-base with two changes, both
expressed here through diffusers' own seams instead of a forked UNet:

- **Camera embedding added to the time embedding.** MVDream's
  ``camera_embed = Sequential(Linear(16, 1280), SiLU, Linear(1280, 1280))`` and
  ``emb = time_embed(t) + camera_embed(camera)`` is exactly diffusers'
  ``class_embed_type="projection"`` (a ``TimestepEmbedding``: linear_1 → SiLU → linear_2,
  added to the time embedding in ``UNet2DConditionModel.forward``), with the flattened
  normalised camera-to-world matrix (N, 16) passed as ``class_labels``.
- **Self-attention across the views of an object.** Every ``attn1`` gets a
  :class:`MultiViewAttnProcessor` that reshapes ``(b f) l c → b (f l) c`` (``f`` =
  ``num_frames`` = 4), attends, and reshapes back (MVDream's ``BasicTransformerBlock3D``).
  ``num_frames`` travels in ``cross_attention_kwargs``.

:func:`stages.models.mvdream_load.load_mvdream` builds :class:`MVDreamComponents` from ``tiny``
(random seeded weights), an original MVDream checkpoint (converted on load by
:mod:`stages.models.mvdream_convert`, which builds on this module), a directory written by that
converter, or a hub ``repo:filename``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from stages.models.sd import encode_text, seeded
from stages.models.sources import ModelSourceError, hub_errors, hub_kwargs, resolve_source
from stages.models.tiny import tiny_clip_text_config, tiny_tokenizer, tiny_vae_config

NUM_FRAMES = 4
"""Views per object that attend to each other (MVDream's ``n_view``)."""
CAMERA_DIM = 16
"""Flattened 4×4 camera-to-world matrix."""
MVDREAM_SCALING_FACTOR = 0.18215
MARKER_FILE = "mvdream.json"
"""Written by the converter into its output directory; marks an MVDream directory."""
SCHEDULE_FILE = "schedule.safetensors"


# ----------------------------------------------------------------------------- configs


def mvdream_unet_config(
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
    attention_levels: Sequence[bool] = (True, True, True, False),
    layers_per_block: int = 2,
    cross_attention_dim: int = 1024,
    num_head_channels: int = 64,
    transformer_layers_per_block: int = 1,
    camera_dim: int = CAMERA_DIM,
    norm_num_groups: int = 32,
    in_channels: int = 4,
    out_channels: int = 4,
    use_linear_projection: bool = True,
    sample_size: int = 32,
) -> dict[str, Any]:
    """``UNet2DConditionModel`` config of an MVDream UNet (defaults: ``sd-v2.1-base-4view``).

    ``num_head_channels`` is MVDream's fixed head width; diffusers' (misnamed)
    ``attention_head_dim`` holds the number of heads per level, ``channels // 64`` for
    SD2.1 (5, 10, 20, 20).
    """
    if len(attention_levels) != len(block_out_channels):
        raise ValueError(
            f"attention_levels has {len(attention_levels)} entries, block_out_channels "
            f"{len(block_out_channels)}"
        )
    for channels in block_out_channels:
        if channels % num_head_channels:
            raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)]
    return {
        "sample_size": int(sample_size),
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": [int(c) for c in block_out_channels],
        "layers_per_block": int(layers_per_block),
        "transformer_layers_per_block": int(transformer_layers_per_block),
        "cross_attention_dim": int(cross_attention_dim),
        "attention_head_dim": [int(c) // int(num_head_channels) for c in block_out_channels],
        "use_linear_projection": bool(use_linear_projection),
        "norm_num_groups": int(norm_num_groups),
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": int(camera_dim),
    }


def tiny_mvdream_unet_config(cross_attention_dim: int = 32) -> dict[str, Any]:
    """The MVDream layout at toy width: channels (32, 64, 64), attention on the first two
    levels (like SD2.1's last level without attention), 8-channel heads, one layer per block."""
    return mvdream_unet_config(
        block_out_channels=(32, 64, 64),
        attention_levels=(True, True, False),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        num_head_channels=8,
        sample_size=8,
    )


def mvdream_alphas_cumprod(
    num_train_timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012
) -> Tensor:
    """ᾱ_t of MVDream/SD2.1 (ldm ``linear`` schedule, i.e. diffusers ``scaled_linear``), (T,) fp32."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


# ------------------------------------------------------------------ multi-view attention


class MultiViewAttnProcessor:
    """Self-attention over all ``num_frames`` views of an object (MVDream ``BasicTransformerBlock3D``).

    Hidden states (b·f, l, c) are viewed as (b, f·l, c) so every token attends to the tokens
    of all f views of its group, then viewed back. Consecutive samples form a group, so a
    batch must be ordered object by object, ``num_frames`` views each.
    """

    def __init__(self) -> None:
        self.inner = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        num_frames: int = 1,
    ) -> Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("MultiViewAttnProcessor is for self-attention (attn1) only")
        if num_frames <= 1:
            return self.inner(attn, hidden_states, None, attention_mask, temb)
        if hidden_states.ndim != 3:
            raise ValueError(f"expected (b·f, tokens, channels) hidden states, got {tuple(hidden_states.shape)}")
        batch, tokens, channels = hidden_states.shape
        if batch % num_frames:
            raise ValueError(f"batch {batch} is not a multiple of num_frames {num_frames}")
        grouped = hidden_states.reshape(batch // num_frames, num_frames * tokens, channels)
        out = self.inner(attn, grouped, None, attention_mask, temb)
        return out.reshape(batch, tokens, channels)


class ViewAgnosticAttnProcessor(AttnProcessor2_0):
    """Plain attention that accepts (and ignores) ``num_frames``: used for cross-attention."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        num_frames: int = 1,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def set_multiview_attention(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Install :class:`MultiViewAttnProcessor` on every ``attn1`` (in place); returns ``unet``."""
    processors = {
        name: MultiViewAttnProcessor() if name.endswith("attn1.processor") else ViewAgnosticAttnProcessor()
        for name in unet.attn_processors
    }
    if not any(isinstance(p, MultiViewAttnProcessor) for p in processors.values()):
        raise ValueError("UNet has no self-attention (attn1) layers to make multi-view")
    unet.set_attn_processor(processors)
    return unet


def build_mvdream_unet(config: dict[str, Any]) -> UNet2DConditionModel:
    """An MVDream UNet (random weights) from :func:`mvdream_unet_config`-style ``config``."""
    if config.get("class_embed_type") != "projection":
        raise ValueError("MVDream UNet config needs class_embed_type='projection' (camera embedding)")
    return set_multiview_attention(UNet2DConditionModel(**config))


def mvdream_forward(
    unet: UNet2DConditionModel,
    sample: Tensor,
    timesteps: Tensor,
    context: Tensor,
    camera: Tensor,
    num_frames: int = NUM_FRAMES,
) -> Tensor:
    """ε prediction of the multi-view UNet.

    ``sample`` (N, 4, h, w) with N = groups·num_frames, views of one object consecutive;
    ``timesteps`` (N,); ``context`` (N, 77, D) text embeddings; ``camera`` (N, 16) from
    :func:`normalize_camera`. Returns (N, 4, h, w).
    """
    n = sample.shape[0]
    if n % num_frames:
        raise ValueError(f"MVDream batch {n} is not a multiple of num_frames {num_frames}")
    if camera.shape != (n, unet.config.projection_class_embeddings_input_dim):
        raise ValueError(
            f"camera must have shape ({n}, {unet.config.projection_class_embeddings_input_dim}), "
            f"got {tuple(camera.shape)}"
        )
    return unet(
        sample,
        timesteps,
        encoder_hidden_states=context,
        class_labels=camera.to(sample.dtype),
        cross_attention_kwargs={"num_frames": int(num_frames)},
    ).sample


def normalize_camera(c2w: Tensor) -> Tensor:
    """MVDream's camera condition: the camera-to-world matrix with its translation moved
    onto the unit sphere, flattened row-major. (N, 4, 4) → (N, 16).

    As in MVDream-threestudio, ``c2w`` is used as given (world z-up, camera looking along −z,
    i.e. threestudio's "Blender" convention; no OpenGL→Blender flip).
    """
    if c2w.ndim != 3 or c2w.shape[-2:] != (4, 4):
        raise ValueError(f"c2w must have shape (N, 4, 4), got {tuple(c2w.shape)}")
    matrix = c2w.clone()
    translation = matrix[:, :3, 3]
    matrix[:, :3, 3] = translation / (translation.norm(dim=1, keepdim=True) + 1e-8)
    return matrix.reshape(-1, 16)


# ------------------------------------------------------------------------- components


@dataclass
class MVDreamComponents:
    """Everything MVDream guidance needs; ``unet`` already has multi-view attention installed."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    """OpenCLIP-H text tower in SD2.1's diffusers layout (23 layers = OpenCLIP's penultimate)."""
    tokenizer: CLIPTokenizer
    alphas_cumprod: Tensor
    """(1000,) fp32 on the CPU."""
    num_frames: int = NUM_FRAMES

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


def encode_prompts(components: MVDreamComponents, prompts: Sequence[str]) -> Tensor:
    """Text embeddings (N, L, D) for the UNet's cross-attention (SD2.1 prompt processing)."""
    return encode_text(components.tokenizer, components.text_encoder, prompts, components.dtype)


def build_tiny_mvdream(seed: int = 0) -> MVDreamComponents:
    """Random seeded MVDream parts at toy size (fp32, CPU); no download."""
    # diffusers/transformers initialise from the global generator; one seeded stream, built in
    # this order (text encoder, VAE, UNet), the caller's RNG state left untouched.
    text_encoder, vae, unet = seeded(
        seed,
        lambda: (
            CLIPTextModel(tiny_clip_text_config(hidden_size=32)),
            AutoencoderKL(**tiny_vae_config()),
            build_mvdream_unet(tiny_mvdream_unet_config(cross_attention_dim=32)),
        ),
    )
    return MVDreamComponents(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tiny_tokenizer(),
        alphas_cumprod=mvdream_alphas_cumprod(),
    )


def load_tokenizer(text_source: str | None, checkpoint: Path | str, key: str = "models.mvdream_text") -> CLIPTokenizer:
    """The SD2.1 (OpenCLIP) tokenizer from ``text_source``: ``tiny``, a hub id, or a directory
    (its ``tokenizer/`` subfolder or itself)."""
    if text_source is None:
        raise ModelSourceError(
            f"{key} is needed to tokenize prompts for {checkpoint} (the original MVDream checkpoint "
            "holds no tokenizer); use stabilityai/stable-diffusion-2-1-base or a directory with its tokenizer/"
        )
    src = resolve_source(text_source, key)
    if src.kind == "tiny":
        return tiny_tokenizer()
    if src.kind == "directory":
        sub = src.path / "tokenizer"
        with hub_errors(src, "the tokenizer"):
            return CLIPTokenizer.from_pretrained(str(sub if sub.is_dir() else src.path))
    if src.kind == "hub":
        subfolder = "/".join(p for p in (src.subfolder, "tokenizer") if p)
        with hub_errors(src, "the tokenizer"):
            return CLIPTokenizer.from_pretrained(src.location, subfolder=subfolder, **hub_kwargs())
    raise ModelSourceError(f"{key}: a tokenizer cannot come from a single file {src.location!r}")
