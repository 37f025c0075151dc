"""Where each model comes from. Every model field takes ``tiny`` (random seeded weights, no
download), ``toyworld`` (the exact toy world of ``toyworld``; see ``stages.models.factory``), a
Hugging Face hub id, a local diffusers directory, or a single checkpoint file."""

from __future__ import annotations

from dataclasses import dataclass

from stages.config_loading import Choice


class ModelDtype(Choice):
    """Weights' dtype (:func:`stages.models.device.resolve_dtype`); ``fp32`` / ``fp16`` / ``half`` /
    ``bf16`` are aliases."""

    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"
    fp32 = "fp32"
    fp16 = "fp16"
    half = "half"
    bf16 = "bf16"


@dataclass
class ModelsConfig:
    sd: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """SD1.5 (UNet, VAE, CLIP-L text encoder, tokenizer, scheduler) for the ISD side."""
    ip_adapter: str = "h94/IP-Adapter"
    """Repo/dir holding the IP-Adapter weights, or the weight file itself."""
    ip_adapter_subfolder: str = "models"
    """Folder of ``ip_adapter_weight_name`` inside the ``ip_adapter`` repo/dir (a directory is also
    searched at its top level); unused when ``ip_adapter`` is the weight file."""
    ip_adapter_weight_name: str = "ip-adapter_sd15.bin"
    """``ip-adapter_sd15.bin`` (4 tokens) or ``ip-adapter-plus_sd15.bin`` (16-token resampler)."""
    image_encoder: str = "h94/IP-Adapter:models/image_encoder"
    """CLIP ViT-H image encoder; ``repo:subfolder`` form allowed."""
    mvdream: str = "MVDream/MVDream:sd-v2.1-base-4view.pt"
    """MVDream multi-view UNet: original checkpoint (converted on load) or a converted directory."""
    mvdream_text: str = "stabilityai/stable-diffusion-2-1-base"
    """Where MVDream's tokenizer comes from (SD2.1-base layout); the UNet, VAE and OpenCLIP-H text
    encoder come from ``mvdream`` itself, whose original checkpoint ships no tokenizer."""
    reference: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Any diffusers text-to-image pipeline for the reference images."""
    dtype: ModelDtype = ModelDtype.auto
    """``auto``: fp16 on CUDA, fp32 on CPU."""
    device: str = "auto"
    """``auto`` (cuda when available) | ``cpu`` | ``cuda`` | ``cuda:N``."""
    seed: int = 0
    """Seed of the random weights of ``tiny`` models."""
    toyworld: str = "default"
    """The toy world (prompts, objects, model parameters) that every model key set to
    ``toyworld`` uses: ``default`` (``stages/toyworld/worlds/default.yaml``) or a world YAML
    file (docs/TOYWORLD.md describes the format)."""
