"""``AnalyticGuidance``: the analytic teacher behind the guidance protocol.

A drop-in :class:`stages.guidance.protocol.Guidance` for tests and CPU demos. Its "VAE" is the
identity on colours: latent = 2·rgb − 1 (each pixel a point in R^3), so
grad_rgb = 2·grad_latent. Everything else is what a UNet guidance does: the same
:class:`~stages.guidance.losses.LossSpec`, ``add_noise``, w(t) = 1 − ᾱ_t and per-request noise
``request_noise(seed, shape)``, so a response never depends on its batch mates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from stages.guidance import losses
from stages.guidance.protocol import (
    Family,
    GuidanceRequest,
    GuidanceResponse,
    GuidanceSettings,
    IPSettings,
    UnknownAssetError,
    request_noise,
    settings_for,
)
from stages.teacher.mixture import GaussianMixture
from stages.teacher.model import AnalyticTeacher, TeacherConfig, prompt_mixture, reference_component


def reference_points(reference: Any) -> Tensor:
    """A reference as data-space colour points (N, 3) in [−1, 1].

    Accepts a PIL image, an (H, W, 3) uint8/float array, a (3, H, W) tensor in [0, 1], or one
    colour (3,) in [0, 1].
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(reference, Image.Image):
        array = np.asarray(reference.convert("RGB"), dtype=np.float64) / 255.0
        rgb = torch.from_numpy(array).reshape(-1, 3)
    elif isinstance(reference, np.ndarray):
        array = reference.astype(np.float64) / (255.0 if reference.dtype == np.uint8 else 1.0)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"reference array must be (H, W, 3), got {array.shape}")
        rgb = torch.from_numpy(array).reshape(-1, 3)
    else:
        tensor = torch.as_tensor(reference, dtype=torch.float64)
        if tensor.shape == (3,):
            rgb = tensor.unsqueeze(0)
        elif tensor.ndim == 3 and tensor.shape[0] == 3:
            rgb = tensor.reshape(3, -1).T
        else:
            raise ValueError(
                f"reference must be a PIL image, an (H, W, 3) array, a (3, H, W) tensor or a (3,) "
                f"colour, got shape {tuple(tensor.shape)}"
            )
    if bool((rgb < 0).any()) or bool((rgb > 1).any()):
        raise ValueError("reference colours must be in [0, 1]")
    return rgb * 2.0 - 1.0


def reference_image(colour: Sequence[float] | Tensor, size: int = 64):
    """A solid-colour PIL reference image of an RGB colour in [0, 1] (helper for tests/demos)."""
    from PIL import Image

    rgb = torch.as_tensor(colour, dtype=torch.float64).clamp(0, 1)
    value = tuple(int(round(float(c) * 255)) for c in rgb)
    return Image.new("RGB", (size, size), value)


@dataclass
class _Asset:
    prompt: str
    settings: GuidanceSettings
    teacher: AnalyticTeacher
    has_reference: bool


@dataclass
class AnalyticGuidance:
    """Guidance protocol over :class:`AnalyticTeacher` (identity VAE, D = 3 colours).

    An asset is answered with the settings it was registered with (:class:`IPSettings`: loss,
    CFG and IP scales, ``sd_branch``, ``delta_t``, ``cv_guidance_scale``, negative prompt; an
    asset registered with :class:`~stages.guidance.protocol.MVDreamSettings` too answers that
    family's requests with plain SDS at its CFG scale). Noise: ``request_noise(seed, shape)``
    (and ``seed + 1`` for the independent draw of ``cv_independent_noise``). ``info`` of a
    response holds ``residual_norm``.
    """

    config: TeacherConfig = field(default_factory=TeacherConfig)
    _assets: dict[tuple[str, Family], _Asset] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.config.dim != 3:
            raise ValueError(f"AnalyticGuidance works on RGB: TeacherConfig.dim must be 3, got {self.config.dim}")

    def register(
        self, asset_id: str, prompt: str, reference: Any | None = None, settings: GuidanceSettings | None = None
    ) -> None:
        """Build the asset's teacher (prompt mixture, the settings' negative prompt as the
        unconditional mixture, reference component) for the settings' family (None: IP defaults)."""
        settings = settings if settings is not None else IPSettings()
        settings = settings_for(settings.family, settings)
        cond = prompt_mixture(prompt, self.config)
        uncond = prompt_mixture(settings.negative_prompt, self.config)
        points = None
        if reference is not None:
            # The reference image selects the cond component most of its pixels belong to;
            # its mean is the point both mixtures are tilted toward.
            points = cond.means[reference_component(cond, reference_points(reference))]
        teacher = AnalyticTeacher(cond, uncond, points, self.config.tilt, self.config.null_flatten)
        self._assets[(asset_id, settings.family)] = _Asset(prompt, settings, teacher, reference is not None)

    def release(self, asset_id: str) -> None:
        for key in [key for key in self._assets if key[0] == asset_id]:
            del self._assets[key]

    def teacher(self, asset_id: str, family: Family = "ip") -> AnalyticTeacher:
        """The registered asset's teacher (raises :class:`UnknownAssetError`)."""
        return self._asset(asset_id, family).teacher

    def _asset(self, asset_id: str, family: Family) -> _Asset:
        asset = self._assets.get((asset_id, family))
        if asset is None:
            raise UnknownAssetError(asset_id)
        return asset

    def mixture(self, asset_id: str) -> GaussianMixture:
        """The prompt's mixture of a registered asset (data space, colours in [−1, 1])."""
        return self.teacher(asset_id).cond

    def mode_colours(self, asset_id: str) -> Tensor:
        """(K, 3) RGB colours in [0, 1] of the prompt's modes (component means)."""
        return ((self.mixture(asset_id).means + 1.0) / 2.0).float()

    def reference_colour(self, asset_id: str) -> Tensor:
        """(3,) RGB colour in [0, 1] of the reference's mode, where IP-guided losses lead."""
        teacher = self.teacher(asset_id)
        if teacher.reference_index is None:
            raise ValueError(f"asset {asset_id!r} was registered without a reference")
        return self.mode_colours(asset_id)[teacher.reference_index]

    def mode_index(self, asset_id: str, rgb: Tensor) -> Tensor:
        """Index of the prompt mode whose basin holds each colour: rgb (..., 3, H, W) in [0, 1]
        → (..., H, W) int64 (a (3,) colour gives a 0-d tensor)."""
        points = torch.as_tensor(rgb, dtype=torch.float64).movedim(-3 if rgb.ndim >= 3 else 0, -1)
        modes = self.mixture(asset_id).responsibilities(points.reshape(-1, 3) * 2.0 - 1.0).argmax(1)
        return modes.reshape(points.shape[:-1])

    def grad(self, requests: Sequence[GuidanceRequest]) -> list[GuidanceResponse]:
        """One response per request, each computed from that request alone."""
        return [self._grad_one(request) for request in requests]

    def _grad_one(self, request: GuidanceRequest) -> GuidanceResponse:
        asset = self._asset(request.asset_id, request.family)
        settings = asset.settings
        if not isinstance(settings, IPSettings):  # the multi-view family: plain SDS at its CFG scale
            settings = IPSettings(loss="sds", guidance_scale=settings.guidance_scale, ip_scale=0.0)
        spec = losses.loss_spec(settings.loss, settings.sd_branch)
        if spec.uses_image_prompt and not asset.has_reference:
            raise ValueError(
                f"loss {settings.loss!r} uses the image prompt but asset {request.asset_id!r} "
                "was registered without a reference"
            )
        latents = request.rgb.detach().cpu().float() * 2.0 - 1.0
        noise = request_noise(request.seed, latents.shape)
        # the independent draw of cv_independent_noise comes from seed + 1, as in IPGuidance
        independent = request_noise(request.seed + 1, latents.shape) if spec.needs_independent_noise else None
        params = losses.LossParams(guidance_scale=float(settings.guidance_scale), cv_guidance_scale=float(settings.cv_guidance_scale))
        timesteps = request.timesteps.detach().cpu().long()
        grad_latent = asset.teacher.latent_gradient(
            spec, latents, timesteps, noise, params, float(settings.ip_scale), independent, settings.delta_t
        )
        weight = losses.sds_weight(asset.teacher.alphas_cumprod, timesteps).float()
        residual_norm = float((grad_latent / weight.clamp_min(1e-12).view(-1, 1, 1, 1)).norm())
        return identity_vae_response(request, grad_latent, timesteps, {"residual_norm": residual_norm})


def identity_vae_response(
    request: GuidanceRequest, grad_latent: Tensor, timesteps: Tensor, info: dict[str, float]
) -> GuidanceResponse:
    """The response of a guidance whose "VAE" is latent = 2·rgb − 1: grad_rgb = 2·grad_latent."""
    return GuidanceResponse(
        asset_id=request.asset_id,
        grad_rgb=(2.0 * grad_latent).to(request.rgb.dtype),
        loss=float(losses.surrogate_loss(grad_latent)),
        grad_norm=float(grad_latent.norm()),
        timesteps=timesteps,
        info=info,
    )
