"""IP-Adapter for SD1.5 with a per-sample IP scale, plus its CLIP image encoder.

Loading goes through diffusers' own converter (``UNet2DConditionLoadersMixin.
_load_ip_adapter_weights``, what ``pipeline.load_ip_adapter`` calls) from the ORIGINAL file
layouts of ``ip-adapter_sd15`` (``image_proj.proj.*`` + ``image_proj.norm.*``: 4 image tokens)
and ``ip-adapter-plus_sd15`` (``image_proj.latents`` + a Resampler: 16 tokens), each with
``ip_adapter.N.to_k_ip.weight`` / ``ip_adapter.N.to_v_ip.weight`` for the N-th attention
processor (odd N: the cross-attentions). ``.bin`` files hold ``{"image_proj": {...},
"ip_adapter": {...}}``; ``.safetensors`` files hold the flat ``image_proj.*``/``ip_adapter.*`` keys.

After loading, the cross-attention processors are :class:`PerSampleIPAttnProcessor`
(a subclass of diffusers' ``IPAdapterAttnProcessor2_0``): inside
``with per_sample_ip_scale(unet, scales):`` the image-prompt attention of sample b is scaled
by ``scales[b]``, so one batch can mix IP-conditioned rows and plain-SD rows (scale 0).

The ``tiny`` preset writes a random state dict in the original layout to a temporary file
and loads it through the same path, so the real loading code is what the tests run.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from PIL import Image
from torch import Tensor
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from stages.models.sd import place, seeded
from stages.models.sources import (
    ModelSource,
    ModelSourceError,
    hub_errors,
    hub_file,
    hub_kwargs,
    load_checkpoint,
    resolve_source,
)
from stages.models.tiny import tiny_clip_vision_config

Layout = Literal["base", "plus"]

VIT_H_14_CONFIG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    projection_dim=1024,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)
"""CLIP ViT-H/14 (``h94/IP-Adapter`` ``models/image_encoder``), for single-file image encoders."""


# --------------------------------------------------------------------------- per-sample scale


class PerSampleIPAttnProcessor(IPAdapterAttnProcessor2_0):
    """``IPAdapterAttnProcessor2_0`` whose IP scale may be a per-sample tensor.

    ``sample_scale`` (B,) — set by :func:`per_sample_ip_scale` for the current forward —
    replaces ``self.scale`` for every loaded adapter: out_b = text_attn_b + s_b·ip_attn_b.
    With ``sample_scale`` None (or IP masks given) it behaves exactly like its parent.
    """

    def __init__(self, hidden_size, cross_attention_dim=None, num_tokens=(4,), scale=1.0):
        super().__init__(hidden_size, cross_attention_dim, num_tokens, scale)
        self.sample_scale: Tensor | None = None
        self.sample_scale_active = True  # False when every sample's scale is 0 (skip the IP attention)

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        scale: float = 1.0,
        ip_adapter_masks: Tensor | None = None,
    ) -> Tensor:
        if self.sample_scale is None or ip_adapter_masks is not None or not isinstance(encoder_hidden_states, tuple):
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, scale, ip_adapter_masks
            )
        encoder_hidden_states, ip_hidden_states = encoder_hidden_states
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if self.sample_scale.shape != (batch_size,):
            raise ValueError(
                f"per-sample IP scale has shape {tuple(self.sample_scale.shape)}, the UNet batch is {batch_size}"
            )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: Tensor) -> Tensor:
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        def merge(x: Tensor) -> Tensor:
            return x.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        query = heads(query)
        hidden_states = merge(
            F.scaled_dot_product_attention(query, heads(key), heads(value), attn_mask=attention_mask)
        )
        sample_scale = self.sample_scale.to(device=hidden_states.device, dtype=hidden_states.dtype).view(-1, 1, 1)
        if self.sample_scale_active:
            for ip_states, to_k_ip, to_v_ip in zip(ip_hidden_states, self.to_k_ip, self.to_v_ip):
                ip_attn = F.scaled_dot_product_attention(query, heads(to_k_ip(ip_states)), heads(to_v_ip(ip_states)))
                hidden_states = hidden_states + sample_scale * merge(ip_attn)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def ip_processors(unet: UNet2DConditionModel) -> list[PerSampleIPAttnProcessor]:
    """The per-sample IP processors of ``unet`` (empty before :func:`load_ip_adapter`)."""
    return [p for p in unet.attn_processors.values() if isinstance(p, PerSampleIPAttnProcessor)]


@contextlib.contextmanager
def per_sample_ip_scale(unet: UNet2DConditionModel, scales: Tensor) -> Iterator[None]:
    """Within the block, UNet forwards scale sample b's image-prompt attention by ``scales[b]``.

    ``scales`` (B,) may live on the UNet's device (saves a copy per attention layer).
    """
    processors = ip_processors(unet)
    if not processors:
        raise ValueError("the UNet has no IP-Adapter processors; load an IP-Adapter first (load_ip_adapter)")
    scales = torch.as_tensor(scales).reshape(-1)
    active = bool((scales != 0).any())  # one host sync here instead of one per attention layer
    for p in processors:
        p.sample_scale, p.sample_scale_active = scales, active
    try:
        yield
    finally:
        for p in processors:
            p.sample_scale, p.sample_scale_active = None, True


def set_global_ip_scale(unet: UNet2DConditionModel, scale: float) -> None:
    """The diffusers-style global scale (``pipeline.set_ip_adapter_scale``) of every processor."""
    for p in ip_processors(unet):
        p.scale = [float(scale)] * len(p.scale)


# --------------------------------------------------------------------------- image prompt


@dataclass
class IPAdapter:
    """The image side of a loaded IP-Adapter: CLIP image encoder + processor + layout.

    ``encode_reference`` gives what the UNet's image projection expects for one image:
    (1, D) CLIP image embeds for ``base``, (1, 257, D) penultimate hidden states for ``plus``.
    """

    image_encoder: CLIPVisionModelWithProjection
    image_processor: CLIPImageProcessor
    layout: Layout
    num_tokens: int
    weight_file: str

    @torch.no_grad()
    def encode_reference(self, image: Image.Image | np.ndarray | Tensor) -> Tensor:
        """(1, D) [base] or (1, T, D) [plus] embedding of a reference image."""
        return self._embed(self._pixels(image))

    @torch.no_grad()
    def null_embedding(self) -> Tensor:
        """The "no image" embedding, as diffusers pipelines build it: zeros for ``base``;
        the encoder's penultimate states of an all-zero image for ``plus``."""
        size = self.image_encoder.config.image_size
        device, dtype = self.image_encoder.device, self.image_encoder.dtype
        if self.layout == "base":
            return torch.zeros(1, self.image_encoder.config.projection_dim, device=device, dtype=dtype)
        return self._embed(torch.zeros(1, 3, size, size, device=device, dtype=dtype))

    def _pixels(self, image: Image.Image | np.ndarray | Tensor) -> Tensor:
        pil = to_pil(image)
        pixels = self.image_processor(images=pil, return_tensors="pt").pixel_values
        return pixels.to(self.image_encoder.device, self.image_encoder.dtype)

    def _embed(self, pixels: Tensor) -> Tensor:
        if self.layout == "base":
            return self.image_encoder(pixels).image_embeds
        return self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]

    @staticmethod
    def unet_embeds(embeds: Tensor) -> list[Tensor]:
        """(B, D) or (B, T, D) → diffusers' ``added_cond_kwargs["image_embeds"]`` (one image per sample)."""
        return [embeds.unsqueeze(1)]


def to_pil(image: Image.Image | np.ndarray | Tensor) -> Image.Image:
    """PIL image from a PIL image, an (H, W, 3) uint8/float array, or a (3, H, W) tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"reference tensor must be (3, H, W) in [0, 1], got {tuple(image.shape)}")
        image = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"reference array must be (H, W, 3), got {image.shape}")
        if image.dtype != np.uint8:
            image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return Image.fromarray(image)
    raise ValueError(f"reference must be a PIL image, an array or a tensor, got {type(image).__name__}")


# --------------------------------------------------------------------------- loading


def load_ip_adapter(
    unet: UNet2DConditionModel,
    adapter: str | ModelSource,
    image_encoder: str | ModelSource,
    subfolder: str | None = "models",
    weight_name: str = "ip-adapter_sd15.bin",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    tiny_layout: Layout = "base",
) -> IPAdapter:
    """Load an SD1.5 IP-Adapter into ``unet`` (in place) and return its image side.

    ``adapter``: ``tiny`` | hub id (file ``subfolder/weight_name`` in it) | a directory holding
    ``[subfolder/]weight_name`` | the weight file itself. ``image_encoder``: ``tiny`` | hub id
    (``repo:subfolder`` form allowed) | a transformers directory | a ViT-H/14 weight file.
    Raises :class:`ModelSourceError` naming the file when it is not an SD1.5 IP-Adapter.
    """
    enc_src = _as_source(image_encoder, "models.image_encoder")
    ad_src = _as_source(adapter, "models.ip_adapter")
    encoder = _load_image_encoder(enc_src, seed)
    place(encoder, device, dtype)

    if ad_src.kind == "tiny":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / ("ip-adapter-plus_sd15.bin" if tiny_layout == "plus" else "ip-adapter_sd15.safetensors")
            save_ip_adapter_file(tiny_ip_adapter_state_dict(unet, encoder.config, tiny_layout, seed + 3), path)
            state, layout = read_ip_adapter_file(path, ad_src.key)
            _check_compatible(state, layout, unet, encoder.config, path, ad_src.key)
            weight_file = "tiny"
    else:
        path = _adapter_file(ad_src, subfolder, weight_name)
        state, layout = read_ip_adapter_file(path, ad_src.key)
        _check_compatible(state, layout, unet, encoder.config, path, ad_src.key)
        weight_file = str(path)

    install_ip_adapter_state(unet, state)
    place(unet, device, dtype)
    size = encoder.config.image_size
    processor = CLIPImageProcessor(size=size, crop_size=size)
    num_tokens = ip_processors(unet)[0].num_tokens[0]
    return IPAdapter(encoder, processor, layout, num_tokens, weight_file)


def _as_source(value: str | ModelSource, key: str) -> ModelSource:
    return value if isinstance(value, ModelSource) else resolve_source(value, key)


def install_ip_adapter_state(unet: UNet2DConditionModel, state: dict[str, dict[str, Tensor]]) -> None:
    """Load an original-layout ``{"image_proj", "ip_adapter"}`` state into ``unet`` with diffusers'
    converter (``_load_ip_adapter_weights``), then swap in :class:`PerSampleIPAttnProcessor`."""
    unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    _install_per_sample_processors(unet)


def _install_per_sample_processors(unet: UNet2DConditionModel) -> None:
    processors = {}
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, IPAdapterAttnProcessor2_0) and not isinstance(proc, PerSampleIPAttnProcessor):
            new = PerSampleIPAttnProcessor(proc.hidden_size, proc.cross_attention_dim, proc.num_tokens, proc.scale)
            new.load_state_dict(proc.state_dict())
            weight = next(proc.parameters())
            processors[name] = new.to(device=weight.device, dtype=weight.dtype)
        else:
            processors[name] = proc
    unet.set_attn_processor(processors)


def _load_image_encoder(src: ModelSource, seed: int) -> CLIPVisionModelWithProjection:
    if src.kind == "tiny":
        return seeded(seed + 4, lambda: CLIPVisionModelWithProjection(tiny_clip_vision_config()))
    if src.kind in ("hub", "directory"):
        if src.kind == "directory" and not (src.path / "config.json").is_file():
            raise ModelSourceError(
                f"{src.key}: {src.location!r} is not a transformers model directory (no config.json)"
            )
        with hub_errors(src, "the CLIP image encoder"):
            location = src.location
            subfolder = "/".join(p for p in (src.subfolder, src.filename) if p) or ""
            return CLIPVisionModelWithProjection.from_pretrained(location, subfolder=subfolder, **hub_kwargs())
    state = load_checkpoint(src.location, src.key)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H_14_CONFIG))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelSourceError(
            f"{src.key}: {src.location!r} is not a CLIP ViT-H/14 CLIPVisionModelWithProjection state dict: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return model


def _adapter_file(src: ModelSource, subfolder: str | None, weight_name: str) -> Path:
    if src.kind == "file":
        return src.path
    if src.kind == "hub":
        return hub_file(src, filename=src.filename or weight_name, subfolder=src.subfolder or subfolder)
    candidates = [src.path / subfolder / weight_name] if subfolder else []
    candidates.append(src.path / weight_name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ModelSourceError(
        f"{src.key}: no IP-Adapter weight file {weight_name!r} in {src.location!r} "
        f"(looked for {', '.join(str(c) for c in candidates)}; see models.ip_adapter_weight_name)"
    )


def read_ip_adapter_file(path: str | Path, key: str = "models.ip_adapter") -> tuple[dict[str, dict[str, Tensor]], Layout]:
    """``{"image_proj": ..., "ip_adapter": ...}`` from an original-layout file, and its layout.

    Raises :class:`ModelSourceError` naming the file when it is not an SD1.5 IP-Adapter
    (``ip-adapter_sd15`` or ``ip-adapter-plus_sd15``).
    """
    raw = load_checkpoint(path, key)
    if isinstance(raw.get("image_proj"), dict) and isinstance(raw.get("ip_adapter"), dict):
        state = {"image_proj": dict(raw["image_proj"]), "ip_adapter": dict(raw["ip_adapter"])}
    else:
        state = {"image_proj": {}, "ip_adapter": {}}
        for name, value in raw.items():
            group, dot, rest = name.partition(".")
            if dot and group in state:
                state[group][rest] = value
    expected = (
        "expected the original ip-adapter_sd15 / ip-adapter-plus_sd15 layout with keys "
        "'image_proj.*' and 'ip_adapter.N.to_k_ip.weight'"
    )
    if not state["image_proj"] or not state["ip_adapter"]:
        sample = ", ".join(list(raw)[:3])
        raise ModelSourceError(f"{key}: {str(path)!r} is not an IP-Adapter weight file: {expected}; found keys {sample}")
    proj = state["image_proj"]
    if "proj.weight" in proj and "norm.weight" in proj:
        layout: Layout = "base"
    elif "latents" in proj and "proj_in.weight" in proj:
        layout = "plus"
    else:
        raise ModelSourceError(
            f"{key}: {str(path)!r} is an IP-Adapter variant this project does not support "
            f"(image_proj keys {sorted(proj)[:4]}); {expected}"
        )
    return state, layout


def _check_compatible(
    state: dict[str, dict[str, Tensor]],
    layout: Layout,
    unet: UNet2DConditionModel,
    encoder_config: CLIPVisionConfig,
    path: Path,
    key: str,
) -> None:
    cross_dim = int(unet.config.cross_attention_dim)
    n_cross = sum(name.endswith("attn2.processor") for name in unet.attn_processors)
    k_keys = [k for k in state["ip_adapter"] if k.endswith(".to_k_ip.weight")]
    where = f"{key}: {str(path)!r}"
    if len(k_keys) != n_cross:
        raise ModelSourceError(
            f"{where} has {len(k_keys)} IP cross-attention layers, the UNet has {n_cross} "
            "(an SDXL adapter has 70, SD1.5's 16): expected an SD1.5 IP-Adapter"
        )
    widths = {int(state["ip_adapter"][k].shape[1]) for k in k_keys}
    if widths != {cross_dim}:
        raise ModelSourceError(
            f"{where} has IP key projections of input width {sorted(widths)}, the UNet's "
            f"cross_attention_dim is {cross_dim}: expected an SD1.5 IP-Adapter"
        )
    proj = state["image_proj"]
    if layout == "base":
        out_dim, in_dim = proj["proj.weight"].shape
        want_in = int(encoder_config.projection_dim)
        ok = out_dim % cross_dim == 0 and int(proj["norm.weight"].shape[0]) == cross_dim
    else:
        in_dim = int(proj["proj_in.weight"].shape[1])
        want_in = int(encoder_config.hidden_size)
        ok = int(proj["proj_out.weight"].shape[0]) == cross_dim
    if not ok:
        raise ModelSourceError(f"{where}: image projection does not output the UNet's width {cross_dim}")
    if int(in_dim) != want_in:
        raise ModelSourceError(
            f"{where} expects image embeddings of width {int(in_dim)}, the image encoder "
            f"(models.image_encoder) gives {want_in}"
        )


def save_ip_adapter_file(state: dict[str, dict[str, Tensor]], path: str | Path) -> Path:
    """Write ``{"image_proj", "ip_adapter"}`` in the original layout: flat keys for
    ``.safetensors``, the nested dict (``torch.save``) otherwise."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = {f"{group}.{name}": t.contiguous() for group, sub in state.items() for name, t in sub.items()}
        save_file(flat, str(path))
    else:
        torch.save(state, str(path))
    return path


def tiny_ip_adapter_state_dict(
    unet: UNet2DConditionModel,
    encoder_config: CLIPVisionConfig,
    layout: Layout = "base",
    seed: int = 0,
    plus_width: int = 64,
) -> dict[str, dict[str, Tensor]]:
    """A random IP-Adapter state dict for ``unet`` in the ORIGINAL layout (``image_proj`` /
    ``ip_adapter`` groups, tencent key names), sized for ``unet`` and ``encoder_config``.
    ``plus_width``: the plus Resampler's width (``ip-adapter-plus_sd15``: 768, 12 heads of 64)."""
    g = torch.Generator().manual_seed(int(seed))

    def rand(*shape: int, std: float = 0.2, mean: float = 0.0) -> Tensor:
        return mean + std * torch.randn(*shape, generator=g)

    cross = int(unet.config.cross_attention_dim)
    proj: dict[str, Tensor] = {}
    if layout == "base":
        tokens, d_in = 4, int(encoder_config.projection_dim)
        proj = {
            "proj.weight": rand(tokens * cross, d_in),
            "proj.bias": rand(tokens * cross, std=0.1),
            "norm.weight": rand(cross, std=0.1, mean=1.0),
            "norm.bias": rand(cross, std=0.1),
        }
    else:
        dim, heads, ff, queries = int(plus_width), max(1, int(plus_width) // 64), 4, 16
        inner, d_in = heads * 64, int(encoder_config.hidden_size)
        proj = {
            "latents": rand(1, queries, dim),
            "proj_in.weight": rand(dim, d_in),
            "proj_in.bias": rand(dim, std=0.1),
            "proj_out.weight": rand(cross, dim),
            "proj_out.bias": rand(cross, std=0.1),
            "norm_out.weight": rand(cross, std=0.1, mean=1.0),
            "norm_out.bias": rand(cross, std=0.1),
        }
        for i in range(4):  # diffusers' converter expects the plus Resampler's depth of 4
            p = f"layers.{i}."
            proj |= {
                p + "0.norm1.weight": rand(dim, std=0.1, mean=1.0),
                p + "0.norm1.bias": rand(dim, std=0.1),
                p + "0.norm2.weight": rand(dim, std=0.1, mean=1.0),
                p + "0.norm2.bias": rand(dim, std=0.1),
                p + "0.to_q.weight": rand(inner, dim),
                p + "0.to_kv.weight": rand(2 * inner, dim),
                p + "0.to_out.weight": rand(dim, inner),
                p + "1.0.weight": rand(dim, std=0.1, mean=1.0),
                p + "1.0.bias": rand(dim, std=0.1),
                p + "1.1.weight": rand(ff * dim, dim),
                p + "1.3.weight": rand(dim, ff * dim),
            }
    ip: dict[str, Tensor] = {}
    key_id = 0
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            if name.startswith("mid_block"):
                hidden = unet.config.block_out_channels[-1]
            elif name.startswith("up_blocks"):
                hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
            else:
                hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
            ip[f"{key_id}.to_k_ip.weight"] = rand(hidden, cross)
            ip[f"{key_id}.to_v_ip.weight"] = rand(hidden, cross)
        key_id += 1
    return {"image_proj": proj, "ip_adapter": ip}
