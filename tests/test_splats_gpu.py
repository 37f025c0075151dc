"""The torch fallback against gsplat's CUDA rasteriser on the same parameters (CUDA only)."""

from __future__ import annotations

import pytest
import torch

from stages.scene.splats import (
    SplatConfig,
    SplatScene,
    intrinsics_from_fovy,
    rasterize_gsplat,
    rasterize_torch,
    viewmats_from_c2w,
)
from test_splats_helpers import orbit_cameras

pytestmark = pytest.mark.gpu


def random_gaussians(n: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=gen) - 0.5) * 1.2
    quats = torch.randn(n, 4, generator=gen)
    scales = torch.rand(n, 3, generator=gen) * 0.06 + 0.005
    opacities = torch.rand(n, generator=gen) * 0.9 + 0.05
    colors = torch.rand(n, 3, generator=gen)
    return [t.to(device).requires_grad_(True) for t in (means, quats, scales, opacities, colors)]


def test_torch_fallback_matches_gsplat_forward_and_backward():
    pytest.importorskip("gsplat")
    device = "cuda"
    height, width = 48, 64
    cams = orbit_cameras(3, distance=2.2).to(device)
    viewmats = viewmats_from_c2w(cams.c2w)
    Ks = intrinsics_from_fovy(cams.fovy, height, width)
    results = []
    for rasterize in (rasterize_gsplat, rasterize_torch):
        params = random_gaussians(300, device)
        render, alpha, meta = rasterize(*params, viewmats, Ks, width, height)
        weight = torch.rand(render.shape, generator=torch.Generator().manual_seed(1)).to(device)
        (render * weight).sum().backward()
        results.append((render.detach(), alpha.detach(), meta, [p.grad for p in params]))
    (r_g, a_g, m_g, grads_g), (r_t, a_t, m_t, grads_t) = results
    # boxes are ceil()ed from fast-math floats on CUDA: allow off-by-one on rare Gaussians
    assert (m_g["radii"] - m_t["radii"]).abs().max() <= 1
    assert (m_g["radii"] == m_t["radii"]).float().mean() > 0.99
    both = (m_g["radii"] > 0).all(-1) & (m_t["radii"] > 0).all(-1)
    assert torch.allclose(m_g["means2d"][both], m_t["means2d"][both], atol=1e-3)
    assert torch.allclose(a_g, a_t, atol=2e-3)
    assert torch.allclose(r_g[..., :3], r_t[..., :3], atol=2e-3)
    hit = a_g[..., 0] > 0.05
    assert torch.allclose(r_g[..., 3][hit], r_t[..., 3][hit], rtol=2e-3)
    for name, g_g, g_t in zip(("means", "quats", "scales", "opacities", "colors"), grads_g, grads_t):
        rel = (g_g - g_t).norm() / g_g.norm().clamp_min(1e-12)
        assert rel < 2e-2, (name, float(rel))


def test_scene_on_gsplat_densifies_on_cuda():
    pytest.importorskip("gsplat")
    cfg = SplatConfig(init_num_points=256, backend="gsplat", background_random_aug=False)
    cfg.densify.refine_start_iter, cfg.densify.refine_every, cfg.densify.grow_grad2d = 0, 1, 1e-7
    scene = SplatScene(cfg, seed=0).cuda()
    optimizer = scene.make_optimizer()
    cams = orbit_cameras(4)
    out = scene.render(cams, 64, 64)
    assert out["rgb"].is_cuda and out["rgb"].shape == (4, 3, 64, 64)
    scene.step_pre_backward(1, out)
    (out["rgb"] ** 2).mean().mul(1e3).backward()
    scene.step_post_backward(1, out, optimizer)
    optimizer.step()
    assert scene.num_gaussians > 256
    assert scene.render(cams, 64, 64)["means2d"].shape[1] == scene.num_gaussians
