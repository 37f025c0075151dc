"""A guidance whose gradient pulls renders toward fixed target images (tests, benchmarks).

``grad_rgb = scale · (rgb − target(cameras))``: the gradient of ``0.5·scale·||rgb − target||²``.
With it the per-asset loop becomes plain multi-view reconstruction, so convergence of a scene
(PSNR against the target) checks the renderer, the cameras and the optimiser without any
diffusion model.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from stages.guidance.protocol import GuidanceRequest, GuidanceResponse, UnknownAssetError
from stages.scene.base import Cameras

TargetFn = Callable[[Cameras, int, int], Tensor]
"""(cameras, height, width) → target renders (B, 3, H, W) in [0, 1]."""


def cameras_from_request(request: GuidanceRequest) -> Cameras:
    """Rebuild the request's cameras: ``c2w``, elevation, azimuth, and ``options["fovy"]`` (radians)."""
    if request.c2w is None or "fovy" not in request.options:
        raise ValueError("image-target guidance needs GuidanceRequest.c2w and options['fovy']")
    c2w = request.c2w.float().cpu()
    batch = c2w.shape[0]
    fovy = torch.as_tensor(request.options["fovy"], dtype=torch.float32).reshape(-1)
    if fovy.numel() == 1:
        fovy = fovy.expand(batch)
    zeros = torch.zeros(batch)
    return Cameras(
        c2w=c2w,
        fovy=fovy,
        elevation=zeros if request.elevation is None else request.elevation.float().cpu(),
        azimuth=zeros if request.azimuth is None else request.azimuth.float().cpu(),
        distance=c2w[:, :3, 3].norm(dim=-1),
    )


class ImageTargetGuidance:
    """Implements :class:`stages.guidance.protocol.Guidance` with image-space targets.

    ``target`` renders the wanted images for a batch of cameras (e.g. an analytic object or
    another scene). Requests of unregistered assets raise :class:`UnknownAssetError`, like a
    restarted actor would.
    """

    def __init__(self, target: TargetFn, scale: float = 1.0) -> None:
        self.target = target
        self.scale = float(scale)
        self.registered: dict[str, str] = {}
        self.calls = 0

    def register(self, asset_id: str, prompt: str, reference: Any | None = None, negative_prompt: str = "") -> None:
        self.registered[asset_id] = prompt

    def release(self, asset_id: str) -> None:
        self.registered.pop(asset_id, None)

    @torch.no_grad()
    def grad(self, requests: Sequence[GuidanceRequest]) -> list[GuidanceResponse]:
        responses = []
        for request in requests:
            if request.asset_id not in self.registered:
                raise UnknownAssetError(request.asset_id)
            self.calls += 1
            rgb = request.rgb.float().cpu()
            height, width = rgb.shape[-2:]
            target = self.target(cameras_from_request(request), height, width).float().cpu()
            if target.shape != rgb.shape:
                raise ValueError(f"target renders have shape {tuple(target.shape)}, renders {tuple(rgb.shape)}")
            residual = rgb - target
            grad = (self.scale * residual).to(request.rgb.dtype)
            mse = float(residual.pow(2).mean())
            responses.append(
                GuidanceResponse(
                    asset_id=request.asset_id,
                    grad_rgb=grad,
                    loss=0.5 * self.scale * float(residual.pow(2).sum()) / max(1, rgb.shape[0]),
                    grad_norm=float(grad.norm()),
                    timesteps=request.timesteps.clone(),
                    info={"mse": mse},
                )
            )
        return responses
