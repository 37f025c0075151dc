"""Splats as a density/colour field (mesh export): the windowed grid evaluation against a dense
formula with the full covariance, for rotated anisotropic Gaussians."""

from __future__ import annotations


import torch

from stages.scene.base import grid_points
from stages.scene.splats.density import CUTOFF_SIGMAS, colors_at, density_grid
from stages.scene.splats.rasterize_torch import quat_to_rotmat


def _gaussians(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 1.0
    quats = torch.randn(n, 4, generator=g)
    scales = torch.stack([torch.full((n,), 0.04), torch.full((n,), 0.08), torch.full((n,), 0.15)], dim=1)
    opacities = 0.3 + 0.7 * torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    return means, quats, scales, opacities, colors


def _dense(points, means, quats, scales, opacities):
    """Every point against every Gaussian, Σ⁻¹ = (R S² Rᵀ)⁻¹ by torch.linalg.inv; (P, N) weights."""
    rot = quat_to_rotmat(quats).double()
    cov = rot @ torch.diag_embed(scales.double() ** 2) @ rot.transpose(-1, -2)
    offset = points.double()[:, None, :] - means.double()[None]
    maha = torch.einsum("pni,nij,pnj->pn", offset, torch.linalg.inv(cov), offset)
    return opacities.double()[None] * torch.exp(-0.5 * maha)


def test_density_grid_matches_the_dense_formula_up_to_the_cut_tails():
    means, quats, scales, opacities, _ = _gaussians()
    resolution = 41
    grid = density_grid(means, quats, scales, opacities, radius=1.0, resolution=resolution)
    dense = _dense(grid_points(1.0, resolution).reshape(-1, 3), means, quats, scales, opacities).sum(-1)
    assert grid.shape == (resolution,) * 3 and float(dense.max()) > 0.5
    # each Gaussian is evaluated in a voxel box around its rounded centre reaching ≥ 3σ_max, so a
    # point outside it is ≥ 3σ_max − spacing/2 away along an axis: Mahalanobis ≥ that² / σ_max²
    spacing, sigma_max = 2.0 / (resolution - 1), scales.amax(dim=-1)
    reach = (CUTOFF_SIGMAS * sigma_max - spacing / 2) / sigma_max
    tails = float((opacities * torch.exp(-0.5 * reach**2)).sum())
    assert tails < 0.1 * float(dense.max())
    assert float((grid.reshape(-1).double() - dense).abs().max()) <= tails


def test_colours_are_the_density_weighted_mean_of_nearby_gaussians():
    means, quats, scales, opacities, colors = _gaussians()
    points = means + 0.02  # near the Gaussians
    weights = _dense(points, means, quats, scales, opacities)
    expected = (weights @ colors.double()) / weights.sum(-1, keepdim=True)
    assert torch.allclose(colors_at(points, means, quats, scales, opacities, colors).double(), expected, atol=1e-4)
    # far from every Gaussian: the nearest one's colour
    far = torch.tensor([[5.0, 5.0, 5.0]])
    nearest = int((means - far).norm(dim=-1).argmin())
    assert torch.allclose(colors_at(far, means, quats, scales, opacities, colors), colors[nearest][None])
