"""Rendering of the splat scene: projection, closed-form alpha, compositing, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from stages.scene.base import Scene
from stages.scene.splats import SplatConfig, SplatScene, intrinsics_from_fovy, rasterize_torch, viewmats_from_c2w
from stages.scene.splats.sh import eval_sh
from test_splats_helpers import one_thread, orbit_cameras, scene_with, single_camera

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def pinhole_pixel(point, c2w, fovy, height, width):
    """Independent pinhole projection with OpenGL camera axes: (u, v) in pixels, image y down."""
    rel = torch.as_tensor(point, dtype=torch.float32) - c2w[:3, 3]
    x, y, z = (c2w[:3, :3].T @ rel).tolist()  # camera frame, looks along -z
    focal = 0.5 * height / math.tan(0.5 * fovy)
    return width / 2 + focal * x / -z, height / 2 - focal * y / -z, -z


def test_scene_implements_protocol():
    scene = SplatScene(SplatConfig.tiny(), seed=0)
    assert isinstance(scene, Scene)
    assert scene.num_gaussians == 512
    assert (scene.splats["means"].norm(dim=-1) <= 0.5 + 1e-6).all()


def test_single_gaussian_lands_on_pinhole_pixel():
    point = [0.21, -0.13, 0.17]
    cams = single_camera([2.0, 1.0, 0.6], fovy_deg=45.0)
    height, width = 40, 56
    scene = scene_with([point], [0.01], [0.99], [[1.0, 1.0, 1.0]])
    out = scene.render(cams, height, width)
    u, v, depth = pinhole_pixel(point, cams.c2w[0], cams.fovy[0].item(), height, width)
    assert out["means2d"][0, 0].tolist() == pytest.approx([u, v], abs=1e-3)
    opacity = out["opacity"][0, 0]
    row, col = divmod(int(opacity.argmax()), width)
    assert (col, row) == (int(u), int(v))
    # the expected depth at the peak pixel is the camera-space z of the point
    assert out["depth"][0, 0, row, col].item() == pytest.approx(depth, rel=1e-4)


def test_alpha_and_colour_at_centre_match_closed_form():
    distance, sigma, opacity = 2.0, 0.2, 0.8
    rgb, background = [0.9, 0.2, 0.4], [0.1, 0.3, 1.0]
    cams = single_camera([0.0, -distance, 0.0], fovy_deg=40.0)  # looks at the origin along +y
    height = width = 32
    scene = scene_with([[0.0, 0.0, 0.0]], [sigma], [opacity], [rgb], background=background)
    out = scene.render(cams, height, width)
    focal = 0.5 * height / math.tan(math.radians(20.0))
    var_px = (focal * sigma / distance) ** 2 + 0.3  # EWA on the optical axis + gsplat's dilation
    for row, col in [(16, 16), (15, 18), (20, 13)]:
        du, dv = col + 0.5 - width / 2, row + 0.5 - height / 2
        alpha = opacity * math.exp(-0.5 * (du * du + dv * dv) / var_px)
        assert out["opacity"][0, 0, row, col].item() == pytest.approx(alpha, rel=1e-4)
        expected = [c * alpha + b * (1 - alpha) for c, b in zip(rgb, background)]
        assert out["rgb"][0, :, row, col].tolist() == pytest.approx(expected, rel=1e-4)
        assert out["depth"][0, 0, row, col].item() == pytest.approx(distance, rel=1e-4)


def test_front_gaussian_is_composited_first():
    # red in front of blue on the optical axis, both semi-transparent, listed back to front
    cams = single_camera([0.0, 0.0, 3.0])
    scene = scene_with(
        [[0.0, 0.0, -0.5], [0.0, 0.0, 0.5]], [0.2, 0.2], [0.6, 0.5], [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    )
    out = scene.render(cams, 16, 16)
    proj = out["means2d"][0]
    assert torch.allclose(proj, torch.full_like(proj, 8.0), atol=1e-4)
    # Single-Gaussian renders give each one's alpha at pixel (8, 8).
    alpha_red = scene_with([[0.0, 0.0, 0.5]], [0.2], [0.5], [[1, 0, 0]]).render(cams, 16, 16)["opacity"][0, 0, 8, 8]
    alpha_blue = scene_with([[0.0, 0.0, -0.5]], [0.2], [0.6], [[0, 0, 1]]).render(cams, 16, 16)["opacity"][0, 0, 8, 8]
    red, green, blue = out["rgb"][0, :, 8, 8].tolist()
    assert red == pytest.approx(alpha_red.item(), rel=1e-4)
    assert blue == pytest.approx(alpha_blue.item() * (1 - alpha_red.item()), rel=1e-4)
    assert green == pytest.approx(0.0, abs=1e-6)
    assert out["depth"][0, 0, 8, 8].item() == pytest.approx(
        (alpha_red * 2.5 + alpha_blue * (1 - alpha_red) * 3.5).item() / out["opacity"][0, 0, 8, 8].item(), rel=1e-4
    )


def naive_composite(means2d, conics, depths, radii, opacities, colors, height, width):
    """Per-pixel loop over depth-sorted Gaussians following gsplat's CUDA kernel."""
    order = [i for i in torch.argsort(depths).tolist() if (radii[i] > 0).all()]
    image = torch.zeros(height, width, colors.shape[1])
    alpha_image = torch.zeros(height, width)
    for row in range(height):
        for col in range(width):
            px, py, transmittance = col + 0.5, row + 0.5, 1.0
            for i in order:
                dx, dy = px - means2d[i, 0].item(), py - means2d[i, 1].item()
                a, b, c = conics[i].tolist()
                sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                alpha = min(0.999, opacities[i].item() * math.exp(-sigma))
                if sigma < 0 or alpha < 1 / 255:
                    continue
                if transmittance * (1 - alpha) <= 1e-4:
                    break
                image[row, col] += alpha * transmittance * colors[i]
                transmittance *= 1 - alpha
            alpha_image[row, col] = 1 - transmittance
    return image, alpha_image


def test_tiled_rasteriser_equals_per_pixel_reference():
    gen = torch.Generator().manual_seed(3)
    n, height, width = 24, 11, 13
    means = (torch.rand(n, 3, generator=gen) - 0.5) * 0.8
    quats = torch.randn(n, 4, generator=gen)
    scales = torch.rand(n, 3, generator=gen) * 0.08 + 0.01
    opacities = torch.rand(n, generator=gen) * 0.98 + 0.01
    opacities[0] = 0.999  # exercises the 0.999 cap and early termination
    colors = torch.rand(n, 3, generator=gen)
    cams = orbit_cameras(2, distance=2.0)
    viewmats = viewmats_from_c2w(cams.c2w)
    Ks = intrinsics_from_fovy(cams.fovy, height, width)
    render, alpha, meta = rasterize_torch(means, quats, scales, opacities, colors, viewmats, Ks, width, height, tile_size=4)
    assert render.shape == (2, height, width, 4) and alpha.shape == (2, height, width, 1)
    for cam in range(2):
        image, alpha_ref = naive_composite(
            meta["means2d"][cam].detach(),
            meta["conics"][cam].detach(),
            meta["depths"][cam].detach(),
            meta["radii"][cam],
            opacities,
            colors,
            height,
            width,
        )
        assert torch.allclose(render[cam, ..., :3], image, atol=2e-5)
        assert torch.allclose(alpha[cam, ..., 0], alpha_ref, atol=2e-5)


def test_projection_matches_gsplat_torch_reference():
    gsplat_impl = pytest.importorskip("gsplat.cuda._torch_impl")
    gen = torch.Generator().manual_seed(1)
    n, height, width = 50, 30, 40
    means = (torch.rand(n, 3, generator=gen) - 0.5) * 2.0
    quats = torch.randn(n, 4, generator=gen)
    scales = torch.rand(n, 3, generator=gen) * 0.1
    cams = orbit_cameras(3, distance=1.8, fovy_deg=50)
    viewmats = viewmats_from_c2w(cams.c2w)
    Ks = intrinsics_from_fovy(cams.fovy, height, width)
    covars, _ = gsplat_impl._quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii_ref, means2d_ref, depths_ref, conics_ref, _ = gsplat_impl._fully_fused_projection(
        means, covars, viewmats, Ks, width, height
    )
    _, _, meta = rasterize_torch(means, quats, scales, torch.full((n,), 0.9), torch.rand(n, 3), viewmats, Ks, width, height)
    valid = (meta["radii"] > 0).all(-1)
    assert valid.sum() > 20
    assert ((radii_ref > 0).all(-1) | ~valid).all()  # ours culls a subset (opacity-aware boxes)
    assert torch.allclose(meta["means2d"][valid], means2d_ref[valid], atol=1e-3)
    assert torch.allclose(meta["conics"][valid], conics_ref[valid], rtol=1e-3, atol=1e-6)
    assert torch.allclose(meta["depths"][valid], depths_ref[valid], atol=1e-5)


def test_sh_matches_gsplat_torch_reference():
    gsplat_impl = pytest.importorskip("gsplat.cuda._torch_impl")
    gen = torch.Generator().manual_seed(2)
    coeffs = torch.randn(10, 16, 3, generator=gen)
    dirs = torch.randn(10, 3, generator=gen)
    for degree in range(4):
        ref = gsplat_impl._spherical_harmonics(degree, dirs, coeffs)
        assert torch.allclose(eval_sh(degree, coeffs, dirs), ref, atol=1e-5)


def test_render_shapes_ranges_and_gradients_reach_every_parameter():
    cfg = SplatConfig.tiny()
    cfg.background_random_aug = False
    scene = SplatScene(cfg, seed=0)
    with torch.no_grad():  # isotropic initial scales make rotations invisible
        scene.splats["scales"].add_(torch.randn(scene.splats["scales"].shape, generator=torch.Generator().manual_seed(0)))
    cams = orbit_cameras(2)
    out = scene.render(cams, 24, 20)
    assert out["rgb"].shape == (2, 3, 24, 20)
    assert out["opacity"].shape == (2, 1, 24, 20) and out["depth"].shape == (2, 1, 24, 20)
    assert 0 <= out["rgb"].min() and out["rgb"].max() <= 1
    assert 0 <= out["opacity"].min() and out["opacity"].max() <= 1
    assert out["opacity"].max() > 0.5
    hit = out["opacity"] > 0.5
    assert (out["depth"][hit] > 1.5).all() and (out["depth"][hit] < 3.5).all()
    regs = scene.regularizers(out)
    loss = (out["rgb"] * torch.rand_like(out["rgb"])).sum() + out["depth"].mean() + sum(regs.values())
    loss.backward()
    for name, param in list(scene.splats.items()) + [("background", scene.background)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_sh_scene_and_shading_modes_render():
    cfg = SplatConfig.tiny()
    cfg.color_mode, cfg.sh_degree, cfg.init_num_points = "sh", 1, 64
    scene = SplatScene(cfg, seed=0).eval()
    assert scene.splats["colors_rest"].shape == (64, 3, 3)
    cams = orbit_cameras(2)
    albedo = scene.render(cams, 16, 16)
    for shading in ("diffuse", "textureless"):
        out = scene.render(cams, 16, 16, shading=shading)
        assert out["normal"].shape == (2, 3, 16, 16)
        assert 0 <= out["rgb"].min() and out["rgb"].max() <= 1
        assert torch.allclose(out["opacity"], albedo["opacity"], atol=1e-6)
    with pytest.raises(ValueError, match="shading"):
        scene.render(cams, 16, 16, shading="phong")


def test_random_background_only_in_training_and_seeded():
    cfg = SplatConfig.tiny()
    cfg.init_num_points, cfg.background_random_aug_prob = 1, 1.0  # one tiny Gaussian: corners show background
    cams = orbit_cameras(1)
    renders = [SplatScene(cfg, seed=5).render(cams, 8, 8)["rgb"] for _ in range(2)]
    assert torch.equal(renders[0], renders[1])  # same seed, same random background
    corner = renders[0][0, :, 0, 0]
    assert not torch.allclose(corner, torch.ones(3))
    eval_corner = SplatScene(cfg, seed=5).eval().render(cams, 8, 8)["rgb"][0, :, 0, 0]
    assert torch.allclose(eval_corner, torch.ones(3))


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="splats.backend"):
        SplatScene(SplatConfig(backend="vulkan"), seed=0)
    with pytest.raises(ValueError, match="splats.sh_degree"):
        SplatScene(SplatConfig(sh_degree=2), seed=0)
    with pytest.raises(ValueError, match="needs the scene on CUDA"):
        SplatScene(SplatConfig(backend="gsplat", init_num_points=4), seed=0).render(orbit_cameras(1), 8, 8)


def test_rasteriser_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(5)
    n, height, width = 3, 6, 7
    means = ((torch.rand(n, 3, generator=gen) - 0.5) * 0.3).double()
    quats = torch.randn(n, 4, generator=gen).double()
    scales = (torch.rand(n, 3, generator=gen) * 0.1 + 0.15).double()
    opacities = (torch.rand(n, generator=gen) * 0.5 + 0.3).double()
    colors = torch.rand(n, 3, generator=gen).double()
    cams = single_camera([0.3, -2.0, 0.4])
    viewmats = viewmats_from_c2w(cams.c2w.double())
    Ks = intrinsics_from_fovy(cams.fovy.double(), height, width)

    def render(m, q, s, o, c):
        image, alpha, _ = rasterize_torch(m, q, s, o, c, viewmats, Ks, width, height, tile_size=4)
        return image, alpha

    inputs = tuple(t.requires_grad_(True) for t in (means, quats, scales, opacities, colors))
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)
