"""MVDream SDS guidance (ModeDreamer Eq. 8) implementing the guidance protocol.

Per request: B = 4·k renders of one asset (k groups of 4 views, each group with one t),
their camera-to-world matrices, a noise seed; the CFG scale, the loss form and the negative
prompt are the asset's :class:`~stages.guidance.protocol.MVDreamSettings`, given at ``register``. The requests of a call are cut into slices of
whole 4-view groups and answered in passes of at most ``runtime.vae_chunk`` images
(:class:`~stages.guidance.runtime.GuidanceRuntime`): a pass is VAE-encoded at ``render_resolution`` (256 → 32² latents) with grad, noised with each
request's own noise, and goes through the multi-view UNet as one batch of 2·ΣB rows (text-cond
and text-uncond halves, camera repeated, ``num_frames`` = 4), in forwards of at most
``runtime.unet_rows`` rows (whole 4-view groups). The latent gradient is

- SDS (default): w(t)·(ε_cfg − ε) with w(t) = 1 − ᾱ_t (``losses.loss_spec("sds_mvd")``);
- ``recon_loss`` (the default): latents − x̂0, where x̂0 is predicted from ε_cfg and, per group of 4 views,
  its std is rescaled towards the no-CFG x̂0's and blended with weight ``recon_std_rescale``
  (MVDream-threestudio's x0-reconstruction loss; its gradient of
  ``0.5·||latents − x̂0||²``, without threestudio's extra 1/B, like the SDS branch here),

and is back-propagated through the VAE encoder to ``grad_rgb``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from stages.guidance.losses import (
    LossParams,
    LossSpec,
    add_noise,
    latent_gradient,
    loss_spec,
    recon_latent_gradient,
    sds_weight,
    surrogate_loss,
)
from stages.guidance.protocol import GuidanceRequest, GuidanceResponse, MVDreamSettings, UnknownAssetError, settings_for
from stages.guidance.runtime import GuidanceRuntime, RowBounded, ViewSlice, passes, slice_noise, slice_request, view_slices
from stages.guidance.vae_bridge import backprop_to_renders, bounded_encoder, encode_renders
from stages.models.config import ModelsConfig
from stages.models.device import resolve_device, resolve_dtype
from stages.models.mvdream import (
    MVDreamComponents,
    encode_prompts,
    mvdream_forward,
    normalize_camera,
)
from stages.models.mvdream_load import load_mvdream
from stages.models.tiny import TINY_RENDER_RESOLUTION


@dataclass
class _Asset:
    prompt: str
    settings: MVDreamSettings
    cond: Float[Tensor, "1 tokens channels"]
    """Text embedding on the model's device/dtype."""
    uncond: Float[Tensor, "1 tokens channels"]


class MVDreamGuidance:
    """Multi-view SDS from the MVDream UNet for batches of requests from different assets.

    Each asset is answered with the :class:`MVDreamSettings` it was registered with (CFG scale,
    SDS or ``recon_loss`` and its rescale, negative prompt).
    """

    def __init__(
        self, models: MVDreamComponents, render_resolution: int = 256, runtime: GuidanceRuntime | None = None
    ) -> None:
        if render_resolution <= 0 or render_resolution % 8:
            raise ValueError(f"render_resolution must be a positive multiple of 8, got {render_resolution}")
        self.models = models
        self.render_resolution = int(render_resolution)
        self.num_frames = int(models.num_frames)
        self.spec: LossSpec = loss_spec("sds_mvd")
        for evaluation in self.spec.evaluations:
            if evaluation.image != "none" or evaluation.timestep != "t" or evaluation.noise != "shared":
                raise ValueError(f"MVDreamGuidance cannot evaluate {evaluation}")
        self._assets: dict[str, _Asset] = {}
        self.runtime = runtime or GuidanceRuntime()
        compile_args = {"compile": self.runtime.compile, "backend": self.runtime.compile_backend}
        self.latent_encoder = bounded_encoder(models.vae, self.runtime)
        self.denoiser = RowBounded(
            self._unet_forward, models.unet, self.runtime.unet_rows, multiple=self.num_frames, **compile_args
        )

    @classmethod
    def from_config(
        cls, models: ModelsConfig, render_resolution: int | None = None, runtime: GuidanceRuntime | None = None
    ) -> "MVDreamGuidance":
        """Load ``models.mvdream`` (+ tokenizer from ``models.mvdream_text``) on ``models.device``/``dtype``.

        ``render_resolution`` defaults to MVDream's 256, and to ``TINY_RENDER_RESOLUTION`` (32)
        for ``tiny``.
        """
        device = resolve_device(models.device)
        dtype = resolve_dtype(models.dtype, device)
        components = load_mvdream(
            models.mvdream, dtype=dtype, device=device, seed=models.seed, text_source=models.mvdream_text
        )
        if render_resolution is None:
            render_resolution = mvd_render_resolution(models)
        return cls(components, render_resolution=render_resolution, runtime=runtime)

    # ------------------------------------------------------------------ registry

    def register(
        self, asset_id: str, prompt: str, reference: Any | None = None, settings: MVDreamSettings | None = None
    ) -> None:
        """Encode ``prompt`` and the settings' negative prompt (SD2.1 text encoder) once per asset.

        ``reference`` is accepted for protocol compatibility and unused (MVDream is text-only).
        """
        settings = settings_for("mvd", settings)
        known = self._assets.get(asset_id)
        if known is not None and known.prompt == prompt and known.settings.negative_prompt == settings.negative_prompt:
            self._assets[asset_id] = _Asset(prompt, settings, known.cond, known.uncond)
            return
        cond, uncond = encode_prompts(self.models, [prompt, settings.negative_prompt]).chunk(2)
        self._assets[asset_id] = _Asset(prompt, settings, cond, uncond)

    def release(self, asset_id: str) -> None:
        self._assets.pop(asset_id, None)

    # ---------------------------------------------------------------------- grad

    def _check(self, request: GuidanceRequest) -> None:
        if request.family != "mvd":
            raise ValueError(f"MVDreamGuidance answers family 'mvd', got GuidanceRequest.family={request.family!r}")
        asset = self._assets.get(request.asset_id)
        if asset is None:
            raise UnknownAssetError(request.asset_id)
        if request.c2w is None:
            raise ValueError(f"MVDreamGuidance needs GuidanceRequest.c2w (asset {request.asset_id!r})")
        batch = request.rgb.shape[0]
        f = self.num_frames
        if batch == 0 or batch % f:
            raise ValueError(
                f"MVDreamGuidance needs groups of {f} views: GuidanceRequest.rgb has batch {batch} "
                f"(asset {request.asset_id!r})"
            )
        if asset.settings.n_view != f:
            raise ValueError(
                f"MVDreamSettings.n_view={asset.settings.n_view} of asset {request.asset_id!r}, but the MVDream "
                f"model attends across {f} views"
            )
        groups = request.timesteps.reshape(-1, f)
        unequal = (groups != groups[:, :1]).any(dim=1).nonzero().flatten().tolist()
        if unequal:
            raise ValueError(
                f"GuidanceRequest.timesteps must be equal within each group of {f} views; groups "
                f"{unequal} of asset {request.asset_id!r} are not: {groups[unequal].tolist()}"
            )

    def grad(self, requests: Sequence[GuidanceRequest]) -> list[GuidanceResponse]:
        """``grad_rgb`` for every request: whole 4-view groups sliced and answered in passes of at
        most ``runtime.vae_chunk`` images (see :mod:`stages.guidance.runtime`)."""
        for request in requests:  # every request is checked before any work
            self._check(request)
        slices = view_slices([int(r.rgb.shape[0]) for r in requests], self.runtime.vae_chunk, self.num_frames)
        latent_parts: list[list[Tensor]] = [[] for _ in requests]
        rgb_parts: list[list[Tensor]] = [[] for _ in requests]
        infos: list[dict[str, float]] = [{} for _ in requests]
        for group in passes([piece.views for piece in slices], self.runtime.vae_chunk):
            pieces = [slices[i] for i in group]
            latent_grads, rgb_grads, pass_infos = self._grad_pass([(requests[p.request], p) for p in pieces])
            for piece, g_latent, g_rgb, info in zip(pieces, latent_grads, rgb_grads, pass_infos):
                latent_parts[piece.request].append(g_latent)
                rgb_parts[piece.request].append(g_rgb)
                infos[piece.request] = info
        responses = []
        for request, g_latent, g_rgb, info in zip(requests, latent_parts, rgb_parts, infos):
            g_latent = torch.cat(g_latent)
            responses.append(
                GuidanceResponse(
                    asset_id=request.asset_id,
                    grad_rgb=torch.cat(g_rgb).to(request.rgb.dtype),
                    loss=float(surrogate_loss(g_latent)),
                    grad_norm=float(g_latent.norm()),
                    timesteps=request.timesteps.detach().cpu(),
                    info=info,
                )
            )
        return responses

    def _grad_pass(
        self, pieces: Sequence[tuple[GuidanceRequest, ViewSlice]]
    ) -> tuple[list[Tensor], list[Tensor], list[dict[str, float]]]:
        """One pass: VAE encode with grad, the multi-view UNet over every row (bounded forwards),
        one backprop. Returns each slice's latent gradient, grad_rgb and info."""
        models = self.models
        device, dtype = models.device, models.dtype
        alphas_all = models.alphas_cumprod.float()
        requests = [slice_request(request, piece.start, piece.stop) for request, piece in pieces]

        encoded = encode_renders(
            self.latent_encoder, [r.rgb for r in requests], self.render_resolution, device, dtype, self.runtime.vae_chunk
        )
        latents = encoded.latents
        shape = latents.shape[1:]
        noises = [slice_noise(whole.seed, int(whole.rgb.shape[0]), shape, piece) for whole, piece in pieces]
        timesteps = torch.cat([r.timesteps.long().cpu() for r in requests])
        noise = torch.cat(noises).to(device)
        t_device = timesteps.to(device)

        with torch.no_grad():
            noisy = add_noise(latents, noise.to(dtype), alphas_all, t_device)
            camera = normalize_camera(torch.cat([r.c2w.float().cpu() for r in requests])).to(device)
            texts = {
                "cond": torch.cat([self._assets[r.asset_id].cond.expand(r.rgb.shape[0], -1, -1) for r in requests]),
                "uncond": torch.cat(
                    [self._assets[r.asset_id].uncond.expand(r.rgb.shape[0], -1, -1) for r in requests]
                ),
            }
            n_eval = len(self.spec.evaluations)
            eps = self.denoiser(
                noisy.repeat(n_eval, 1, 1, 1),
                t_device.repeat(n_eval),
                torch.cat([texts[e.text] for e in self.spec.evaluations]).to(device, dtype),
                camera.repeat(n_eval, 1).to(dtype),
            ).float()
        predictions = [encoded.split(chunk) for chunk in eps.chunk(n_eval)]  # [eval][request]
        noisy_split = encoded.split(noisy)
        latent_split = encoded.split(latents)

        grads: list[Tensor] = []
        infos: list[dict[str, float]] = []
        for i, request in enumerate(requests):
            settings = self._assets[request.asset_id].settings
            scale = float(settings.guidance_scale)
            t = request.timesteps.long().cpu()
            preds = [predictions[e][i] for e in range(n_eval)]
            recon = settings.recon_loss
            if recon:
                cond_index = [e.text for e in self.spec.evaluations].index("cond")
                uncond_index = [e.text for e in self.spec.evaluations].index("uncond")
                grad = recon_latent_gradient(
                    latent_split[i],
                    noisy_split[i],
                    alphas_all[t].to(device),
                    preds[cond_index],
                    preds[uncond_index],
                    scale,
                    float(settings.recon_std_rescale),
                    self.num_frames,
                )
            else:
                weight = sds_weight(alphas_all, t).to(device)
                grad = latent_gradient(
                    self.spec, preds, noises[i].to(device), weight, LossParams(guidance_scale=scale)
                )
            grad = torch.nan_to_num(grad.float())
            grads.append(grad)
            infos.append({"guidance_scale": scale, "recon_loss": float(recon)})

        grad_rgb = backprop_to_renders(encoded, torch.cat(grads).to(latents.dtype))
        return grads, grad_rgb, infos

    def _unet_forward(self, unet: torch.nn.Module, x: Tensor, t: Tensor, context: Tensor, camera: Tensor) -> Tensor:
        return mvdream_forward(unet, x, t, context, camera, num_frames=self.num_frames)


def mvd_render_resolution(models: ModelsConfig) -> int:
    """Square size renders are resized to before the VAE: MVDream's 256, ``TINY_RENDER_RESOLUTION`` for ``tiny``."""
    return TINY_RENDER_RESOLUTION if models.mvdream == "tiny" else 256
