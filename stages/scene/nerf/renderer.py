"""Volume rendering of a ``NeRFField``: camera rays, ray/sphere bounds, stratified samples,
occupancy-grid pruning, alpha compositing (pure torch; any device)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import Cameras


def camera_rays(cameras: Cameras, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Origins and unit directions (B, H, W, 3) through pixel centres (OpenGL cameras: look
    along −z, +y up; focal = H / (2 tan(fovy / 2)), as threestudio's ``get_ray_directions``)."""
    c2w = cameras.c2w.float()
    device = c2w.device
    focal = 0.5 * height / torch.tan(0.5 * cameras.fovy.float().to(device))  # (B,)
    j = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    i = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    ii, jj = torch.meshgrid(i, j, indexing="ij")  # (H, W)
    dirs_cam = torch.stack(
        [
            (jj - 0.5 * width)[None] / focal[:, None, None],
            -(ii - 0.5 * height)[None] / focal[:, None, None],
            -torch.ones_like(ii)[None].expand(len(cameras), -1, -1),
        ],
        dim=-1,
    )  # (B, H, W, 3)
    dirs = torch.einsum("bij,bhwj->bhwi", c2w[:, :3, :3], dirs_cam)
    origins = c2w[:, None, None, :3, 3].expand_as(dirs)
    return origins, F.normalize(dirs, dim=-1)


def sphere_bounds(origins: Tensor, dirs: Tensor, radius: float) -> tuple[Tensor, Tensor, Tensor]:
    """Near/far distances (N,) where unit rays (N, 3) cross the ball, and a hit mask (N,)."""
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - radius * radius
    disc = b * b - c
    root = torch.sqrt(disc.clamp_min(0.0))
    near = (-b - root).clamp_min(0.0)
    far = -b + root
    hit = (disc > 0) & (far > near)
    return near, far, hit


@dataclass
class MarchResult:
    """Per ray (n,): ``rgb`` (n, 3) premultiplied, ``opacity``, ``depth``, optional ``normal``
    (n, 3); per kept sample (m,): ``weights``, ``ray`` (local ray index), ``normal`` (m, 3)
    and ``dirs`` (m, 3)."""

    rgb: Tensor
    opacity: Tensor
    depth: Tensor
    normal: Tensor | None
    weights: Tensor
    ray: Tensor
    sample_normal: Tensor | None
    sample_dirs: Tensor


def composite(sigma_delta: Tensor) -> Tensor:
    """Weights w_i = T_i (1 − exp(−σ_i δ_i)), T_i = exp(−Σ_{j<i} σ_j δ_j); (n, S) → (n, S)."""
    exclusive = torch.cumsum(sigma_delta, dim=1) - sigma_delta
    return torch.exp(-exclusive) * (1.0 - torch.exp(-sigma_delta))


def grid_cells(points: Tensor, radius: float, resolution: int) -> Tensor:
    """Flat occupancy-grid cell index (...,) of world points (..., 3) in [-r, r]³."""
    cell = ((points + radius) / (2.0 * radius) * resolution).long().clamp(0, resolution - 1)
    return (cell[..., 0] * resolution + cell[..., 1]) * resolution + cell[..., 2]


def shade(
    albedo: Tensor, normal: Tensor | None, light_dirs: Tensor | None, shading: str, ambient: Tensor, diffuse: Tensor
) -> Tensor:
    """Sample colours (m, 3): ``albedo``; ``textureless`` = ambient + diffuse·max(0, n·l);
    ``diffuse`` = albedo.clamp(0, 1) · textureless (threestudio's point-light material)."""
    if shading == "albedo":
        return albedo
    assert normal is not None and light_dirs is not None
    lambert = (normal * light_dirs).sum(-1, keepdim=True).clamp_min(0.0)
    textureless = lambert * diffuse + ambient
    if shading == "textureless":
        return textureless
    return albedo.clamp(0.0, 1.0) * textureless


def march_rays(
    field: "torch.nn.Module",
    origins: Tensor,
    dirs: Tensor,
    near: Tensor,
    far: Tensor,
    *,
    n_samples: int,
    jitter: Tensor | None,
    occupancy: Tensor | None,
    radius: float,
    shading: str,
    with_normals: bool,
    light_positions: Tensor | None,
    ambient: Tensor,
    diffuse: Tensor,
    normal_min_weight: float = 0.0,
) -> MarchResult:
    """Render n rays (origins, dirs (n, 3); near, far (n,)) with ``n_samples`` stratified samples.

    ``jitter`` (n, S) in [0, 1) places each sample in its bin (None: bin midpoints);
    ``occupancy`` (R, R, R) bool skips samples in empty cells before the field is queried;
    normals are computed only where the compositing weight exceeds ``normal_min_weight``.
    """
    n = origins.shape[0]
    device = origins.device
    bins = torch.arange(n_samples, device=device, dtype=torch.float32)
    offset = jitter if jitter is not None else torch.full((n, n_samples), 0.5, device=device)
    delta = (far - near) / n_samples  # (n,)
    t = near[:, None] + (bins[None] + offset) * delta[:, None]  # (n, S)
    points = origins[:, None, :] + dirs[:, None, :] * t[..., None]  # (n, S, 3)
    if occupancy is not None:
        keep = occupancy.reshape(-1)[grid_cells(points, radius, occupancy.shape[0])]
        ray, sample = keep.nonzero(as_tuple=True)
    else:
        ray = torch.arange(n, device=device).repeat_interleave(n_samples)
        sample = torch.arange(n_samples, device=device).repeat(n)
    kept_points = points[ray, sample]
    out = field(kept_points)
    sigma_delta = torch.zeros(n, n_samples, device=device, dtype=out["density"].dtype)
    sigma_delta = sigma_delta.index_put((ray, sample), out["density"] * delta[ray])
    weights = composite(sigma_delta)[ray, sample]  # (m,)
    normal = None
    if with_normals:
        # Normals cost 6 extra density lookups (or a double backward) per sample; samples with
        # negligible weight cannot change the image, so they keep a zero normal.
        visible = (weights.detach() > normal_min_weight).nonzero(as_tuple=True)[0]
        normal = torch.zeros_like(kept_points).index_put((visible,), field.normal(kept_points[visible]))
    light_dirs = None
    if shading != "albedo":
        light_dirs = F.normalize(light_positions[ray] - kept_points, dim=-1)
    color = shade(out["albedo"], normal, light_dirs, shading, ambient, diffuse)

    def accumulate(values: Tensor) -> Tensor:
        return torch.zeros(n, values.shape[-1], device=device, dtype=values.dtype).index_add(0, ray, values)

    rgb = accumulate(weights[:, None] * color)
    opacity = accumulate(weights[:, None])[:, 0]
    depth = accumulate((weights * t[ray, sample])[:, None])[:, 0]
    ray_normal = None
    if normal is not None:
        ray_normal = F.normalize(accumulate(weights[:, None] * normal), dim=-1)
    return MarchResult(rgb, opacity, depth, ray_normal, weights, ray, normal, dirs[ray])
