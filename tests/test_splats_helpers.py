"""Camera and scene helpers shared by the splat tests (no tests here; imported by test_splats_*.py)."""

from __future__ import annotations

import math

import pytest
import torch

from stages.scene.base import Cameras
from stages.scene.splats import SplatConfig, SplatScene


def look_at_c2w(position: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """OpenGL camera-to-world (4, 4) at ``position`` looking at ``target`` with world z up."""
    target = torch.zeros(3) if target is None else target
    forward = torch.nn.functional.normalize(target - position, dim=0)
    up = torch.tensor([0.0, 0.0, 1.0])
    if torch.linalg.cross(forward, up).norm() < 1e-6:
        up = torch.tensor([0.0, 1.0, 0.0])
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, up), dim=0)
    true_up = torch.linalg.cross(right, forward)
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, true_up, -forward, position
    return c2w


def orbit_cameras(n: int, distance: float = 2.5, elevation_deg: float = 15.0, fovy_deg: float = 40.0) -> Cameras:
    """``n`` cameras evenly spaced in azimuth around the origin."""
    azimuth = torch.arange(n, dtype=torch.float32) * (360.0 / n)
    el = math.radians(elevation_deg)
    c2w = torch.stack(
        [
            look_at_c2w(
                torch.tensor(
                    [
                        distance * math.cos(el) * math.cos(math.radians(a)),
                        distance * math.cos(el) * math.sin(math.radians(a)),
                        distance * math.sin(el),
                    ]
                )
            )
            for a in azimuth.tolist()
        ]
    )
    return Cameras(
        c2w=c2w,
        fovy=torch.full((n,), math.radians(fovy_deg)),
        elevation=torch.full((n,), elevation_deg),
        azimuth=azimuth,
        distance=torch.full((n,), distance),
    )


def single_camera(position, fovy_deg: float = 40.0) -> Cameras:
    c2w = look_at_c2w(torch.as_tensor(position, dtype=torch.float32))[None]
    return Cameras(
        c2w=c2w,
        fovy=torch.tensor([math.radians(fovy_deg)]),
        elevation=torch.zeros(1),
        azimuth=torch.zeros(1),
        distance=torch.as_tensor(position, dtype=torch.float32).norm()[None],
    )


def scene_with(
    means,
    scales,
    opacities,
    rgb,
    background=(0.0, 0.0, 0.0),
    **config_overrides,
) -> SplatScene:
    """A scene holding exactly the given Gaussians (isotropic ``scales`` (N,), identity rotations)."""
    means = torch.as_tensor(means, dtype=torch.float32).reshape(-1, 3)
    n = means.shape[0]
    cfg = SplatConfig(
        init_num_points=n,
        backend="torch",
        background_color=list(background),
        background_random_aug=False,
        **config_overrides,
    )
    scene = SplatScene(cfg, seed=0)
    with torch.no_grad():
        scene.splats["means"].copy_(means)
        scene.splats["scales"].copy_(torch.log(torch.as_tensor(scales, dtype=torch.float32)).reshape(n, 1).repeat(1, 3))
        scene.splats["quats"].copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1))
        scene.splats["opacities"].copy_(torch.logit(torch.as_tensor(opacities, dtype=torch.float32).reshape(n)))
        scene.splats["colors"].copy_(torch.logit(torch.as_tensor(rgb, dtype=torch.float32).reshape(n, 3)))
    return scene


@pytest.fixture
def one_thread():
    """Run on one intra-op thread: the tensors here are small, and on a busy machine two
    OpenMP threads spend most of their time waiting for each other at barriers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
