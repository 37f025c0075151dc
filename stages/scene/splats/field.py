"""Gaussian splats read as a density and colour field, so they can be meshed like a NeRF.

density(x) = Σ_i o_i · exp(−½ (x − μ_i)ᵀ Σ_i⁻¹ (x − μ_i)) over the Gaussians within 3σ of x
(DreamGaussian's mesh extraction: marching cubes on this field), and colour(x) is the same
weights' average of the Gaussians' view-independent (DC) colours. Points are visited in
spatially sorted chunks and each chunk only meets the Gaussians whose 3σ box reaches its
bounding box, so the cost follows the overlap, not points × Gaussians.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rasterize_torch import quat_to_rotmat

CUTOFF_SIGMA = 3.0
"""A Gaussian contributes within this many standard deviations (along its axes) of its mean."""


def splat_field(
    points: Tensor,
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    chunk: int = 2048,
    budget: int = 1 << 22,
) -> tuple[Tensor, Tensor]:
    """Density (P,) and colour (P, 3) of N Gaussians at world points (P, 3).

    ``quats`` wxyz (N, 4), ``scales`` (N, 3) standard deviations, ``opacities`` (N,) in [0, 1],
    ``colors`` (N, 3). Where no Gaussian reaches a point its density is 0 and its colour that of
    the nearest mean. ``chunk`` points are evaluated together against at most ``budget`` //
    ``chunk`` Gaussians at a time (memory ∝ ``budget``).
    """
    points = points.to(means.device, means.dtype)
    density = torch.zeros(points.shape[0], device=points.device, dtype=points.dtype)
    weighted = torch.zeros(points.shape[0], 3, device=points.device, dtype=points.dtype)
    if means.shape[0] == 0 or points.shape[0] == 0:
        return density, weighted
    rot = quat_to_rotmat(quats)  # (N, 3, 3), columns = axes
    inv_scales = 1.0 / scales.clamp_min(1e-12)
    reach = CUTOFF_SIGMA * scales.max(dim=-1).values  # (N,) radius of the bounding box
    low, high = means - reach[:, None], means + reach[:, None]
    for index in _spatial_chunks(points, chunk):
        block = points[index]
        hits = ((high >= block.min(0).values) & (low <= block.max(0).values)).all(dim=-1).nonzero().squeeze(-1)
        step = max(1, budget // max(1, len(block)))
        for group in hits.split(step):
            offset = block[:, None, :] - means[group][None]  # (p, g, 3)
            local = torch.einsum("pgj,gji->pgi", offset, rot[group]) * inv_scales[group][None]
            mahalanobis = local.square().sum(-1)
            weight = opacities[group][None] * torch.exp(-0.5 * mahalanobis)
            weight = torch.where(mahalanobis <= CUTOFF_SIGMA**2, weight, torch.zeros_like(weight))
            density[index] += weight.sum(-1)
            weighted[index] += weight @ colors[group]
    color = weighted / density.clamp_min(1e-12)[:, None]
    empty = density <= 0
    if empty.any():
        nearest = torch.cdist(points[empty], means).argmin(dim=-1)
        color[empty] = colors[nearest]
    return density, color


def _spatial_chunks(points: Tensor, chunk: int) -> list[Tensor]:
    """Index sets of ``chunk`` points each, sorted by a coarse voxel key so chunks are compact."""
    low, high = points.min(0).values, points.max(0).values
    cells = 16
    voxel = ((points - low) / (high - low).clamp_min(1e-12) * (cells - 1)).round().long()
    key = (voxel[:, 0] * cells + voxel[:, 1]) * cells + voxel[:, 2]
    order = torch.argsort(key, stable=True)
    return list(order.split(chunk))
