"""Camera sampling and fixed views against independent geometry (z-up world, OpenGL c2w)."""

import math

import pytest
import torch

from stages.scene.cameras import (
    CameraConfig,
    look_at,
    preview_cameras,
    sample_cameras,
    t3bench_cameras,
    turntable_cameras,
    view_directions,
    view_prompt,
)


def _project(c2w: torch.Tensor, fovy: torch.Tensor, point: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel (x right, y down) of a world point, by inverting c2w (independent of look_at)."""
    w2c = torch.linalg.inv(c2w)
    p = w2c[:3, :3] @ point + w2c[:3, 3]
    focal = 0.5 * size / math.tan(float(fovy) / 2)
    return torch.stack([size / 2 + focal * p[0] / -p[2], size / 2 - focal * p[1] / -p[2]])


def test_rotation_is_orthonormal_and_camera_looks_at_origin():
    cams = sample_cameras(torch.Generator().manual_seed(0), 16, CameraConfig())
    rot = cams.c2w[:, :3, :3]
    assert torch.allclose(rot.transpose(1, 2) @ rot, torch.eye(3).expand(16, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(16), atol=1e-5)
    position = cams.c2w[:, :3, 3]
    forward = -cams.c2w[:, :3, 2]
    assert torch.allclose(forward, -position / position.norm(dim=-1, keepdim=True), atol=1e-5)
    assert torch.allclose(position.norm(dim=-1), cams.distance, atol=1e-4)
    for i in range(16):  # the origin projects to the image centre
        assert torch.allclose(_project(cams.c2w[i], cams.fovy[i], torch.zeros(3), 64), torch.tensor([32.0, 32.0]), atol=1e-3)


def test_world_up_appears_up_in_the_image():
    c2w = look_at(torch.tensor([[3.0, 0.0, 0.0]]))[0]
    pixel = _project(c2w, torch.tensor(math.radians(40)), torch.tensor([0.0, 0.0, 0.5]), 64)
    assert pixel[1] < 32 - 1  # above the centre (y grows downwards)
    # azimuth 0 sits on +x; +y of the world is to the camera's right
    pixel_y = _project(c2w, torch.tensor(math.radians(40)), torch.tensor([0.0, 0.5, 0.0]), 64)
    assert pixel_y[0] > 32 + 1


def test_views_are_grouped_like_mvdream():
    cfg = CameraConfig()
    cams = sample_cameras(torch.Generator().manual_seed(1), 8, cfg)
    for g in range(2):
        sl = slice(4 * g, 4 * g + 4)
        for name in ("elevation", "distance", "fovy"):
            values = getattr(cams, name)[sl]
            assert torch.allclose(values, values[0].expand(4)), name
        steps = torch.diff(cams.azimuth[sl])
        assert torch.allclose(steps, torch.full((3,), 90.0), atol=1e-4)
    assert ((cams.elevation >= 0) & (cams.elevation <= 30 + 1e-4)).all()
    fovy_deg = torch.rad2deg(cams.fovy)
    assert ((fovy_deg >= 15 - 1e-4) & (fovy_deg <= 60 + 1e-4)).all()
    relative = cams.distance * torch.tan(cams.fovy / 2)
    assert ((relative >= 0.8 - 1e-5) & (relative <= 1.0 + 1e-5)).all()


def test_sampling_is_deterministic_for_a_generator_and_covers_the_ranges():
    cfg = CameraConfig()
    a = sample_cameras(torch.Generator().manual_seed(5), 4, cfg)
    b = sample_cameras(torch.Generator().manual_seed(5), 4, cfg)
    c = sample_cameras(torch.Generator().manual_seed(6), 4, cfg)
    assert torch.equal(a.c2w, b.c2w) and not torch.equal(a.c2w, c.c2w)
    gen = torch.Generator().manual_seed(0)
    many = [sample_cameras(gen, 4, cfg) for _ in range(200)]
    elevation = torch.cat([m.elevation for m in many])
    assert elevation.min() < 3 and elevation.max() > 27
    azimuth = torch.cat([m.azimuth for m in many])
    assert azimuth.min() < -170 and azimuth.max() > 170


def test_absolute_distance_and_bad_batch():
    cfg = CameraConfig(relative_distance=False, distance_range=[2.0, 2.5])
    cams = sample_cameras(torch.Generator().manual_seed(0), 4, cfg)
    assert ((cams.distance >= 2.0) & (cams.distance <= 2.5)).all()
    with pytest.raises(ValueError, match="n_view"):
        sample_cameras(torch.Generator(), 6, cfg)


@pytest.mark.parametrize(
    "elevation, azimuth, expected",
    [(0, 0, "front"), (10, 44, "front"), (10, -44, "front"), (10, 46, "side"), (0, 90, "side"),
     (0, 180, "back"), (0, -170, "back"), (0, 136, "back"), (0, 400, "front"), (70, 0, "overhead"), (70, 180, "overhead")],
)
def test_view_directions_follow_threestudio(elevation, azimuth, expected):
    assert view_directions(torch.tensor([float(elevation)]), torch.tensor([float(azimuth)])) == [expected]


def test_view_prompt():
    assert view_prompt("a cat", "back") == "a cat, back view"
    with pytest.raises(ValueError, match="diagonal"):
        view_prompt("a cat", "diagonal")


def test_fixed_views():
    cfg = CameraConfig(eval_elevation=15.0, eval_distance=3.0, eval_fovy=40.0)
    t3 = t3bench_cameras(cfg)
    assert t3.azimuth.tolist() == [0.0, 90.0, 180.0, 270.0]
    assert torch.allclose(t3.elevation, torch.full((4,), 15.0))
    expected = torch.tensor([3 * math.cos(math.radians(15)), 0.0, 3 * math.sin(math.radians(15))])
    assert torch.allclose(t3.c2w[0, :3, 3], expected, atol=1e-5)
    preview = preview_cameras(cfg)
    assert len(preview) == 8 and torch.equal(preview.c2w[:4], t3.c2w)
    turn = turntable_cameras(cfg, 12)
    assert len(turn) == 12 and torch.allclose(torch.diff(turn.azimuth), torch.full((11,), 30.0))


@pytest.mark.parametrize(
    "overrides, key",
    [(dict(elevation_range=[30.0, 0.0]), "elevation_range"), (dict(fovy_range=[0.0, 60.0]), "fovy_range"),
     (dict(n_view=0), "n_view"), (dict(distance_range=[-1.0, 1.0]), "distance_range")],
)
def test_config_validation_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=f"cameras.{key}"):
        CameraConfig(**overrides).validate()
