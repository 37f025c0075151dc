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
    """Rebuild the request's cameras: ``c2w``, ``fovy`` (radians), elevation, azimuth."""
    if request.c2w is None or request.fovy is None:
        raise ValueError("image-target guidance needs GuidanceRequest.c2w and fovy")
    c2w = request.c2w.float().cpu()
    batch = c2w.shape[0]
    fovy = request.fovy.float().cpu()
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

    def register(self, asset_id: str, prompt: str, reference: Any | None = None, settings: Any | None = None) -> None:
        """Remember the asset (the target does not depend on prompt, reference or settings)."""
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


class SphereTarget:
    """An analytic target: a ball of ``radius`` at the origin coloured by its normal
    (``0.5 + 0.4·n``), over a solid ``background`` — ray-traced in closed form.

    Pixel rays follow the scenes' convention (pixel centres, OpenGL camera, focal
    ``H / (2 tan(fovy/2))``).
    """

    def __init__(self, radius: float = 0.5, background: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        self.radius = float(radius)
        self.background = torch.tensor([float(v) for v in background])

    def __call__(self, cameras: Cameras, height: int, width: int) -> Tensor:
        c2w = cameras.c2w.float().cpu()
        batch = c2w.shape[0]
        focal = 0.5 * height / torch.tan(0.5 * cameras.fovy.float().cpu())
        ys = torch.arange(height, dtype=torch.float32) + 0.5
        xs = torch.arange(width, dtype=torch.float32) + 0.5
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        local = torch.stack(
            [
                (grid_x - width / 2)[None] / focal[:, None, None],
                -(grid_y - height / 2)[None] / focal[:, None, None],
                -torch.ones(batch, height, width),
            ],
            dim=-1,
        )
        dirs = torch.nn.functional.normalize(local @ c2w[:, None, :3, :3].transpose(-1, -2), dim=-1)
        origin = c2w[:, None, None, :3, 3]
        b = (origin * dirs).sum(-1)
        c = (origin * origin).sum(-1) - self.radius**2
        disc = b * b - c
        hit = disc > 0
        depth = -b - disc.clamp_min(0).sqrt()
        normal = torch.nn.functional.normalize(origin + depth[..., None] * dirs, dim=-1)
        colour = 0.5 + 0.4 * normal
        image = torch.where(hit[..., None], colour, self.background.expand(batch, height, width, 3))
        return image.permute(0, 3, 1, 2).contiguous()
