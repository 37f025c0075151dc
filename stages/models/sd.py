"""Stable Diffusion 1.5 parts: UNet, VAE, CLIP text encoder + tokenizer, DDPM scheduler.

``load_sd("tiny")`` builds the same diffusers/transformers classes from the configs in
:mod:`stages.models.tiny` with seeded random weights; any other source goes through
diffusers' ``StableDiffusionPipeline.from_pretrained`` (hub id or local diffusers directory)
or ``StableDiffusionPipeline.from_single_file`` (one ``.safetensors``/``.ckpt`` file).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from stages.models.sources import (
    SINGLE_FILE_HINT,
    ModelSource,
    ModelSourceError,
    hub_errors,
    hub_file,
    hub_kwargs,
    resolve_source,
)
from stages.models.tiny import tiny_clip_text_config, tiny_tokenizer, tiny_unet_config, tiny_vae_config

NUM_TRAIN_TIMESTEPS = 1000

SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "steps_offset": 1,
}
"""SD1.5's noise schedule (also used for ``tiny``)."""

SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}
"""SD1.5's UNet config (``unet/config.json`` of stable-diffusion-v1-5), for full-size benchmarks
with random weights (no download)."""


@dataclass
class SDComponents:
    """Frozen SD1.5 parts on one device/dtype (``eval()``, ``requires_grad_(False)``)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def alphas_cumprod(self) -> Tensor:
        """(1000,) float32 ᾱ_t on the CPU."""
        return self.scheduler.alphas_cumprod.float().cpu()

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD1.5 and for ``tiny``)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """(N, 77, C) CLIP text hidden states (SD1.5's conditioning) for N prompts."""
        return encode_text(self.tokenizer, self.text_encoder, prompts, self.dtype)


@torch.no_grad()
def encode_text(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: Sequence[str], dtype: torch.dtype
) -> Tensor:
    """Last hidden states (N, L, C) of ``text_encoder`` for N prompts, each padded/truncated to
    the tokenizer's ``model_max_length`` L, cast to ``dtype`` (SD1.5 / SD2.1 conditioning)."""
    tokens = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    ids = tokens.input_ids.to(text_encoder.device)
    return text_encoder(ids)[0].to(dtype)  # [0]: last_hidden_state


def load_sd(
    source: str | ModelSource,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    key: str = "models.sd",
) -> SDComponents:
    """SD1.5 parts from ``tiny``, a hub id, a diffusers directory or a single checkpoint file.

    ``seed`` seeds the random weights of ``tiny`` (ignored otherwise). The scheduler is always a
    ``DDPMScheduler`` (1000 training steps) built from the model's own scheduler config.
    """
    src = source if isinstance(source, ModelSource) else resolve_source(source, key)
    if src.kind == "tiny":
        parts = build_tiny_sd(seed)
    else:
        pipe = load_pipeline(src, dtype)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if scheduler.config.num_train_timesteps != NUM_TRAIN_TIMESTEPS:
            raise ModelSourceError(
                f"{src.key}: {src.describe()!r} has a scheduler with "
                f"{scheduler.config.num_train_timesteps} training steps, expected {NUM_TRAIN_TIMESTEPS}"
            )
        parts = SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler)
    for module in (parts.unet, parts.vae, parts.text_encoder):
        place(module, device, dtype)
    return parts


def build_tiny_sd(seed: int = 0) -> SDComponents:
    """Tiny SD1.5-layout parts with random weights; each part has its own seed stream."""
    unet = seeded(seed, lambda: UNet2DConditionModel.from_config(tiny_unet_config()))
    vae = seeded(seed + 1, lambda: AutoencoderKL.from_config(tiny_vae_config()))
    text_encoder = seeded(seed + 2, lambda: CLIPTextModel(tiny_clip_text_config(unet.config.cross_attention_dim)))
    return SDComponents(unet, vae, text_encoder, tiny_tokenizer(), DDPMScheduler(**SD15_SCHEDULER_CONFIG))


def place(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a frozen model to ``device``/``dtype`` (cast only when needed), ``eval()``, no grad."""
    module.to(device=device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module.eval().requires_grad_(False)


def seeded(seed: int, build):
    """Run ``build()`` with the global torch RNG seeded, restoring the caller's RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()



def load_pipeline(
    src: ModelSource,
    dtype: torch.dtype,
    pretrained_class: type = StableDiffusionPipeline,
    what: str = "Stable Diffusion",
) -> DiffusionPipeline:
    """A diffusers pipeline (no safety checker) from a hub id or diffusers directory
    (``pretrained_class.from_pretrained``) or one checkpoint file, local or ``org/name:file``
    (``StableDiffusionPipeline.from_single_file``). ``what`` names the model in errors, which are
    :class:`ModelSourceError` naming ``src.key``."""
    common = {"torch_dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    if src.kind in ("hub", "directory"):
        if src.kind == "directory" and not (src.path / "model_index.json").is_file():
            raise ModelSourceError(
                f"{src.key}: {src.location!r} is neither a diffusers directory (no model_index.json) "
                "nor a checkpoint file"
            )
        if src.filename:  # 'org/name:path/model.safetensors': one checkpoint file of a hub repo
            return load_pipeline(ModelSource(src.key, "file", str(hub_file(src))), dtype, pretrained_class, what)
        if src.subfolder:
            raise ModelSourceError(
                f"{src.key}: {src.describe()!r}: a pipeline loads from the root of a hub repo; "
                "give 'org/name', 'org/name:file.safetensors' or a local path"
            )
        with hub_errors(src, f"the {what} pipeline"):
            return pretrained_class.from_pretrained(src.location, **common, **hub_kwargs())
    try:
        with hub_errors(src, f"the {what} checkpoint", SINGLE_FILE_HINT):
            return StableDiffusionPipeline.from_single_file(src.location, **common, **hub_kwargs())
    except ModelSourceError:
        raise
    except Exception as exc:  # diffusers raises ValueError/KeyError/... for a non-SD file
        raise ModelSourceError(
            f"{src.key}: {src.location!r} is not a Stable Diffusion 1.x checkpoint diffusers can read "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Single files need the "
            "pipeline config from the hub cache; without it, convert to a diffusers directory."
        ) from exc
