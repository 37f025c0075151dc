"""Model architectures without weights: which configs a ``models.*`` source stands for.

The memory plan and the full-size benchmarks build the real diffusers/transformers classes from
these configs on any device (``meta`` for memory and FLOPs: no storage, no download). A source
resolves to an architecture without reading weights:

- ``tiny``: the tiny presets of :mod:`stages.models.tiny`;
- a local diffusers directory (or a hub id already in the local Hugging Face cache): its
  ``unet/config.json``, ``vae/config.json``, ``text_encoder/config.json`` where present;
- anything else (a hub id not cached, a single checkpoint file): the known architecture the
  loader accepts there: SD1.5 for ``models.sd`` / ``models.reference``, CLIP ViT-H/14 for
  ``models.image_encoder``, ``ip-adapter_sd15`` / ``ip-adapter-plus_sd15`` by weight-file name,
  MVDream's SD2.1-base 4-view UNet for ``models.mvdream``.

Each architecture has a ``name``: the known ones a short label (``sd15``), configs read from
disk a digest of them, so measured figures can be cached by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from stages.models.config import ModelsConfig
from stages.models.ip_adapter import (
    VIT_H_14_CONFIG,
    IPAdapter,
    Layout,
    install_ip_adapter_state,
    ip_processors,
    tiny_ip_adapter_state_dict,
)
from stages.models.mvdream import (
    MVDreamComponents,
    build_mvdream_unet,
    mvdream_alphas_cumprod,
    mvdream_unet_config,
    tiny_mvdream_unet_config,
)
from stages.models.sd import SD15_SCHEDULER_CONFIG, SD15_UNET_CONFIG, SDComponents, place, seeded
from stages.models.sources import resolve_source
from stages.models.tiny import (
    tiny_clip_text_config,
    tiny_clip_vision_config,
    tiny_tokenizer,
    tiny_unet_config,
    tiny_vae_config,
)

SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
"""The SD1.5 / SD2.1 VAE (``vae/config.json``)."""

CLIP_L_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
"""SD1.5's text encoder, CLIP ViT-L/14 text tower."""

OPENCLIP_H_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1024,
)
"""SD2.1's (MVDream's) OpenCLIP ViT-H text tower in diffusers layout: 23 of 24 layers (penultimate)."""

@dataclass(frozen=True)
class SDArchitecture:
    """An SD-layout text-to-image model: UNet, VAE, CLIP text encoder configs."""

    name: str
    unet: dict[str, Any] = field(hash=False)
    vae: dict[str, Any] = field(hash=False)
    text: dict[str, Any] = field(hash=False)
    """``CLIPTextConfig`` keyword arguments."""


@dataclass(frozen=True)
class IPArchitecture:
    """SD + IP-Adapter (layout, CLIP image encoder) as the IP guidance actor holds it."""

    name: str
    sd: SDArchitecture
    layout: Layout
    image_encoder: dict[str, Any] = field(hash=False)
    """``CLIPVisionConfig`` keyword arguments."""


@dataclass(frozen=True)
class MVDreamArchitecture:
    """MVDream's multi-view UNet, its VAE and OpenCLIP text encoder."""

    name: str
    unet: dict[str, Any] = field(hash=False)
    vae: dict[str, Any] = field(hash=False)
    text: dict[str, Any] = field(hash=False)


SD15 = SDArchitecture("sd15", dict(SD15_UNET_CONFIG), dict(SD_VAE_CONFIG), dict(CLIP_L_TEXT_CONFIG))
TINY_SD = SDArchitecture(
    "tiny", tiny_unet_config(), tiny_vae_config(), tiny_clip_text_config(tiny_unet_config()["cross_attention_dim"]).to_dict()
)
MVDREAM_SD21_4VIEW = MVDreamArchitecture("mvdream-sd21-4view", mvdream_unet_config(), dict(SD_VAE_CONFIG), dict(OPENCLIP_H_TEXT_CONFIG))
SD15_IP_BASE = IPArchitecture("sd15+ip-base+vit-h14", SD15, "base", dict(VIT_H_14_CONFIG))
"""SD1.5 + ``ip-adapter_sd15`` (4 image tokens) + CLIP ViT-H/14: the paper's IP guidance."""
TINY_IP = IPArchitecture("tiny+ip-base+tiny", TINY_SD, "base", tiny_clip_vision_config().to_dict())
TINY_MVDREAM = MVDreamArchitecture(
    "tiny", tiny_mvdream_unet_config(), tiny_vae_config(), tiny_clip_text_config(hidden_size=32).to_dict()
)


# ------------------------------------------------------------------------- resolution


def sd_architecture(source: str, key: str = "models.sd") -> SDArchitecture:
    """The SD architecture ``source`` stands for (see the module docstring)."""
    src = resolve_source(source, key)
    if src.kind == "tiny":
        return TINY_SD
    configs = _configs(src, ("unet", "vae", "text_encoder"))
    if not configs:
        return SD15
    unet = configs.get("unet", SD15.unet)
    vae = configs.get("vae", SD15.vae)
    text = configs.get("text_encoder", SD15.text)
    return SDArchitecture(f"sd-{_digest(unet, vae, text)}", unet, vae, text)


def ip_architecture(models: ModelsConfig) -> IPArchitecture:
    """SD (``models.sd``) + the IP-Adapter layout (``models.ip_adapter*``) + the image encoder."""
    sd = sd_architecture(models.sd)
    adapter = resolve_source(models.ip_adapter, "models.ip_adapter")
    encoder_src = resolve_source(models.image_encoder, "models.image_encoder")
    if adapter.kind == "tiny":
        layout: Layout = "base"
    else:
        weight = adapter.path.name if adapter.kind == "file" else (adapter.filename or models.ip_adapter_weight_name)
        layout = "plus" if "plus" in weight.lower() else "base"
    if encoder_src.kind == "tiny":
        encoder, encoder_name = tiny_clip_vision_config().to_dict(), "tiny"
    else:
        found = _configs(encoder_src, ("",))
        encoder = found.get("", dict(VIT_H_14_CONFIG))
        encoder_name = f"vit-{_digest(encoder)}" if "" in found else "vit-h14"
    return IPArchitecture(f"{sd.name}+ip-{layout}+{encoder_name}", sd, layout, encoder)


def mvdream_architecture(models: ModelsConfig) -> MVDreamArchitecture:
    """MVDream (``models.mvdream``): tiny, a converted directory's configs, or SD2.1-base 4-view."""
    src = resolve_source(models.mvdream, "models.mvdream")
    if src.kind == "tiny":
        return TINY_MVDREAM
    configs = _configs(src, ("unet", "vae", "text_encoder")) if src.kind == "directory" else {}
    if not configs:
        return MVDREAM_SD21_4VIEW
    unet = configs.get("unet", MVDREAM_SD21_4VIEW.unet)
    vae = configs.get("vae", MVDREAM_SD21_4VIEW.vae)
    text = configs.get("text_encoder", MVDREAM_SD21_4VIEW.text)
    return MVDreamArchitecture(f"mvdream-{_digest(unet, vae, text)}", unet, vae, text)


def _configs(src: Any, subfolders: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``config.json`` of each subfolder ("" = the root) of a directory, or of a hub repo when
    it is already in the local cache; nothing is downloaded."""
    found: dict[str, dict[str, Any]] = {}
    for sub in subfolders:
        path: Path | None = None
        if src.kind == "directory":
            candidate = src.path / sub / "config.json" if sub else src.path / "config.json"
            path = candidate if candidate.is_file() else None
        elif src.kind == "hub":
            from huggingface_hub import try_to_load_from_cache

            folder = "/".join(p for p in (src.subfolder, sub) if p)
            cached = try_to_load_from_cache(src.location, f"{folder}/config.json" if folder else "config.json")
            path = Path(cached) if isinstance(cached, str) else None
        if path is not None:
            found[sub] = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return found


def _digest(*configs: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()[:10]


# ------------------------------------------------------------------------- building


def build_sd(arch: SDArchitecture, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> SDComponents:
    """``arch``'s SD parts with seeded random weights (nothing allocated on ``meta``)."""
    with torch.device(device):
        unet = seeded(seed, lambda: UNet2DConditionModel.from_config(arch.unet))
        vae = seeded(seed + 1, lambda: AutoencoderKL.from_config(arch.vae))
        text = seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**arch.text)))
    for module in (unet, vae, text):
        place(module, device, dtype)
    return SDComponents(unet, vae, text, tiny_tokenizer(), DDPMScheduler(**SD15_SCHEDULER_CONFIG))


def build_ip(arch: IPArchitecture, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> tuple[SDComponents, IPAdapter]:
    """``arch``'s SD parts with a random IP-Adapter of its layout loaded into the UNet, and the
    image side (CLIP image encoder), through the real loading path."""
    sd = build_sd(arch.sd, device, dtype, seed)
    with torch.device(device):
        encoder = seeded(seed + 4, lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**arch.image_encoder)))
    place(encoder, device, dtype)
    # the plus Resampler is as wide as the UNet's cross-attention (768 for SD1.5), 64 at least
    width = max(64, int(sd.unet.config.cross_attention_dim))
    state = tiny_ip_adapter_state_dict(sd.unet, encoder.config, arch.layout, seed + 3, plus_width=width)
    on_meta = torch.device(device).type == "meta"
    if on_meta:  # the adapter's modules are created and loaded on meta too
        state = {group: {k: v.to("meta") for k, v in values.items()} for group, values in state.items()}
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        install_ip_adapter_state(sd.unet, state)
    place(sd.unet, device, dtype)
    size = encoder.config.image_size
    tokens = ip_processors(sd.unet)[0].num_tokens[0]
    return sd, IPAdapter(encoder, CLIPImageProcessor(size=size, crop_size=size), arch.layout, tokens, "random")


def build_mvdream(arch: MVDreamArchitecture, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> MVDreamComponents:
    """``arch``'s MVDream parts (multi-view attention installed) with seeded random weights."""
    with torch.device(device):
        unet = seeded(seed, lambda: build_mvdream_unet(arch.unet))
        vae = seeded(seed + 1, lambda: AutoencoderKL.from_config(arch.vae))
        text = seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**arch.text)))
    for module in (unet, vae, text):
        place(module, device, dtype)
    return MVDreamComponents(unet, vae, text, tiny_tokenizer(), mvdream_alphas_cumprod())
