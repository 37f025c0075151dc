"""Optimising the splat scene: convergence, densify/prune through gsplat's strategy, state."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from stages.scene.splats import SplatConfig, SplatScene
from test_splats_helpers import one_thread, orbit_cameras

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


def small_config(n: int = 256, **densify) -> SplatConfig:
    cfg = SplatConfig.tiny()
    cfg.init_num_points = n
    cfg.background_random_aug = False
    for key, value in densify.items():
        setattr(cfg.densify, key, value)
    return cfg


def test_fitting_target_images_raises_psnr():
    cfg = small_config()
    cfg.densify.enabled = False
    teacher = SplatScene(cfg, seed=1).eval()
    with torch.no_grad():  # vivid colours on different point positions
        teacher.splats["colors"].copy_(2 * torch.randn(teacher.splats["colors"].shape, generator=torch.Generator().manual_seed(7)))
    cams = orbit_cameras(4, distance=1.6, elevation_deg=20)
    with torch.no_grad():
        target = teacher.render(cams, 32, 32)["rgb"]
    student = SplatScene(cfg, seed=0)
    optimizer = student.make_optimizer({"means": 2e-3, "colors": 5e-2})
    with torch.no_grad():
        start = psnr(student.render(cams, 32, 32)["rgb"], target)
    for _ in range(60):
        loss = ((student.render(cams, 32, 32)["rgb"] - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        end = psnr(student.eval().render(cams, 32, 32)["rgb"], target)
    assert end > 35.0 and end > start + 10.0, (start, end)


def test_param_groups_are_named_and_use_config_defaults():
    scene = SplatScene(small_config(16), seed=0)
    groups = {g["name"]: g for g in scene.param_groups({"means": 0.5})}
    assert set(groups) == {"means", "scales", "quats", "opacities", "colors", "background"}
    assert groups["means"]["lr"] == 0.5
    assert groups["opacities"]["lr"] == scene.config.lr.opacities
    assert all(len(g["params"]) == 1 for g in groups.values())


def densify_step(scene, optimizer, cams, step, size=24):
    out = scene.render(cams, size, size)
    scene.step_pre_backward(step, out)
    loss = ((out["rgb"] - 0.0) ** 2).mean() * 1e3  # large gradients on purpose
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()  # gsplat's order (examples/simple_trainer.py): step, then densify
    scene.step_post_backward(step, out, optimizer)
    return out


def test_densify_grows_and_keeps_optimizer_consistent():
    pytest.importorskip("gsplat")
    cfg = small_config(64, refine_start_iter=0, refine_every=2, grow_grad2d=1e-6, prune_opa=0.0)
    scene = SplatScene(cfg, seed=0)
    optimizer = scene.make_optimizer()
    cams = orbit_cameras(2)
    densify_step(scene, optimizer, cams, step=1)
    assert scene.num_gaussians == 64  # not a refine step
    densify_step(scene, optimizer, cams, step=2)
    n = scene.num_gaussians
    assert n > 64
    for group in optimizer.param_groups:
        param = group["params"][0]
        if group["name"] != "background":
            assert param is scene.splats[group["name"]]
            assert param.shape[0] == n
            state = optimizer.state[param]
            assert state["exp_avg"].shape == param.shape
    out = densify_step(scene, optimizer, cams, step=3)  # the optimiser steps on resized tensors
    assert out["means2d"].shape == (2, n, 2)


def test_densify_prunes_transparent_gaussians_and_respects_cap():
    pytest.importorskip("gsplat")
    cfg = small_config(64, refine_start_iter=0, refine_every=1, grow_grad2d=1e-6, prune_opa=0.05, max_gaussians=64)
    scene = SplatScene(cfg, seed=0)
    with torch.no_grad():
        scene.splats["opacities"][:10] = -8.0  # opacity 3e-4, below prune_opa
    optimizer = scene.make_optimizer()
    densify_step(scene, optimizer, orbit_cameras(2), step=1)
    assert scene.num_gaussians == 54  # at the cap: no growth, pruning still runs


def test_state_dict_round_trip_with_changed_count():
    pytest.importorskip("gsplat")
    cfg = small_config(64, refine_start_iter=0, refine_every=1, grow_grad2d=1e-6, prune_opa=0.0)
    cams = orbit_cameras(2)
    trained = SplatScene(cfg, seed=0)
    optimizer = trained.make_optimizer()
    densify_step(trained, optimizer, cams, step=1)
    assert trained.num_gaussians != 64
    buffer = io.BytesIO()
    torch.save({"scene": trained.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    fresh = SplatScene(cfg, seed=123)  # different N0 and generator
    fresh_optimizer = fresh.make_optimizer()  # built before loading: parameters resize in place
    fresh.load_state_dict(saved["scene"])
    fresh_optimizer.load_state_dict(saved["optimizer"])
    assert fresh.num_gaussians == trained.num_gaussians
    for name, param in trained.splats.items():
        assert torch.equal(fresh.splats[name], param)
    trained.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh.render(cams, 16, 16)["rgb"], trained.render(cams, 16, 16)["rgb"])
    # Continuing both gives identical results (generator, strategy state and Adam moments restored).
    trained.train(), fresh.train()
    densify_step(trained, optimizer, cams, step=2)
    densify_step(fresh, fresh_optimizer, cams, step=2)
    assert fresh.num_gaussians == trained.num_gaussians
    assert torch.equal(fresh.splats["means"], trained.splats["means"])


def test_init_from_point_cloud_files(tmp_path):
    from plyfile import PlyData, PlyElement

    xyz = np.array([[0.1, 0.2, 0.3], [-0.2, 0.0, 0.1], [0.0, -0.3, 0.2], [0.3, 0.3, -0.1]], dtype=np.float32)
    rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]], dtype=np.uint8)
    vertex = np.empty(4, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for i, key in enumerate("xyz"):
        vertex[key] = xyz[:, i]
    for i, key in enumerate(("red", "green", "blue")):
        vertex[key] = rgb[:, i]
    ply_path = tmp_path / "cloud.ply"
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(ply_path))
    npz_path = tmp_path / "cloud.npz"
    np.savez(npz_path, xyz=xyz, rgb=rgb.astype(np.float32) / 255.0)
    for path in (ply_path, npz_path):
        scene = SplatScene(SplatConfig(init_ply=str(path), backend="torch"), seed=0)
        g = scene.gaussians()
        assert torch.allclose(g["means"], torch.from_numpy(xyz))
        assert torch.allclose(g["rgb"], torch.from_numpy(rgb / 255.0).float(), atol=1e-3)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.ply", None, "file not found"),
        ("cloud.txt", b"1 2 3", "unsupported extension"),
        ("broken.ply", b"ply\nformat nonsense\n", "cannot read point cloud"),
        ("noxyz.npz", "points", "lacks array 'xyz'"),
    ],
)
def test_bad_point_cloud_names_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "points":
        np.savez(path, points=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=message) as err:
        SplatScene(SplatConfig(init_ply=str(path)), seed=0)
    assert name in str(err.value) and "splats.init_ply" in str(err.value)
