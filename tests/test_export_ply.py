"""3DGS-layout PLY export, read back with plyfile (an independent reader)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from plyfile import PlyData

from stages.export.ply import export_splats_ply, load_splats_ply
from stages.scene.splats import SplatConfig, SplatScene

C0 = 0.28209479177387814
HEAD = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
TAIL = ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


def randomised_scene(**overrides) -> SplatScene:
    cfg = SplatConfig(init_num_points=37, backend="torch", **overrides)
    scene = SplatScene(cfg, seed=0)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in scene.splats.values():
            param.add_(torch.randn(param.shape, generator=gen))
    return scene


def test_ply_layout_and_values_follow_the_3dgs_convention(tmp_path):
    scene = randomised_scene()
    path = export_splats_ply(scene, tmp_path / "out" / "splats.ply")
    assert path.read_bytes().startswith(b"ply\nformat binary_little_endian 1.0\n")
    ply = PlyData.read(str(path))
    vertex = ply["vertex"]
    names = [p.name for p in vertex.properties]
    assert names == HEAD + [f"f_rest_{i}" for i in range(45)] + TAIL  # padded to SH degree 3
    assert all(vertex.data.dtype[name] == np.dtype("<f4") for name in names)
    assert vertex.count == 37

    def column(*keys):
        return torch.from_numpy(np.stack([vertex[k] for k in keys], axis=-1).astype(np.float32))

    p = scene.splats
    assert torch.allclose(column("x", "y", "z"), p["means"])
    assert torch.equal(column("nx", "ny", "nz"), torch.zeros(37, 3))
    rgb = torch.sigmoid(p["colors"])
    assert torch.allclose(column("f_dc_0", "f_dc_1", "f_dc_2"), (rgb - 0.5) / C0, atol=1e-5)
    assert torch.equal(column(*[f"f_rest_{i}" for i in range(45)]), torch.zeros(37, 45))
    assert torch.allclose(column("opacity")[:, 0], p["opacities"])
    assert torch.allclose(column("scale_0", "scale_1", "scale_2"), p["scales"])
    quats = p["quats"] / p["quats"].norm(dim=-1, keepdim=True)
    assert torch.allclose(column("rot_0", "rot_1", "rot_2", "rot_3"), quats, atol=1e-6)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # atomic write leaves no temporary file


def test_sh_coefficients_are_written_channel_major(tmp_path):
    scene = randomised_scene(color_mode="sh", sh_degree=1)
    rest = scene.splats["colors_rest"].detach()  # (N, 3 bases, 3 channels)
    path = export_splats_ply(scene, tmp_path / "sh.ply", pad_sh_degree=None)
    vertex = PlyData.read(str(path))["vertex"]
    assert sum(p.name.startswith("f_rest_") for p in vertex.properties) == 9
    for channel in range(3):
        for basis in range(3):
            written = torch.from_numpy(np.asarray(vertex[f"f_rest_{channel * 3 + basis}"], dtype=np.float32))
            assert torch.allclose(written, rest[:, basis, channel])
    dc = torch.from_numpy(np.asarray(vertex["f_dc_1"], dtype=np.float32))
    assert torch.allclose(dc, scene.splats["colors"][:, 0, 1].detach())


def test_load_round_trip_and_overwrite(tmp_path):
    scene = randomised_scene()
    path = tmp_path / "splats.ply"
    path.write_bytes(b"old content")
    export_splats_ply(scene, path)
    loaded = load_splats_ply(path)
    expected = scene.to_ply_dict()
    assert loaded["sh_degree"] == 3
    for key in ("means", "f_dc", "opacities", "scales", "quats"):
        assert torch.allclose(loaded[key], expected[key]), key


def test_empty_scene_and_bad_files_raise(tmp_path):
    scene = randomised_scene()
    with torch.no_grad():
        scene.load_state_dict({**scene.state_dict(), **{f"splats.{k}": v[:0] for k, v in scene.splats.items()}})
    target = tmp_path / "empty.ply"
    with pytest.raises(ValueError, match="no Gaussians"):
        export_splats_ply(scene, target)
    assert not target.exists() and not list(tmp_path.iterdir())
    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"not a ply")
    with pytest.raises(ValueError, match="bad.ply"):
        load_splats_ply(bad)


def test_splat_mesh_of_one_gaussian_is_its_iso_sphere(tmp_path):
    import trimesh

    from stages.export.mesh import export_mesh

    sigma, opacity, threshold = 0.2, 0.9, 0.3
    scene = SplatScene(SplatConfig(init_num_points=1, backend="torch"), seed=0)
    with torch.no_grad():
        scene.splats["means"].copy_(torch.tensor([[0.1, -0.2, 0.05]]))
        scene.splats["scales"].fill_(np.log(sigma))
        scene.splats["opacities"].fill_(float(np.log(opacity / (1 - opacity))))
        scene.splats["colors"].copy_(torch.logit(torch.tensor([[0.8, 0.3, 0.1]])))
    files = export_mesh(scene, tmp_path, resolution=64, threshold=threshold)  # a splat scene is a density scene
    mesh = trimesh.load(files["glb"], force="mesh")
    # glb is y-up: (x, y, z) -> (x, z, -y)
    verts = np.asarray(mesh.vertices) @ np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=np.float64)
    distance = np.linalg.norm(verts - np.array([0.1, -0.2, 0.05]), axis=1)
    expected = sigma * np.sqrt(2 * np.log(opacity / threshold))  # o·exp(-r²/2σ²) = threshold
    assert len(verts) > 100
    assert np.abs(distance - expected).max() < 2 * (2.0 / 63)  # within two voxels
    colors = np.asarray(mesh.visual.vertex_colors)[:, :3]
    assert np.abs(colors.astype(int) - [204, 77, 26]).max() <= 2
