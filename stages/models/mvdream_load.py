"""Loading MVDream: :func:`load_mvdream` from ``tiny``, an original checkpoint (converted on load
by :mod:`stages.models.mvdream_convert`), a directory that converter wrote, or the hub.

Its own module so that the model (:mod:`stages.models.mvdream`) and the converter, which builds
on the model, import in one direction only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from stages.models.mvdream import (
    MARKER_FILE,
    NUM_FRAMES,
    SCHEDULE_FILE,
    MVDreamComponents,
    build_tiny_mvdream,
    load_tokenizer,
    mvdream_alphas_cumprod,
    set_multiview_attention,
)
from stages.models.mvdream_convert import components_from_checkpoint
from stages.models.sources import ModelSourceError, hub_errors, hub_file, hub_kwargs, resolve_source


def load_mvdream(
    source: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    text_source: str | None = None,
    key: str = "models.mvdream",
) -> MVDreamComponents:
    """MVDream parts from ``source``, frozen, on ``device`` in ``dtype``.

    ``source``: ``tiny``; an original checkpoint file (``.pt``/``.ckpt``/``.safetensors``,
    converted on load); a directory written by ``python -m stages.models.mvdream_convert``;
    a hub ``org/name:file.pt`` (default ``MVDream/MVDream:sd-v2.1-base-4view.pt``) or a hub
    repo holding a converted directory. The UNet, VAE and OpenCLIP text encoder all come
    from ``source`` (the original checkpoint holds all three). ``text_source``
    (``models.mvdream_text``) supplies the tokenizer, which the original checkpoint lacks:
    ``tiny``, a hub id or a diffusers directory with ``tokenizer/`` (SD2.1-base's). It is not
    needed for ``tiny`` or a converted directory that has ``tokenizer/``.
    """
    src = resolve_source(source, key)
    if src.kind == "tiny":
        components = build_tiny_mvdream(seed)
    elif src.kind == "directory":
        components = _load_directory(src.path, text_source, key)
    else:
        if src.kind == "hub" and src.filename is None:
            from huggingface_hub import snapshot_download

            with hub_errors(src, "the converted MVDream directory"):
                path = Path(snapshot_download(src.location, **hub_kwargs()))
            if src.subfolder:
                path = path / src.subfolder
            components = _load_directory(path, text_source, key)
        else:
            path = hub_file(src) if src.kind == "hub" else src.path
            components = components_from_checkpoint(path, tokenizer=load_tokenizer(text_source, path))
    return _freeze(components, dtype, torch.device(device))


def _freeze(components: MVDreamComponents, dtype: torch.dtype, device: torch.device) -> MVDreamComponents:
    for module in (components.unet, components.vae, components.text_encoder):
        # nn.Module.to: diffusers' override only adds a warning about fp32-pinned modules (none here)
        torch.nn.Module.to(module.requires_grad_(False).eval(), device=device, dtype=dtype)
    set_multiview_attention(components.unet)
    return components


def _load_directory(path: Path, text_source: str | None, key: str) -> MVDreamComponents:
    marker = path / MARKER_FILE
    if not marker.is_file():
        raise ModelSourceError(
            f"{key}: {str(path)!r} is not an MVDream directory (no {MARKER_FILE}); write one with "
            "`python -m stages.models.mvdream_convert CHECKPOINT OUT_DIR`"
        )
    meta = json.loads(marker.read_text())
    for sub in ("unet", "vae", "text_encoder"):
        if not (path / sub).is_dir():
            raise ModelSourceError(f"{key}: MVDream directory {str(path)!r} lacks {sub}/")
    from safetensors.torch import load_file

    unet = set_multiview_attention(UNet2DConditionModel.from_pretrained(str(path / "unet")))
    vae = AutoencoderKL.from_pretrained(str(path / "vae"))
    text_encoder = CLIPTextModel.from_pretrained(str(path / "text_encoder"))
    if (path / "tokenizer").is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
    else:
        tokenizer = load_tokenizer(text_source, path)
    schedule = path / SCHEDULE_FILE
    alphas = load_file(str(schedule))["alphas_cumprod"] if schedule.is_file() else mvdream_alphas_cumprod()
    return MVDreamComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        alphas_cumprod=alphas.float().cpu(),
        num_frames=int(meta.get("num_frames", NUM_FRAMES)),
    )
