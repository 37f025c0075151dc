"""NeRF → mesh export: files load back with trimesh, geometry matches a known sphere."""

import math

import numpy as np
import pytest
import torch
import trimesh

from stages.export.mesh import export_mesh, extract_mesh
from stages.scene.nerf import NeRFConfig, NeRFScene


def sphere_scene() -> NeRFScene:
    """Zero density MLP output: density = softplus(10 (1 − |x| / 0.5)) exactly (the blob)."""
    scene = NeRFScene(NeRFConfig.tiny(), seed=0)
    with torch.no_grad():
        scene.field.density_network[-1].weight.zero_()
    return scene.eval()


def blob_radius(threshold: float, scale: float = 10.0, std: float = 0.5) -> float:
    """|x| where softplus(scale (1 − |x|/std)) = threshold (independent closed form)."""
    return std * (1.0 - math.log(math.expm1(threshold)) / scale)


def test_sphere_density_gives_a_sphere_mesh_that_loads_back(tmp_path):
    scene = sphere_scene()
    files = export_mesh(scene, tmp_path, resolution=32, threshold=1.0)
    assert set(files) == {"glb", "obj", "mtl"} and all(p.exists() for p in files.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh.glb", "mesh.mtl", "mesh.obj"]

    glb = trimesh.load(files["glb"], force="mesh")
    assert len(glb.vertices) > 100 and len(glb.faces) > 100
    colors = np.asarray(glb.visual.vertex_colors)
    assert colors.shape == (len(glb.vertices), 4) and colors.min() >= 0 and colors.max() <= 255
    assert np.abs(glb.vertices).max() <= scene.config.radius + 1e-6
    radius = blob_radius(1.0)
    voxel = 2.0 / 31
    assert np.abs(np.linalg.norm(glb.vertices, axis=1) - radius).max() < voxel
    assert glb.is_watertight and glb.volume > 0  # closed, outward winding
    assert glb.volume == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.1)
    # colours are the albedo field at the vertices (z-up → y-up rotation undone)
    z_up = np.stack([glb.vertices[:, 0], -glb.vertices[:, 2], glb.vertices[:, 1]], axis=1)
    albedo = scene.albedo_at(torch.from_numpy(z_up).float()).numpy()
    assert np.abs(colors[:, :3] / 255.0 - albedo).max() < 1.0 / 255 + 1e-6

    obj = trimesh.load(files["obj"], force="mesh", process=False)
    assert len(obj.vertices) == len(glb.vertices) and len(obj.faces) == len(glb.faces)
    assert "mtllib mesh.mtl" in files["obj"].read_text()[:200]
    assert "newmtl" in files["mtl"].read_text()


def test_decimation_reduces_faces_to_the_budget(tmp_path):
    scene = sphere_scene()
    full = trimesh.load(export_mesh(scene, tmp_path / "full", resolution=32, threshold=1.0)["glb"], force="mesh")
    small = trimesh.load(
        export_mesh(scene, tmp_path / "small", resolution=32, threshold=1.0, target_faces=300)["glb"], force="mesh"
    )
    assert len(small.faces) <= 330 < len(full.faces)
    assert np.abs(np.linalg.norm(small.vertices, axis=1) - blob_radius(1.0)).max() < 0.05


def test_empty_scene_raises_and_writes_nothing(tmp_path):
    out = tmp_path / "asset"
    with pytest.raises(ValueError, match=r"empty.*threshold 1e\+06.*lower export.threshold"):
        export_mesh(sphere_scene(), out, resolution=16, threshold=1e6)
    assert not out.exists() or not any(out.iterdir())


def test_auto_threshold_and_bad_threshold():
    verts, faces, level = extract_mesh(sphere_scene(), resolution=24, threshold="auto")
    assert len(faces) > 0 and level > 0
    with pytest.raises(ValueError, match="export.threshold"):
        extract_mesh(sphere_scene(), resolution=24, threshold="median")
