"""Random training cameras and fixed evaluation views (threestudio / MVDream-threestudio conventions).

World is z-up; the object sits at the origin. A camera at elevation e, azimuth a (degrees) and
distance d sits at ``d·(cos e·cos a, cos e·sin a, sin e)`` (azimuth 0 on +x, counter-clockwise
towards +y) and looks at the origin; ``c2w`` is OpenGL-style (columns right, up, −forward).

Training batches follow MVDream's ``random-multiview-camera-datamodule``: groups of ``n_view``
cameras that share elevation, distance and field of view and sit ``360/n_view`` degrees apart in
azimuth; with ``relative_distance`` the sampled distance is multiplied by ``1/tan(fovy/2)`` so the
object keeps the same size on screen whatever the field of view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from stages.scene.base import Cameras

VIEW_DIRECTIONS = ("side", "front", "back", "overhead")
"""View names of threestudio's prompt processor, lowest priority first."""


@dataclass
class CameraConfig:
    """Random camera distribution for training and the fixed evaluation views.

    Defaults are MVDream-threestudio's ``configs/mvdream-sd21.yaml``.
    """

    elevation_range: list[float] = field(default_factory=lambda: [0.0, 30.0])
    """Elevation in degrees, [low, high]."""
    azimuth_range: list[float] = field(default_factory=lambda: [-180.0, 180.0])
    """Azimuth in degrees, [low, high]; one group of views covers it evenly."""
    distance_range: list[float] = field(default_factory=lambda: [0.8, 1.0])
    """Camera distance, [low, high]; relative (× 1/tan(fovy/2)) when ``relative_distance``."""
    relative_distance: bool = True
    """Divide the sampled training distance by tan(fovy/2) so the object keeps its on-screen size
    whatever the field of view (MVDream); the evaluation cameras use ``eval_distance`` as is."""
    fovy_range: list[float] = field(default_factory=lambda: [15.0, 60.0])
    """Vertical field of view in degrees, [low, high]."""
    n_view: int = 4
    """Views per group (MVDream: 4, 90° apart). Training batches are multiples of it."""
    sphere_elevation_prob: float = 0.5
    """Probability that a batch draws elevation uniformly on the sphere instead of in degrees."""
    eval_distance: float = 3.0
    """Distance of the turntable / preview cameras."""
    eval_fovy: float = 40.0
    """Field of view (degrees) of the turntable / preview cameras."""
    eval_elevation: float = 15.0
    """Elevation (degrees) of the turntable and of the four T3Bench-like views."""

    def validate(self, prefix: str = "cameras") -> None:
        """Raise ``ValueError`` naming the key of a bad value."""
        for name, lo_min, hi_max in (
            ("elevation_range", -90.0, 90.0),
            ("azimuth_range", -360.0, 360.0),
            ("distance_range", 0.0, math.inf),
            ("fovy_range", 0.0, 180.0),
        ):
            value = list(getattr(self, name))
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f"{prefix}.{name} must be [low, high] with low <= high, got {value}")
            if value[0] < lo_min or value[1] > hi_max:
                raise ValueError(f"{prefix}.{name} must lie in [{lo_min}, {hi_max}], got {value}")
        if self.distance_range[0] <= 0:
            raise ValueError(f"{prefix}.distance_range must be > 0, got {list(self.distance_range)}")
        if self.fovy_range[0] <= 0 or self.fovy_range[1] >= 180:
            raise ValueError(f"{prefix}.fovy_range must lie in (0, 180), got {list(self.fovy_range)}")
        if self.n_view < 1:
            raise ValueError(f"{prefix}.n_view must be >= 1, got {self.n_view}")
        if not 0.0 <= self.sphere_elevation_prob <= 1.0:
            raise ValueError(f"{prefix}.sphere_elevation_prob must be in [0, 1], got {self.sphere_elevation_prob}")
        if self.eval_distance <= 0:
            raise ValueError(f"{prefix}.eval_distance must be > 0, got {self.eval_distance}")
        if not 0 < self.eval_fovy < 180:
            raise ValueError(f"{prefix}.eval_fovy must be in (0, 180), got {self.eval_fovy}")


def spherical_to_position(elevation: Tensor, azimuth: Tensor, distance: Tensor) -> Tensor:
    """(B,) degrees, degrees, distance → (B, 3) camera positions (z-up, azimuth 0 on +x)."""
    e, a = torch.deg2rad(elevation), torch.deg2rad(azimuth)
    return torch.stack(
        [distance * torch.cos(e) * torch.cos(a), distance * torch.cos(e) * torch.sin(a), distance * torch.sin(e)],
        dim=-1,
    )


def look_at(position: Tensor, center: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """(B, 3) camera positions → (B, 4, 4) OpenGL camera-to-world matrices looking at ``center``.

    Columns of the rotation are (right, up, −forward); ``up`` defaults to world +z. A camera
    straight above the object (forward parallel to ``up``) falls back to +y as its up hint.
    """
    batch = position.shape[0]
    center = torch.zeros_like(position) if center is None else center.expand_as(position)
    up_hint = position.new_tensor([0.0, 0.0, 1.0]).expand(batch, 3) if up is None else up.expand(batch, 3)
    forward = F.normalize(center - position, dim=-1)
    right = torch.linalg.cross(forward, up_hint, dim=-1)
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    alt = torch.linalg.cross(forward, position.new_tensor([0.0, 1.0, 0.0]).expand(batch, 3), dim=-1)
    right = F.normalize(torch.where(degenerate, alt, right), dim=-1)
    cam_up = F.normalize(torch.linalg.cross(right, forward, dim=-1), dim=-1)
    c2w = torch.zeros(batch, 4, 4, dtype=position.dtype, device=position.device)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = cam_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = position
    c2w[:, 3, 3] = 1.0
    return c2w


def make_cameras(elevation: Tensor, azimuth: Tensor, distance: Tensor, fovy_deg: Tensor) -> Cameras:
    """Cameras looking at the origin from the given (B,) spherical coordinates (degrees)."""
    elevation, azimuth = elevation.float(), azimuth.float()
    distance, fovy_deg = distance.float(), fovy_deg.float()
    c2w = look_at(spherical_to_position(elevation, azimuth, distance))
    return Cameras(
        c2w=c2w, fovy=torch.deg2rad(fovy_deg), elevation=elevation, azimuth=azimuth, distance=distance
    )


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def sample_cameras(generator: torch.Generator, batch: int, cfg: CameraConfig) -> Cameras:
    """A training batch of ``batch`` cameras (a multiple of ``cfg.n_view``), on the CPU.

    Each group of ``n_view`` consecutive cameras shares elevation, distance and fovy and is
    spread evenly over ``azimuth_range`` from a random start (MVDream's multi-view sampler).
    All randomness comes from ``generator``.
    """
    if batch < 1 or batch % cfg.n_view:
        raise ValueError(f"camera batch {batch} must be a positive multiple of cameras.n_view={cfg.n_view}")
    groups = batch // cfg.n_view
    elev_lo, elev_hi = cfg.elevation_range
    if float(torch.rand((), generator=generator)) < cfg.sphere_elevation_prob:
        # uniform on the sphere between the two elevations (inverse transform sampling)
        u_lo, u_hi = (math.sin(math.radians(elev_lo)) + 1) / 2, (math.sin(math.radians(elev_hi)) + 1) / 2
        elevation = torch.rad2deg(torch.asin((2 * _uniform(generator, groups, u_lo, u_hi) - 1).clamp(-1, 1)))
    else:
        elevation = _uniform(generator, groups, elev_lo, elev_hi)
    az_lo, az_hi = cfg.azimuth_range
    start = torch.rand(groups, 1, generator=generator)
    azimuth = (start + torch.arange(cfg.n_view)).reshape(-1) / cfg.n_view * (az_hi - az_lo) + az_lo
    fovy = _uniform(generator, groups, *cfg.fovy_range)
    distance = _uniform(generator, groups, *cfg.distance_range)
    if cfg.relative_distance:
        distance = distance / torch.tan(torch.deg2rad(fovy) / 2)
    per_view = lambda x: x.repeat_interleave(cfg.n_view)  # noqa: E731
    return make_cameras(per_view(elevation), azimuth, per_view(distance), per_view(fovy))


def orbit_cameras(
    n: int, elevation: float, distance: float, fovy: float, azimuth_start: float = 0.0
) -> Cameras:
    """``n`` cameras evenly spaced on a full circle (turntable), azimuth from ``azimuth_start``."""
    azimuth = azimuth_start + torch.arange(n, dtype=torch.float32) * (360.0 / n)
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return make_cameras(full(elevation), azimuth, full(distance), full(fovy))


def turntable_cameras(cfg: CameraConfig, frames: int) -> Cameras:
    """The turntable orbit: ``frames`` views at the evaluation elevation, distance and fovy."""
    return orbit_cameras(frames, cfg.eval_elevation, cfg.eval_distance, cfg.eval_fovy)


def t3bench_cameras(cfg: CameraConfig) -> Cameras:
    """The four T3Bench-like views: azimuth 0/90/180/270 at the evaluation elevation."""
    return orbit_cameras(4, cfg.eval_elevation, cfg.eval_distance, cfg.eval_fovy)


def preview_cameras(cfg: CameraConfig) -> Cameras:
    """Preview grid views (8): the four T3Bench views, then four diagonal views from 30° higher."""
    high = min(cfg.eval_elevation + 30.0, 89.0)
    diagonal = orbit_cameras(4, high, cfg.eval_distance, cfg.eval_fovy, azimuth_start=45.0)
    return concat_cameras([t3bench_cameras(cfg), diagonal])


def concat_cameras(parts: list[Cameras]) -> Cameras:
    """Concatenate camera batches along the batch dimension."""
    return Cameras(
        **{k: torch.cat([getattr(p, k) for p in parts]) for k in ("c2w", "fovy", "elevation", "azimuth", "distance")}
    )


def shift_azimuth(azimuth: Tensor) -> Tensor:
    """Azimuth in degrees wrapped into [−180, 180)."""
    return torch.remainder(azimuth + 180.0, 360.0) - 180.0


def view_directions(
    elevation: Tensor,
    azimuth: Tensor,
    front_threshold: float = 45.0,
    back_threshold: float = 45.0,
    overhead_threshold: float = 60.0,
) -> list[str]:
    """threestudio's view names per camera: ``front`` within ±front_threshold of azimuth 0,
    ``back`` within ±back_threshold of 180, ``overhead`` above overhead_threshold elevation
    (wins over the others), ``side`` otherwise."""
    azi = shift_azimuth(azimuth.float())
    names = []
    for e, a in zip(elevation.float().tolist(), azi.tolist()):
        name = "side"
        if -front_threshold < a < front_threshold:
            name = "front"
        if a > 180.0 - back_threshold or a < -180.0 + back_threshold:
            name = "back"
        if e > overhead_threshold:
            name = "overhead"
        names.append(name)
    return names


def view_prompt(prompt: str, direction: str) -> str:
    """``"<prompt>, <direction> view"`` (threestudio's view-dependent prompt suffix)."""
    if direction not in VIEW_DIRECTIONS:
        raise ValueError(f"unknown view direction {direction!r}; expected one of {VIEW_DIRECTIONS}")
    return f"{prompt}, {direction} view"
