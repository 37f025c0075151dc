"""export_asset: every file of an asset loads back with an independent reader; bad input fails
clearly without touching files that are already there."""

from dataclasses import asdict

import imageio.v3 as iio
import numpy as np
import plyfile
import pytest
import torch
import trimesh
from PIL import Image

from stages.digest import digest
from stages.export import EmptySceneError, export_asset
from stages.optimize.checkpoint import load_scene_state
from stages.optimize.config import OptimizeConfig, load_optimize_config
from stages.scene.factory import build_scene


def _config(representation: str) -> OptimizeConfig:
    cfg = OptimizeConfig.tiny(representation)
    ex = cfg.export
    ex.preview_resolution, ex.turntable_frames, ex.turntable_resolution, ex.mesh_resolution = 16, 5, 16, 24
    cfg.nerf.renderer.num_samples_per_ray = 12
    cfg.splats.init_num_points = 200
    return cfg


@pytest.mark.parametrize("representation", ["nerf", "splats"])
def test_exported_files_load_back(tmp_path, representation):
    cfg = _config(representation)
    scene = build_scene(cfg, 0)
    reference = Image.new("RGB", (20, 12), (10, 200, 30))
    files = export_asset(scene, tmp_path, cfg, reference)
    with Image.open(tmp_path / files["preview"]) as preview:
        assert preview.mode == "RGB" and preview.size == (4 * 16, 2 * 16)  # 8 views, 2 rows of 4
    video = tmp_path / files["turntable"]
    frames = np.stack(list(iio.imiter(video)))
    assert frames.shape[:3] == (5, 16, 16)
    with Image.open(tmp_path / files["reference"]) as ref:
        assert ref.size == (20, 12) and ref.getpixel((0, 0)) == (10, 200, 30)
    state = load_scene_state(tmp_path / files["checkpoint"])
    restored = build_scene(cfg, 1)
    restored.load_state_dict(state)
    for key, value in scene.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, restored.state_dict()[key]), key
    # method.yaml rebuilds the same config (evaluation renders the asset from it).
    assert digest(asdict(load_optimize_config(tmp_path / files["method"]))) == digest(asdict(cfg))
    # both representations get a coloured mesh (splats: marching cubes on the summed Gaussians)
    mesh = trimesh.load(tmp_path / files["mesh"], force="mesh")
    assert len(mesh.vertices) > 0 and len(mesh.faces) > 0
    colours = np.asarray(mesh.visual.vertex_colors)
    assert colours.shape[0] == len(mesh.vertices) and colours.min() >= 0 and colours.max() <= 255
    assert (tmp_path / files["mesh_obj"]).is_file()
    if representation == "nerf":
        assert "splats" not in files
    else:
        ply = plyfile.PlyData.read(str(tmp_path / files["splats"]))
        vertex = ply["vertex"]
        assert vertex.count == scene.num_gaussians
        assert {"x", "y", "z", "f_dc_0", "opacity", "scale_0", "rot_0"} <= set(vertex.data.dtype.names)
        assert np.isfinite(vertex["x"]).all()
    assert set(p.name for p in tmp_path.iterdir()) == set(files.values())


def test_empty_scene_is_refused_and_existing_files_survive(tmp_path):
    cfg = _config("splats")
    scene = build_scene(cfg, 0)
    with torch.no_grad():
        scene.splats["opacities"].fill_(-30.0)  # fully transparent
    existing = tmp_path / "checkpoint.pt"
    existing.write_bytes(b"good checkpoint")
    with pytest.raises(EmptySceneError, match="empty"):
        export_asset(scene, tmp_path, cfg)
    assert existing.read_bytes() == b"good checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_bad_reference_fails_before_writing(tmp_path):
    cfg = _config("splats")
    scene = build_scene(cfg, 0)
    bad = tmp_path / "ref.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "asset"
    with pytest.raises(ValueError, match="ref.png"):
        export_asset(scene, out, cfg, bad)
    assert not out.exists()
