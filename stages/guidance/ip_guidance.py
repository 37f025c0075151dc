"""SD1.5 + IP-Adapter guidance: ISD, SDS, IP-SDS and the control-variate ablations.

``IPGuidance.grad(requests)`` answers a batch of requests from different assets together:
every evaluation of every request's :func:`~stages.guidance.losses.loss_spec` (text
cond/uncond × image ref/null/none × t or t+δt × shared or independent noise) becomes B rows of
one UNet batch, with a per-sample IP scale (the request's ``ip_scale`` for ``ref``/``null``
rows, 0 for ``none`` rows). Memory is bounded by its :class:`~stages.guidance.runtime.
GuidanceRuntime`: requests are cut into slices of at most ``vae_chunk`` views, answered in
passes of at most ``vae_chunk`` images (one VAE encode with grad each) and UNet forwards of at
most ``unet_rows`` rows. Noise is drawn per request from its own seed (independent draws from
``seed + 1``), a slice taking its views' part, so a request's gradient does not depend on its
batch mates or on how it is sliced (up to floating-point reduction order).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from stages.guidance import losses
from stages.guidance.protocol import (
    GuidanceRequest,
    GuidanceResponse,
    IPSettings,
    UnknownAssetError,
    settings_for,
    validate_request,
)
from stages.guidance.runtime import GuidanceRuntime, RowBounded, ViewSlice, passes, slice_noise, slice_request, view_slices
from stages.guidance.vae_bridge import backprop_to_renders, bounded_encoder, encode_renders
from stages.models.config import ModelsConfig
from stages.models.tiny import TINY_RENDER_RESOLUTION
from stages.models.device import resolve_device, resolve_dtype
from stages.models.ip_adapter import IPAdapter, load_ip_adapter, per_sample_ip_scale, to_pil
from stages.models.sd import SDComponents, load_sd
from stages.scene.cameras import VIEW_DIRECTIONS, view_directions, view_prompt

@dataclass
class IPComponents:
    """Everything :class:`IPGuidance` runs: SD1.5 parts with the IP-Adapter loaded into the UNet."""

    sd: SDComponents
    ip: IPAdapter


def load_ip_components(models: ModelsConfig) -> IPComponents:
    """SD1.5 (``models.sd``) + IP-Adapter (``models.ip_adapter*``, ``models.image_encoder``)."""
    device = resolve_device(models.device)
    dtype = resolve_dtype(models.dtype, device)
    sd = load_sd(models.sd, dtype=dtype, device=device, seed=models.seed)
    ip = load_ip_adapter(
        sd.unet,
        models.ip_adapter,
        models.image_encoder,
        subfolder=models.ip_adapter_subfolder,
        weight_name=models.ip_adapter_weight_name,
        dtype=dtype,
        device=device,
        seed=models.seed,
    )
    return IPComponents(sd, ip)


@dataclass
class _Asset:
    """Cached embeddings of one registered asset (all on the model device/dtype)."""

    key: tuple[str, str, str]
    cond: Float[Tensor, "1 tokens channels"]
    uncond: Float[Tensor, "1 tokens channels"]
    views: dict[str, Float[Tensor, "1 tokens channels"]]  # by view direction
    reference: Float[Tensor, "1 ..."] | None  # (1, D) / (1, T, D) image embedding, None without a reference
    settings: IPSettings


@dataclass
class _Rows:
    """The UNet rows of one evaluation of one request."""

    x: Tensor
    t: Tensor
    text: Tensor
    image: Tensor
    scale: Tensor


class IPGuidance:
    """The :class:`~stages.guidance.protocol.Guidance` of SD1.5 + IP-Adapter.

    ``models``: a :class:`ModelsConfig` (loaded here) or prebuilt :class:`IPComponents`.
    ``render_resolution``: renders are resized to this square size before the VAE (512 for
    SD1.5; smaller values are for tiny models). How an asset is answered (loss, scales,
    ``sd_branch``, δt, view prompts, negative prompt) is its :class:`IPSettings`, given at
    :meth:`register`.
    """

    def __init__(
        self,
        models: ModelsConfig | IPComponents,
        render_resolution: int = 512,
        runtime: GuidanceRuntime | None = None,
    ) -> None:
        components = models if isinstance(models, IPComponents) else load_ip_components(models)
        self.sd = components.sd
        self.ip = components.ip
        factor = self.sd.vae_scale_factor
        if render_resolution <= 0 or render_resolution % factor:
            raise ValueError(
                f"render_resolution must be a positive multiple of the VAE factor {factor}, got {render_resolution}"
            )
        self.render_resolution = int(render_resolution)
        self.alphas_cumprod = self.sd.alphas_cumprod
        self._null = self.ip.null_embedding().to(self.sd.dtype)
        self._assets: dict[str, _Asset] = {}
        self.runtime = runtime or GuidanceRuntime()
        compile_args = {"compile": self.runtime.compile, "backend": self.runtime.compile_backend}
        self.latent_encoder = bounded_encoder(self.sd.vae, self.runtime)
        self.denoiser = RowBounded(self._unet_forward, self.sd.unet, self.runtime.unet_rows, **compile_args)

    @classmethod
    def from_config(
        cls, models: ModelsConfig, render_resolution: int | None = None, runtime: GuidanceRuntime | None = None
    ) -> "IPGuidance":
        """Load ``models`` (SD1.5, IP-Adapter, image encoder). ``render_resolution`` defaults
        to SD1.5's 512, and to ``TINY_RENDER_RESOLUTION`` (32) for ``tiny``."""
        if render_resolution is None:
            render_resolution = ip_render_resolution(models)
        return cls(models, render_resolution, runtime)

    # ------------------------------------------------------------------ registry

    def register(
        self, asset_id: str, prompt: str, reference: Any | None = None, settings: IPSettings | None = None
    ) -> None:
        """Encode prompt, the settings' negative prompt, view-dependent prompts and the reference once.

        Idempotent: registering the same (prompt, negative prompt, reference) again encodes
        nothing (new ``settings`` replace the old); different inputs replace the cached embeddings.
        """
        settings = settings_for("ip", settings)
        negative = settings.negative_prompt
        key = (prompt, negative, _fingerprint(reference))
        known = self._assets.get(asset_id)
        if known is not None and known.key == key:
            known.settings = settings
            return
        texts = [prompt, negative] + [view_prompt(prompt, d) for d in VIEW_DIRECTIONS]
        embeds = self.sd.encode_prompts(texts)
        views = {d: embeds[2 + i : 3 + i] for i, d in enumerate(VIEW_DIRECTIONS)}
        image = None
        if reference is not None:
            image = self.ip.encode_reference(reference).to(self.sd.dtype)
        self._assets[asset_id] = _Asset(key, embeds[0:1], embeds[1:2], views, image, settings)

    def release(self, asset_id: str) -> None:
        """Forget an asset; unknown ids are ignored."""
        self._assets.pop(asset_id, None)

    @property
    def registered(self) -> list[str]:
        return list(self._assets)

    # ------------------------------------------------------------------ gradients

    def grad(self, requests: Sequence[GuidanceRequest]) -> list[GuidanceResponse]:
        """Image-space gradients for every request: views sliced and answered in passes of at most
        ``runtime.vae_chunk`` images (see :mod:`stages.guidance.runtime`)."""
        specs = [self._check(req) for req in requests]  # every request is checked before any work
        slices = view_slices([int(r.rgb.shape[0]) for r in requests], self.runtime.vae_chunk)
        latent_parts: list[list[Tensor]] = [[] for _ in requests]
        rgb_parts: list[list[Tensor]] = [[] for _ in requests]
        unet_batch = [0] * len(requests)
        for group in passes([piece.views for piece in slices], self.runtime.vae_chunk):
            pieces = [slices[i] for i in group]
            latent_grads, rgb_grads, rows = self._grad_pass([(requests[p.request], specs[p.request], p) for p in pieces])
            for piece, g_latent, g_rgb in zip(pieces, latent_grads, rgb_grads):
                latent_parts[piece.request].append(g_latent)
                rgb_parts[piece.request].append(g_rgb)
                unet_batch[piece.request] = max(unet_batch[piece.request], rows)
        responses = []
        for req, spec, g_latent, g_rgb, rows in zip(requests, specs, latent_parts, rgb_parts, unet_batch):
            g_latent = torch.cat(g_latent)
            settings = self._assets[req.asset_id].settings
            responses.append(
                GuidanceResponse(
                    asset_id=req.asset_id,
                    grad_rgb=torch.cat(g_rgb).to(req.rgb.dtype),
                    loss=float(losses.surrogate_loss(g_latent)),
                    grad_norm=float(g_latent.float().norm()),
                    timesteps=req.timesteps.detach().cpu(),
                    info={
                        "evaluations": float(len(spec.evaluations)),
                        "ip_scale": float(settings.ip_scale),
                        "guidance_scale": float(settings.guidance_scale),
                        "t_mean": float(req.timesteps.float().mean()),
                        "unet_batch": float(rows),
                    },
                )
            )
        return responses

    def _grad_pass(
        self, pieces: Sequence[tuple[GuidanceRequest, losses.LossSpec, ViewSlice]]
    ) -> tuple[list[Tensor], list[Tensor], int]:
        """One pass: VAE encode with grad, the UNet over every row (bounded forwards), one backprop.
        Returns each slice's latent gradient and grad_rgb, and the pass's UNet rows."""
        device, dtype = self.sd.device, self.sd.dtype
        parts = [slice_request(req, piece.start, piece.stop) for req, _, piece in pieces]
        encoded = encode_renders(
            self.latent_encoder, [r.rgb for r in parts], self.render_resolution, device, dtype, self.runtime.vae_chunk
        )
        latents = encoded.split(encoded.latents)

        rows: list[_Rows] = []
        noises: list[tuple[Tensor, Tensor | None]] = []
        for (req, spec, piece), part, x0 in zip(pieces, parts, latents):
            views, shape = int(req.rgb.shape[0]), x0.shape[1:]
            noise = slice_noise(req.seed, views, shape, piece).to(device)
            noise2 = slice_noise(req.seed + 1, views, shape, piece).to(device) if spec.needs_independent_noise else None
            noises.append((noise, noise2))
            rows.extend(self._rows(part, spec, x0, noise, noise2))

        with torch.no_grad():
            predictions = self.denoiser(
                torch.cat([r.x for r in rows]).to(dtype),
                torch.cat([r.t for r in rows]).to(device),
                torch.cat([r.text for r in rows]),
                torch.cat([r.image for r in rows]),
                torch.cat([r.scale for r in rows]).to(device),
            ).float()
        per_row = torch.split(predictions, [r.x.shape[0] for r in rows])

        grads, start = [], 0
        for (_, spec, _), part, (noise, noise2) in zip(pieces, parts, noises):
            preds = per_row[start : start + len(spec.evaluations)]
            start += len(spec.evaluations)
            settings = self._assets[part.asset_id].settings
            params = losses.LossParams(
                guidance_scale=float(settings.guidance_scale), cv_guidance_scale=float(settings.cv_guidance_scale)
            )
            weight = losses.sds_weight(self.alphas_cumprod, part.timesteps.cpu()).to(device)
            grads.append(losses.latent_gradient(spec, preds, noise, weight, params, noise2))
        return grads, backprop_to_renders(encoded, torch.cat(grads)), int(predictions.shape[0])

    def _unet_forward(self, unet: torch.nn.Module, x: Tensor, t: Tensor, text: Tensor, image: Tensor, scale: Tensor) -> Tensor:
        """ε for (N, 4, h, w) rows; ``scale`` (N,) is each row's IP scale."""
        with per_sample_ip_scale(self.sd.unet, scale):
            return unet(x, t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": self.ip.unet_embeds(image)}).sample

    def _check(self, req: GuidanceRequest) -> losses.LossSpec:
        validate_request(req)
        if req.family != "ip":
            raise ValueError(f"IPGuidance answers family 'ip', got GuidanceRequest.family={req.family!r}")
        asset = self._assets.get(req.asset_id)
        if asset is None:
            raise UnknownAssetError(req.asset_id)
        settings = asset.settings
        spec = losses.loss_spec(settings.loss, settings.sd_branch)
        if spec.uses_image_prompt and asset.reference is None:
            raise ValueError(
                f"loss {settings.loss!r} needs a reference image, but asset {req.asset_id!r} was registered without one"
            )
        if settings.view_prompts and (req.elevation is None or req.azimuth is None):
            raise ValueError(
                f"IPSettings.view_prompts of asset {req.asset_id!r} needs GuidanceRequest.elevation and azimuth"
            )
        return spec

    def _rows(
        self, req: GuidanceRequest, spec: losses.LossSpec, x0: Tensor, noise: Tensor, noise2: Tensor | None
    ) -> list[_Rows]:
        asset = self._assets[req.asset_id]
        settings = asset.settings
        batch = x0.shape[0]
        device = x0.device
        t = req.timesteps.to(device=device, dtype=torch.long)
        t_delta = losses.shifted_timesteps(t, settings.delta_t)
        if settings.view_prompts:
            names = view_directions(req.elevation.cpu(), req.azimuth.cpu())
            cond = torch.cat([asset.views[n] for n in names])
        else:
            cond = asset.cond.expand(batch, -1, -1)
        uncond = asset.uncond.expand(batch, -1, -1)
        rows = []
        for ev in spec.evaluations:
            steps = t if ev.timestep == "t" else t_delta
            eps = noise if ev.noise == "shared" else noise2
            x_t = losses.add_noise(x0.float(), eps, self.alphas_cumprod, steps)
            image = asset.reference if ev.image == "ref" else self._null
            scale = 0.0 if ev.image == "none" else float(settings.ip_scale)
            rows.append(
                _Rows(
                    x=x_t,
                    t=steps,
                    text=cond if ev.text == "cond" else uncond,
                    image=image.expand(batch, *image.shape[1:]),
                    scale=torch.full((batch,), scale),
                )
            )
        return rows


def ip_render_resolution(models: ModelsConfig) -> int:
    """Square size renders are resized to before the VAE: SD1.5's 512, ``TINY_RENDER_RESOLUTION`` for ``tiny``."""
    return TINY_RENDER_RESOLUTION if models.sd == "tiny" else 512


def _fingerprint(reference: Any | None) -> str:
    """Content hash of a reference image (so re-registering the same image is a no-op)."""
    if reference is None:
        return ""
    pixels = np.asarray(to_pil(reference))
    return hashlib.sha1(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()
