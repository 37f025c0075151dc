"""Deferred back-propagation of renders: the same optimisation as direct back-propagation.

Direct: one render with its whole graph, ``(rgb · grad).sum() + regularisers`` backward.
Deferred: render without autograd, ask the guidance, then render again chunk by chunk with
autograd and back-propagate each chunk at once. Both read one render plan per iteration, so
parameters after several iterations (densification and resume included) agree to float
rounding. The guidance is the image-target one, so its gradient depends on the render.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from stages.guidance.image_target import ImageTargetGuidance, SphereTarget
from stages.guidance.set import GuidanceSet
from stages.optimize.checkpoint import load_checkpoint
from stages.optimize.config import OptimizeConfig
from stages.optimize.loop import optimize_asset
from stages.scene.base import DeferredScene, image_rows
from stages.scene.nerf import NeRFConfig, NeRFScene
from stages.scene.nerf.renderer import camera_rays, plan_samples, sample_jitter, sphere_bounds
from test_splats_helpers import orbit_cameras

REFERENCE = Image.new("RGB", (8, 8), (200, 30, 30))


def _config(representation: str, backprop: str, iterations: int = 3, **keys) -> OptimizeConfig:
    cfg = OptimizeConfig.tiny(representation)
    cfg.iterations = iterations
    cfg.checkpoint_every = 0
    cfg.schedule.resolutions = [8, 12]
    cfg.backprop = backprop
    # Adam's eps keeps updates continuous in the gradient: with eps ≈ 0 an entry whose gradient
    # cancels to ~1e-12 moves by ±lr on rounding noise alone, in either mode.
    cfg.optimizer.eps = 1e-4
    if representation == "nerf":
        cfg.nerf.renderer.chunk_samples = 300  # many chunks per render
    for key, value in keys.items():
        target = cfg
        *path, last = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)
    return cfg


def _run(cfg: OptimizeConfig, work: Path, callback=None):
    target = ImageTargetGuidance(SphereTarget(0.5))
    return optimize_asset(cfg, GuidanceSet(ip=target, mvd=target), REFERENCE, 3, work, "a ball", "asset", callback)


def _assert_same_scene(a: torch.nn.Module, b: torch.nn.Module, atol: float) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert value.shape == sb[key].shape, key
            torch.testing.assert_close(sb[key], value, atol=atol, rtol=0, msg=key)


def test_nerf_deferred_equals_direct(tmp_path):
    regs = {"regularizers": {"sparsity": 0.1, "opaque": 0.1}}
    direct = _run(_config("nerf", "direct", **regs), tmp_path / "direct")
    deferred = _run(_config("nerf", "deferred", **regs), tmp_path / "deferred")
    _assert_same_scene(direct.scene, deferred.scene, atol=1e-6)
    for key in ("loss_reg", "reg_sparsity", "grad_norm_rgb", "opacity_mean"):
        assert [h[key] for h in deferred.history] == pytest.approx([h[key] for h in direct.history], rel=1e-5), key


def test_nerf_deferred_keeps_every_regulariser_with_normals(tmp_path):
    """``normal_smooth`` couples neighbouring pixels of different chunks and ``orient`` sums over
    samples: both are differentiated on the whole render and reach the chunks as dR/dmap."""
    keys = {
        "shading.albedo": 0.0, "shading.diffuse": 1.0, "nerf.shading.compute_normals": True,
        "regularizers": {"orient": 1.0, "normal_smooth": 1.0, "sparsity": 0.1},
    }
    direct = _run(_config("nerf", "direct", iterations=2, **keys), tmp_path / "direct")
    deferred = _run(_config("nerf", "deferred", iterations=2, **keys), tmp_path / "deferred")
    assert deferred.history[0]["reg_normal_smooth"] > 0 and deferred.history[0]["reg_orient"] > 0
    _assert_same_scene(direct.scene, deferred.scene, atol=1e-6)
    for key in ("reg_orient", "reg_normal_smooth"):
        assert [h[key] for h in deferred.history] == pytest.approx([h[key] for h in direct.history], rel=1e-5)


def test_splats_deferred_equals_direct_through_densification(tmp_path):
    pytest.importorskip("gsplat")
    keys = {
        "splats.init_num_points": 64, "splats.densify.refine_start_iter": 1, "splats.densify.refine_every": 2,
        "splats.densify.grow_grad2d": 1e-6, "regularizers": {"sparsity": 0.1, "opacity": 0.1},
    }
    direct = _run(_config("splats", "direct", iterations=6, **keys), tmp_path / "direct")
    deferred = _run(_config("splats", "deferred", iterations=6, **keys), tmp_path / "deferred")
    assert deferred.scene.num_gaussians > 64  # it densified, twice
    _assert_same_scene(direct.scene, deferred.scene, atol=1e-4)


class Kill(Exception):
    pass


def test_deferred_resume_equals_uninterrupted_and_direct(tmp_path):
    cfg = _config("nerf", "deferred", iterations=6, regularizers={"sparsity": 0.1})
    cfg.checkpoint_every = 2
    full = _run(cfg, tmp_path / "full")

    def kill_at_4(step, metrics, previews):
        if step == 4:
            raise Kill()

    with pytest.raises(Kill):
        _run(cfg, tmp_path / "killed", kill_at_4)
    assert load_checkpoint(tmp_path / "killed")["iteration"] == 4
    resumed = _run(cfg, tmp_path / "killed")
    assert resumed.resumed_from == 4
    _assert_same_scene(full.scene, resumed.scene, atol=0.0)
    # the mode is a runtime key: a direct run may resume a deferred checkpoint
    direct_cfg = _config("nerf", "direct", iterations=6, regularizers={"sparsity": 0.1})
    direct_cfg.checkpoint_every = 2
    with pytest.raises(Kill):
        _run(cfg, tmp_path / "mixed", kill_at_4)
    mixed = _run(direct_cfg, tmp_path / "mixed")
    _assert_same_scene(full.scene, mixed.scene, atol=1e-6)


@pytest.mark.parametrize("representation", ["nerf", "splats"])
def test_chunks_recompute_the_planned_render(representation):
    """The chunks of a training render (random background, jitter, lights) are the render."""
    from stages.scene.factory import build_scene

    cfg = OptimizeConfig.tiny(representation)
    cfg.nerf.renderer.chunk_samples = 200
    cfg.nerf.background.random_aug_prob = 1.0
    cfg.splats.background_random_aug_prob = 1.0
    scene = build_scene(cfg, seed=1).train()
    assert isinstance(scene, DeferredScene)
    plan = scene.plan_render(orbit_cameras(3), 10, 12, shading="diffuse")
    with torch.no_grad():
        out = scene.render_planned(plan)
    chunks = list(scene.render_chunks(plan, out, step=0))
    assert len(chunks) >= 3
    assert [c.start for c in chunks] == [0] + [c.stop for c in chunks[:-1]] and chunks[-1].stop == 3 * 10 * 12
    for key in plan.map_keys:
        rows = torch.cat([c.maps[key].detach() for c in chunks])
        torch.testing.assert_close(rows, image_rows(out[key]), atol=1e-6, rtol=1e-5, msg=key)
    for key in plan.sum_keys:
        torch.testing.assert_close(sum(c.sums[key].detach() for c in chunks), out[key], rtol=1e-5, atol=0)
    assert not torch.equal(out["rgb"][:, :, 0, 0], torch.ones(3, 3))  # the random background was drawn


def test_deferred_needs_a_scene_that_renders_in_chunks(tmp_path):
    from test_optimize_loop import ColourScene, Recorder

    cfg = _config("nerf", "deferred", iterations=1)
    with pytest.raises(ValueError, match="method.backprop"):
        optimize_asset(cfg, GuidanceSet(ip=Recorder(), mvd=Recorder()), REFERENCE, 0, tmp_path, "x", "a", scene=ColourScene())
    cfg.backprop = "auto"  # falls back to direct
    result = optimize_asset(cfg, GuidanceSet(ip=Recorder(), mvd=Recorder()), REFERENCE, 0, tmp_path / "b", "x", "a", scene=ColourScene())
    assert result.iterations == 1


def test_sample_jitter_is_uniform_deterministic_and_seeded():
    ids = torch.arange(200_000)
    u = sample_jitter(ids, seed=7)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    histogram = torch.histc(u, bins=10, min=0.0, max=1.0) / len(u)
    assert float((histogram - 0.1).abs().max()) < 0.005
    assert torch.equal(u, sample_jitter(ids, seed=7)) and not torch.equal(u, sample_jitter(ids, seed=8))
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01  # neighbours uncorrelated


def test_plan_packs_the_kept_samples_in_bounded_chunks():
    scene = NeRFScene(NeRFConfig.tiny(), seed=0)
    cams = orbit_cameras(2)
    origins, dirs = (v.reshape(-1, 3) for v in camera_rays(cams, 9, 11))
    near, far, hit = sphere_bounds(origins, dirs, 1.0)
    s = scene.config.renderer.num_samples_per_ray
    plan = plan_samples(origins, dirs, near, far, hit, n_samples=s, seed=5, occupancy=scene.occupancy,
                        radius=1.0, chunk_samples=100, block_samples=7 * s)
    # independent dense reference: every candidate's position against the grid
    ids = torch.arange(origins.shape[0] * s).reshape(-1, s)
    bins = ids % s
    t = near[:, None] + (bins + sample_jitter(ids, 5)) * ((far - near) / s)[:, None]
    points = origins[:, None] + dirs[:, None] * t[..., None]
    cell = ((points + 1.0) / 2.0 * 32).long().clamp(0, 31)
    keep = scene.occupancy[cell[..., 0], cell[..., 1], cell[..., 2]] & hit[:, None]
    kept_ray, kept_bin = keep.nonzero(as_tuple=True)
    assert torch.equal(plan.ray.long(), kept_ray) and torch.equal(plan.t, t[kept_ray, kept_bin])
    assert 0 < plan.n_kept < keep.numel()
    counts = keep.sum(1)
    assert torch.equal(plan.first, torch.cumsum(counts, 0) - counts)
    rays = [c[:2] for c in plan.chunks]
    assert rays[0][0] == 0 and rays[-1][1] == origins.shape[0]
    assert all(a[1] == b[0] for a, b in zip(rays, rays[1:]))
    for r0, r1, s0, s1 in plan.chunks:
        assert s1 - s0 == int(counts[r0:r1].sum()) and s1 - s0 <= max(100, s)
    assert len(plan.chunks) >= plan.n_kept // 100


def test_splat_chunks_give_the_strategy_the_screen_gradients_of_one_render():
    """gsplat's densification reads the projected means' gradient of the whole render: the
    chunks' retained gradients, concatenated, are exactly that (and the radii match)."""
    pytest.importorskip("gsplat")
    from stages.scene.factory import build_scene

    cfg = OptimizeConfig.tiny("splats")
    cfg.splats.init_num_points = 64
    cfg.splats.chunk_views = 1
    scene = build_scene(cfg, seed=2).train()
    weight = torch.rand(3, 3, 10, 12, generator=torch.Generator().manual_seed(0))

    plan = scene.plan_render(orbit_cameras(3), 10, 12)
    direct = scene.render_planned(plan)
    scene.step_pre_backward(0, direct)
    (direct["rgb"] * weight).sum().backward()
    scene.zero_grad(set_to_none=True)

    with torch.no_grad():
        first = scene.render_planned(plan)
    rows = image_rows(weight)
    for chunk in scene.render_chunks(plan, first, step=0):
        (chunk.maps["rgb"] * rows[chunk.start : chunk.stop]).sum().backward()
    assert first["means2d"].shape == direct["means2d"].shape == (3, 64, 2)
    scale = float(direct["means2d"].grad.abs().max())
    assert scale > 0
    torch.testing.assert_close(first["means2d"].grad, direct["means2d"].grad, rtol=1e-4, atol=1e-5 * scale)
    assert torch.equal(first["radii"], direct["radii"])
