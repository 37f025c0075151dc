"""Splats as a density/colour field: against a dense formula with the full covariance, chunking
invariance, and marching cubes of one Gaussian giving the analytic sphere."""

from __future__ import annotations

import math

import numpy as np
import torch

from stages.export.mesh import extract_mesh
from stages.scene.splats.field import CUTOFF_SIGMA, splat_field
from stages.scene.splats.rasterize_torch import quat_to_rotmat


def _gaussians(n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 1.2
    quats = torch.randn(n, 4, generator=g)
    scales = 0.03 + 0.12 * torch.rand(n, 3, generator=g)
    opacities = torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    return means, quats, scales, opacities, colors


def _dense(points, means, quats, scales, opacities, colors):
    """Every point against every Gaussian with Σ⁻¹ = (R S² Rᵀ)⁻¹ from torch.linalg.inv."""
    rot = quat_to_rotmat(quats).double()
    cov = rot @ torch.diag_embed(scales.double() ** 2) @ rot.transpose(-1, -2)
    offset = points.double()[:, None, :] - means.double()[None]
    maha = torch.einsum("pni,nij,pnj->pn", offset, torch.linalg.inv(cov), offset)
    weight = opacities.double()[None] * torch.exp(-0.5 * maha) * (maha <= CUTOFF_SIGMA**2)
    density = weight.sum(-1)
    return density, (weight @ colors.double()) / density.clamp_min(1e-300)[:, None]


def test_field_matches_the_dense_formula_and_does_not_depend_on_chunking():
    gaussians = _gaussians()
    points = (torch.rand(3000, 3, generator=torch.Generator().manual_seed(1)) - 0.5) * 1.6
    expected_density, expected_color = _dense(points, *gaussians)
    assert (expected_density > 0).float().mean() > 0.2  # the test points do meet the Gaussians
    for chunk, budget in ((2048, 1 << 22), (7, 50)):
        density, color = splat_field(points, *gaussians, chunk=chunk, budget=budget)
        assert torch.allclose(density.double(), expected_density, atol=1e-5)
        covered = expected_density > 1e-6
        assert torch.allclose(color.double()[covered], expected_color[covered], atol=1e-4)


def test_points_no_gaussian_reaches_take_the_nearest_colour():
    means = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    args = (means, torch.tensor([[1.0, 0, 0, 0]] * 2), torch.full((2, 3), 0.01), torch.ones(2), colors)
    density, color = splat_field(torch.tensor([[0.1, 0.4, 0.0], [0.95, -0.5, 0.0]]), *args)
    assert torch.equal(density, torch.zeros(2))
    assert torch.equal(color, colors)


class _OneGaussian:
    """A scene holding one isotropic Gaussian, seen through the exporter's DensityScene protocol."""

    class config:  # noqa: N801 - the protocol's attribute
        radius = 1.0

    def __init__(self, sigma: float, opacity: float) -> None:
        self.args = (torch.zeros(1, 3), torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.full((1, 3), sigma), torch.tensor([opacity]), torch.tensor([[0.2, 0.6, 0.9]]))

    def density_grid(self, resolution: int) -> torch.Tensor:
        from stages.scene.base import grid_points

        points = grid_points(1.0, resolution).reshape(-1, 3)
        return splat_field(points, *self.args)[0].reshape(resolution, resolution, resolution)

    def albedo_at(self, points: torch.Tensor) -> torch.Tensor:
        return splat_field(points, *self.args)[1]


def test_one_gaussian_meshes_to_the_analytic_sphere():
    sigma, opacity, level = 0.2, 0.9, 0.3
    verts, faces, used = extract_mesh(_OneGaussian(sigma, opacity), resolution=65, threshold=level)
    assert used == level and len(faces) > 100
    # o·exp(−r²/2σ²) = level  ⇒  r = σ·sqrt(2 ln(o / level))
    radius = sigma * math.sqrt(2.0 * math.log(opacity / level))
    distances = np.linalg.norm(verts, axis=1)
    spacing = 2.0 / 64
    assert abs(distances.mean() - radius) < spacing / 2 and distances.std() < spacing / 2
    colors = _OneGaussian(sigma, opacity).albedo_at(torch.from_numpy(verts))
    assert torch.allclose(colors, torch.tensor([0.2, 0.6, 0.9]).expand_as(colors), atol=1e-6)
