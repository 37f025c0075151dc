"""The Gaussians as a density field, for marching-cubes mesh export of a splat scene.

density(x) = Σᵢ oᵢ · exp(-½ (x - μᵢ)ᵀ Σᵢ⁻¹ (x - μᵢ)), colour(x) = the density-weighted mean of
the Gaussians' DC colours (DreamGaussian's mesh extraction). ``SplatScene.density_grid`` /
``albedo_at`` use these, so a splat scene is a density scene that ``stages.export.mesh`` exports.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rasterize_torch import quat_to_rotmat

CUTOFF_SIGMAS = 3.0


def precisions(quats: Tensor, scales: Tensor) -> Tensor:
    """Σ⁻¹ = R S⁻² Rᵀ (N, 3, 3)."""
    m = quat_to_rotmat(quats) / scales[..., None, :]
    return m @ m.transpose(-1, -2)


@torch.no_grad()
def density_grid(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    radius: float,
    resolution: int,
    max_half_window: int = 16,
    max_elements: int = 1 << 24,
) -> Tensor:
    """Density at the (R, R, R) grid points ``-radius + i·2·radius/(R-1)`` (index order x, y, z).

    Each Gaussian is evaluated on the voxels within 3σ of its centre (at most
    ``max_half_window`` voxels each way), so the cost is linear in the number of Gaussians.
    """
    device = means.device
    res = int(resolution)
    spacing = 2.0 * radius / (res - 1)
    grid = torch.zeros(res**3, device=device)
    prec = precisions(quats, scales)
    half = torch.ceil(CUTOFF_SIGMAS * scales.amax(dim=-1) / spacing).clamp(1, max_half_window).long()
    # Bucket the window sizes to powers of two so there are few distinct shapes.
    half = (2 ** torch.ceil(torch.log2(half.float()))).long().clamp_max(max_half_window)
    centre = torch.round((means + radius) / spacing).long()
    for w in torch.unique(half).tolist():
        members = torch.nonzero(half == w).squeeze(-1)
        r = torch.arange(-w, w + 1, device=device)
        offsets = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)  # (K, 3)
        per_chunk = max(1, max_elements // offsets.shape[0])
        for start in range(0, members.numel(), per_chunk):
            ids = members[start : start + per_chunk]
            idx = centre[ids, None, :] + offsets[None]  # (n, K, 3)
            valid = ((idx >= 0) & (idx < res)).all(dim=-1)
            delta = idx.float() * spacing - radius - means[ids, None, :]
            maha = torch.einsum("nki,nij,nkj->nk", delta, prec[ids], delta)
            value = opacities[ids, None] * torch.exp(-0.5 * maha)
            flat = (idx[..., 0] * res + idx[..., 1]) * res + idx[..., 2]
            grid.index_add_(0, flat[valid], value[valid])
    return grid.reshape(res, res, res)


@torch.no_grad()
def colors_at(
    points: Tensor,
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    rgb: Tensor,
    k: int = 16,
    chunk: int = 4096,
) -> Tensor:
    """Density-weighted mean colour (P, 3) of the ``k`` Gaussians nearest to each point (P, 3)."""
    k = min(k, means.shape[0])
    prec = precisions(quats, scales)
    out = []
    for start in range(0, points.shape[0], chunk):
        p = points[start : start + chunk].to(means)
        nearest = torch.cdist(p, means).topk(k, dim=1, largest=False).indices  # (P, k)
        delta = p[:, None, :] - means[nearest]
        maha = torch.einsum("pki,pkij,pkj->pk", delta, prec[nearest], delta)
        weight = opacities[nearest] * torch.exp(-0.5 * maha)
        nearest_only = torch.eye(k, device=p.device)[0].expand_as(weight)  # far from every Gaussian
        weight = torch.where(weight.sum(1, keepdim=True) > 1e-12, weight, nearest_only)
        out.append((weight[..., None] * rgb[nearest]).sum(1) / weight.sum(1, keepdim=True))
    return torch.cat(out) if out else points.new_zeros(0, 3)
