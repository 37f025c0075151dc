"""``ToyWorldGuidance``: exact guidance over a toy world's objects, behind the guidance protocol.

One class serves both sides of the optimiser:

- **IP side** (family ``ip``, any loss of :func:`stages.guidance.losses.loss_spec`: ISD, SDS, IP-SDS, the
  control-variate ablations): every evaluation (text cond/uncond × image ref/null/none × t or
  t+δt × shared or independent noise) is the posterior-mean ε of the mixture over the prompt's
  objects rendered from the request's cameras, one set of responsibilities per image. Branches
  are weight changes (:func:`stages.teacher.model.branch_log_weights`): text = the prompt's
  π_k ∝ ρ^k, unconditional = equal weights (over the prompt's or the world's objects), image
  prompt = the analytic teacher's null flattening and tilt toward the reference's object.
- **Multi-view side** (family ``mvd``, MVDream's role): text cond / uncond at the
  request's CFG, one set of responsibilities per group of ``n_view`` views (summed
  log-likelihoods), as SDS or as MVDream-threestudio's ``recon_loss``
  (:func:`stages.guidance.losses.recon_latent_gradient`).

The "VAE" is the identity on colours (latent = 2·rgb − 1), so grad_rgb = 2·grad_latent, as in
:class:`stages.teacher.AnalyticGuidance`. Noise is ``request_noise(seed, shape)`` (and
``seed + 1`` for an independent draw), so a response never depends on its batch mates. The
reference's object is identified from the reference IMAGE: the object whose render from the
world's reference camera is nearest (mean squared error). A negative prompt is read as the
unconditional branch (the world has no other).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from stages.guidance import losses
from stages.guidance.protocol import (
    NUM_TRAIN_TIMESTEPS,
    Family,
    GuidanceRequest,
    GuidanceResponse,
    GuidanceSettings,
    IPSettings,
    MVDreamSettings,
    UnknownAssetError,
    request_noise,
    settings_for,
)
from stages.teacher.guidance import identity_vae_response
from stages.teacher.mixture import alphas_cumprod
from stages.teacher.model import branch_log_weights
from stages.toyworld.mixture import posterior_eps
from stages.toyworld.render import PrimitiveTable, render_objects
from stages.toyworld.world import World, load_world

MULTIVIEW_LOSS = "sds_mvd"
"""The loss of the multi-view family (SDS over groups of views)."""


def reference_camera(world: World) -> tuple[Tensor, Tensor]:
    """(c2w (1, 4, 4), fovy (1,) radians) of the world's reference sampler."""
    from stages.scene.cameras import make_cameras

    ref = world.reference
    cams = make_cameras(
        torch.tensor([ref.elevation]), torch.tensor([ref.azimuth]), torch.tensor([ref.distance]), torch.tensor([ref.fovy])
    )
    return cams.c2w, cams.fovy


def image_tensor(image: Any) -> Tensor:
    """A PIL image / (H, W, 3) array / (3, H, W) tensor in [0, 1] as (3, H, W) float32."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    if isinstance(image, (str, Path)):
        from PIL import Image as PILImage

        with PILImage.open(image) as opened:
            return image_tensor(opened.convert("RGB"))
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"reference array must be (H, W, 3), got {array.shape}")
        return torch.from_numpy(array).permute(2, 0, 1)
    tensor = torch.as_tensor(image, dtype=torch.float32)
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"reference must be a PIL image, an (H, W, 3) array or a (3, H, W) tensor, got {tuple(tensor.shape)}")
    return tensor


def nearest_object(world: World, prompt: str, image: Any) -> tuple[int, Tensor]:
    """(index of the prompt's object whose reference-camera render is nearest ``image``, the
    mean squared errors (K,)): how the IP branch reads a reference image."""
    rgb = image_tensor(image)
    c2w, fovy = reference_camera(world)
    renders = render_objects(world.prompt_table(prompt), c2w, fovy, rgb.shape[1], rgb.shape[2], world.shading, world.supersample)
    mse = (renders.rgb[:, 0] - rgb[None]).pow(2).mean(dim=(1, 2, 3))
    return int(mse.argmin()), mse


@dataclass
class _Asset:
    prompt: str
    reference_index: int | None
    """The reference's object among the prompt's objects (None: registered without reference)."""
    settings: GuidanceSettings


class ToyWorldGuidance:
    """The :class:`~stages.guidance.protocol.Guidance` of a toy world (both optimiser slots).

    An asset may be registered once per family (:class:`IPSettings`: the IP side;
    :class:`MVDreamSettings`: the multi-view side); a request is answered with the settings of its
    ``family``. Requests need ``c2w`` and ``fovy``: the cameras the objects are rendered from.
    """

    def __init__(self, world: World | str | Path = "default") -> None:
        self.world = world if isinstance(world, World) else load_world(world)
        self.alphas_cumprod = alphas_cumprod(NUM_TRAIN_TIMESTEPS)
        self._assets: dict[tuple[str, Family], _Asset] = {}

    # ------------------------------------------------------------------ registry
    def register(
        self, asset_id: str, prompt: str, reference: Any | None = None, settings: GuidanceSettings | None = None
    ) -> None:
        """Check the prompt is in the world and read the reference image's object; keep the
        settings of their family (None: the IP side's defaults)."""
        settings = settings if settings is not None else IPSettings()
        settings = settings_for(settings.family, settings)
        self.world.check_prompt(prompt, f"asset {asset_id!r}")
        index = None if reference is None else nearest_object(self.world, prompt, reference)[0]
        self._assets[(asset_id, settings.family)] = _Asset(prompt, index, settings)

    def release(self, asset_id: str) -> None:
        for key in [key for key in self._assets if key[0] == asset_id]:
            del self._assets[key]

    def reference_index(self, asset_id: str, family: Family = "ip") -> int | None:
        """The registered reference's object index among its prompt's objects."""
        return self._asset(asset_id, family).reference_index

    def _asset(self, asset_id: str, family: Family) -> _Asset:
        asset = self._assets.get((asset_id, family))
        if asset is None:
            raise UnknownAssetError(asset_id)
        return asset

    # ------------------------------------------------------------------ gradients
    def grad(self, requests: Sequence[GuidanceRequest]) -> list[GuidanceResponse]:
        """One response per request, each computed from that request alone."""
        return [self._grad_one(request) for request in requests]

    def _cameras(self, request: GuidanceRequest) -> tuple[Tensor, Tensor]:
        batch = request.rgb.shape[0]
        if request.c2w is None:
            raise ValueError(f"ToyWorldGuidance needs GuidanceRequest.c2w (asset {request.asset_id!r})")
        if request.fovy is None:
            raise ValueError(f"ToyWorldGuidance needs GuidanceRequest.fovy ({batch} values, radians; asset {request.asset_id!r})")
        return request.c2w.float().cpu(), request.fovy.float().cpu()

    def _components(self, prompt: str, text: str) -> tuple[PrimitiveTable, Tensor, slice]:
        """The objects of a text branch, their log-weights, and where the prompt's objects sit among them."""
        world = self.world
        if text == "cond" or world.model.uncond == "prompt":
            k = len(world.prompts[prompt])
            log_w = world.log_weights(prompt) if text == "cond" else torch.zeros(k, dtype=torch.float64)
            return world.prompt_table(prompt), log_w, slice(0, k)
        return world.table, torch.zeros(len(world.objects), dtype=torch.float64), world.prompt_slice(prompt)

    def _grad_one(self, request: GuidanceRequest) -> GuidanceResponse:
        asset = self._asset(request.asset_id, request.family)
        settings = asset.settings
        multiview = isinstance(settings, MVDreamSettings)
        ip = settings if isinstance(settings, IPSettings) else IPSettings(loss=MULTIVIEW_LOSS, guidance_scale=settings.guidance_scale, ip_scale=0.0)
        spec = losses.loss_spec(ip.loss, ip.sd_branch)
        if spec.uses_image_prompt and asset.reference_index is None:
            raise ValueError(
                f"loss {ip.loss!r} uses the image prompt but asset {request.asset_id!r} was registered without a reference"
            )
        c2w, fovy = self._cameras(request)
        batch, _, height, width = request.rgb.shape
        group = settings.n_view if multiview else 1
        if multiview:
            _check_groups(request, group)
        x0 = request.rgb.detach().cpu().double() * 2.0 - 1.0
        noise = request_noise(request.seed, x0.shape).double()
        noise2 = request_noise(request.seed + 1, x0.shape).double() if spec.needs_independent_noise else None
        timesteps = request.timesteps.detach().cpu().long()
        shifted = losses.shifted_timesteps(timesteps, ip.delta_t, NUM_TRAIN_TIMESTEPS)
        acp = self.alphas_cumprod
        model = self.world.model

        means: dict[str, tuple[Tensor, Tensor, slice]] = {}
        rendered: dict[int, Tensor] = {}  # one render per object table (cond and uncond may share it)
        for text in sorted({e.text for e in spec.evaluations}):
            table, log_w, span = self._components(asset.prompt, text)
            if table.num_objects not in rendered:
                rgb = render_objects(table, c2w, fovy, height, width, self.world.shading, self.world.supersample).rgb
                rendered[table.num_objects] = (rgb.double() * 2 - 1).permute(1, 0, 2, 3, 4).reshape(batch, table.num_objects, -1)
            means[text] = (rendered[table.num_objects], log_w, span)

        predictions, resp = [], None
        for evaluation in spec.evaluations:
            t = timesteps if evaluation.timestep == "t" else shifted
            eps = noise if evaluation.noise == "shared" else noise2
            x_t = losses.add_noise(x0, eps, acp, t)
            mu, log_w, span = means[evaluation.text]
            ref = None if asset.reference_index is None else span.start + asset.reference_index
            weights = branch_log_weights(log_w, evaluation.image, float(ip.ip_scale), ref, model.tilt, model.null_flatten)
            eps_hat, r = posterior_eps(
                x_t.reshape(batch, -1), acp[t], mu, weights, model.component_std, model.evidence_dims, group
            )
            predictions.append(eps_hat.reshape(x0.shape))
            if resp is None and evaluation.text == "cond":
                resp = r
        params = losses.LossParams(guidance_scale=float(ip.guidance_scale), cv_guidance_scale=float(ip.cv_guidance_scale))
        recon = multiview and settings.recon_loss
        if recon:
            grad_latent = losses.recon_latent_gradient(
                x0, losses.add_noise(x0, noise, acp, timesteps), acp[timesteps], predictions[0], predictions[1],
                params.guidance_scale, float(settings.recon_std_rescale), group,
            ).double()
        else:
            weight = losses.sds_weight(acp, timesteps)
            grad_latent = losses.latent_gradient(spec, predictions, noise, weight, params, noise2)
        info = {"recon_loss": float(recon), "view_group": float(group)}
        if resp is not None:
            info["resp_dominant"] = float(resp[:, 0].mean())
            info["top_object"] = float(torch.mode(resp.argmax(1)).values)
            if asset.reference_index is not None:
                info["resp_reference"] = float(resp[:, asset.reference_index].mean())
        return identity_vae_response(request, grad_latent, timesteps, info)


def _check_groups(request: GuidanceRequest, group: int) -> None:
    batch = request.rgb.shape[0]
    if group < 1 or batch % group:
        raise ValueError(
            f"the multi-view branch needs groups of {group} views: GuidanceRequest.rgb has batch {batch} "
            f"(asset {request.asset_id!r})"
        )
    groups = request.timesteps.reshape(-1, group)
    if bool((groups != groups[:, :1]).any()):
        raise ValueError(
            f"GuidanceRequest.timesteps must be equal within each group of {group} views (asset {request.asset_id!r})"
        )
