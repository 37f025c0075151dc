"""Analytic renders of toy-world objects: ray–primitive intersections, Lambertian shading.

Independent of the project's NeRF and splat code (so it can judge them), but in the same
conventions (``stages/scene/base.py``): world z-up, OpenGL camera-to-world matrices (the camera
looks along its −z, +y up in the image), rays through pixel centres with focal length
H / (2·tan(fovy/2)), renders channels-first (B, 3, H, W) in [0, 1].

Primitives (local frame; the part's rotation and position place it in the world):

=========  ======================================================  =========================
shape      ``size`` (a, b, c)                                      hit
=========  ======================================================  =========================
ellipsoid  radii (a sphere has a = b = c)                          closed form (quadratic)
box        half extents                                            closed form (slabs)
cylinder   radius a, half-height c, axis z                         closed form (side + caps)
cone       base radius a at z = −c, apex at z = +c                 closed form (side + base)
torus      major radius a, minor radius c, axis z                  sphere tracing (exact SDF)
=========  ======================================================  =========================

Shading is fixed in the world: colour · (ambient + diffuse · max(0, n·l)) under one
directional light ``l``, on a solid background. ``supersample`` renders s×s rays per pixel and
averages them (area-sampled edges, like a volume render's soft silhouettes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SHAPES = ("ellipsoid", "box", "cylinder", "cone", "torus")
TORUS_STEPS = 48
"""Sphere-tracing steps for tori (the SDF is exact, so this converges except at grazing rays)."""


@dataclass(frozen=True)
class Shading:
    """The world's fixed light: direction towards the light (world, z-up), ambient and diffuse
    strengths, background colour."""

    light_direction: tuple[float, float, float] = (0.4, -0.3, 0.87)
    ambient: float = 0.35
    diffuse: float = 0.65
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass
class PrimitiveTable:
    """Every part of K objects as tensors (P parts): ``shape`` (P,) index into :data:`SHAPES`,
    ``size`` / ``position`` / ``colour`` (P, 3), ``rotation`` (P, 3, 3) local → world,
    ``owner`` (P,) object index in [0, K)."""

    shape: Tensor
    size: Tensor
    position: Tensor
    rotation: Tensor
    colour: Tensor
    owner: Tensor
    num_objects: int

    def select(self, objects: Tensor) -> "PrimitiveTable":
        """The parts of ``objects`` (indices into this table's objects), renumbered 0..len−1."""
        objects = objects.long()
        remap = torch.full((self.num_objects,), -1, dtype=torch.long)
        remap[objects] = torch.arange(objects.numel())
        keep = remap[self.owner] >= 0
        return PrimitiveTable(
            self.shape[keep], self.size[keep], self.position[keep], self.rotation[keep], self.colour[keep],
            remap[self.owner[keep]], int(objects.numel()),
        )


def rotation_matrix(yaw: float, pitch: float, roll: float) -> Tensor:
    """Rz(yaw)·Ry(pitch)·Rx(roll) (degrees), (3, 3) float32: local → world."""
    y, p, r = (torch.deg2rad(torch.tensor(v, dtype=torch.float64)) for v in (yaw, pitch, roll))
    rz = torch.tensor([[y.cos(), -y.sin(), 0], [y.sin(), y.cos(), 0], [0, 0, 1]], dtype=torch.float64)
    ry = torch.tensor([[p.cos(), 0, p.sin()], [0, 1, 0], [-p.sin(), 0, p.cos()]], dtype=torch.float64)
    rx = torch.tensor([[1, 0, 0], [0, r.cos(), -r.sin()], [0, r.sin(), r.cos()]], dtype=torch.float64)
    return (rz @ ry @ rx).float()


def camera_rays(c2w: Tensor, fovy: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Origins and unit directions (B, H, W, 3) through pixel centres; ``c2w`` (B, 4, 4),
    ``fovy`` (B,) radians."""
    c2w = c2w.float()
    focal = 0.5 * height / torch.tan(0.5 * fovy.float())  # (B,)
    cols = (torch.arange(width, dtype=torch.float32) + 0.5 - 0.5 * width).view(1, 1, width)
    rows = (torch.arange(height, dtype=torch.float32) + 0.5 - 0.5 * height).view(1, height, 1)
    f = focal.view(-1, 1, 1)
    x = (cols / f).expand(-1, height, width)
    y = (-rows / f).expand(-1, height, width)
    local = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # (B, H, W, 3)
    dirs = F.normalize(torch.einsum("bij,bhwj->bhwi", c2w[:, :3, :3], local), dim=-1)
    return c2w[:, None, None, :3, 3].expand_as(dirs), dirs


def _safe(d: Tensor) -> Tensor:
    return torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)


# Each hit function takes M (ray, part) pairs in the part's local frame: origins o (M, 3), unit
# directions d (M, 3), sizes (M, 3); it returns the distance (M,) (inf: miss) and the local
# normal (M, 3). Cameras are always outside every part.
def _ellipsoid(o: Tensor, d: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    o2, d2 = o / size, d / size
    a = (d2 * d2).sum(-1)
    b = 2 * (o2 * d2).sum(-1)
    c = (o2 * o2).sum(-1) - 1
    disc = b * b - 4 * a * c
    t = (-b - disc.clamp_min(0).sqrt()) / (2 * a)
    t = torch.where((disc >= 0) & (t > 0), t, torch.full_like(t, torch.inf))
    p = o + t.nan_to_num(0, 0, 0)[..., None] * d
    return t, F.normalize(p / (size * size), dim=-1)


def _box(o: Tensor, d: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    inv = 1.0 / _safe(d)
    t1, t2 = (-size - o) * inv, (size - o) * inv
    near, far = torch.minimum(t1, t2), torch.maximum(t1, t2)
    t_near, axis = near.max(-1)
    t_far = far.min(-1).values
    t = torch.where((t_far >= t_near) & (t_near > 0), t_near, torch.full_like(t_near, torch.inf))
    normal = -torch.sign(_safe(d)) * F.one_hot(axis, 3).to(d)
    return t, normal


def _first_valid(candidates: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    t, which = torch.stack([c[0] for c in candidates]).min(0)  # (M,)
    normals = torch.stack([c[1] for c in candidates])  # (C, M, 3)
    return t, normals[which, torch.arange(which.shape[0])]


def _cap(o: Tensor, d: Tensor, z: Tensor, radius: Tensor, sign: float) -> tuple[Tensor, Tensor]:
    """Hit of the disc of ``radius`` at local height ``z`` with normal (0, 0, sign)."""
    t = (z - o[:, 2]) / _safe(d[:, 2])
    p = o + t.nan_to_num(0, 0, 0)[:, None] * d
    ok = (t > 0) & (p[:, 0] ** 2 + p[:, 1] ** 2 <= radius**2)
    normal = torch.zeros_like(o)
    normal[:, 2] = sign
    return torch.where(ok, t, torch.full_like(t, torch.inf)), normal


def _cylinder(o: Tensor, d: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    radius, half = size[:, 0], size[:, 2]
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = 2 * (o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1])
    c = o[:, 0] ** 2 + o[:, 1] ** 2 - radius**2
    disc = b * b - 4 * a * c
    t = (-b - disc.clamp_min(0).sqrt()) / (2 * _safe(a))
    z = o[:, 2] + t * d[:, 2]
    t = torch.where((disc >= 0) & (a > 1e-12) & (t > 0) & (z.abs() <= half), t, torch.full_like(t, torch.inf))
    p = o + t.nan_to_num(0, 0, 0)[:, None] * d
    side = (t, F.normalize(p * p.new_tensor([1.0, 1.0, 0.0]), dim=-1))
    return _first_valid([side, _cap(o, d, half, radius, 1.0), _cap(o, d, -half, radius, -1.0)])


def _cone(o: Tensor, d: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    radius, half = size[:, 0], size[:, 2]
    k2 = (radius / (2 * half)) ** 2
    apex = half - o[:, 2]  # h − o_z
    a = d[:, 0] ** 2 + d[:, 1] ** 2 - k2 * d[:, 2] ** 2
    b = 2 * (o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1] + k2 * apex * d[:, 2])
    c = o[:, 0] ** 2 + o[:, 1] ** 2 - k2 * apex**2
    disc = b * b - 4 * a * c
    root = disc.clamp_min(0).sqrt()
    linear = a.abs() < 1e-12
    candidates = []
    for sign in (-1.0, 1.0):
        t = torch.where(linear, -c / _safe(b), (-b + sign * root) / (2 * _safe(a)))
        z = o[:, 2] + t * d[:, 2]
        ok = (t > 0) & (z >= -half) & (z <= half) & ((disc >= 0) | linear)
        t = torch.where(ok, t, torch.full_like(t, torch.inf))
        p = o + t.nan_to_num(0, 0, 0)[:, None] * d
        normal = torch.stack([p[:, 0], p[:, 1], k2 * (half - p[:, 2])], dim=-1)
        candidates.append((t, F.normalize(normal, dim=-1)))
    candidates.append(_cap(o, d, -half, radius, -1.0))
    return _first_valid(candidates)


def torus_sdf(p: Tensor, major: Tensor, minor: Tensor) -> Tensor:
    """Signed distance to a torus around local z: |(|p_xy| − R, p_z)| − r."""
    ring = (p[..., 0] ** 2 + p[..., 1] ** 2).sqrt() - major
    return (ring**2 + p[..., 2] ** 2).sqrt() - minor


def _torus(o: Tensor, d: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    major, minor = size[:, 0], size[:, 2]
    bound = major + minor
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - bound**2)
    root = disc.clamp_min(0).sqrt()
    t, t_far = (-b - root).clamp_min(0), -b + root
    for _ in range(TORUS_STEPS):
        t = t + torus_sdf(o + t[:, None] * d, major, minor)
    p = o + t[:, None] * d
    hit = (disc > 0) & (torus_sdf(p, major, minor).abs() < 1e-4 * bound) & (t <= t_far)
    ring = F.normalize(p * p.new_tensor([1.0, 1.0, 0.0]), dim=-1) * major[:, None]
    return torch.where(hit, t, torch.full_like(t, torch.inf)), F.normalize(p - ring, dim=-1)


_HIT = {"ellipsoid": _ellipsoid, "box": _box, "cylinder": _cylinder, "cone": _cone, "torus": _torus}


def part_radius(table: PrimitiveTable) -> Tensor:
    """(P,) radius of a ball around each part's position that holds the part."""
    a, b, c = table.size.unbind(-1)
    radius = torch.maximum(torch.maximum(a, b), c)
    box = SHAPES.index("box")
    torus = SHAPES.index("torus")
    radius = torch.where(table.shape == box, table.size.norm(dim=-1), radius)
    return torch.where(table.shape == torus, a + c, radius)


def _pairs(table: PrimitiveTable, origins: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor]:
    """(part, ray) index pairs whose ray meets the part's bounding ball in front of the camera.

    ``origins`` (B, 3) camera centres, ``dirs`` (B, R, 3); ray r of camera b is b·R + r.
    """
    rel = origins[:, None, :] - table.position[None]  # (B, P, 3)
    b = torch.einsum("brk,bpk->brp", dirs, rel)  # (B, R, P)
    c = (rel * rel).sum(-1) - part_radius(table)[None] ** 2  # (B, P)
    near = (b < 0) & (b * b > c[:, None, :])
    cam, ray, part = near.nonzero(as_tuple=True)
    return part, cam * dirs.shape[1] + ray


def _hits(table: PrimitiveTable, origins: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Hits of every part along every ray: (part, ray, distance, world normal) for the M pairs
    that hit (``origins`` (B, 3) camera centres, ``dirs`` (B, R, 3))."""
    parts, rays = _pairs(table, origins, dirs)
    flat_dirs = dirs.reshape(-1, 3)
    ray_origin = origins.repeat_interleave(dirs.shape[1], dim=0)
    out_t, out_n = torch.full((parts.shape[0],), torch.inf), torch.zeros(parts.shape[0], 3)
    for index, name in enumerate(SHAPES):
        pick = (table.shape[parts] == index).nonzero(as_tuple=True)[0]
        if pick.numel() == 0:
            continue
        p, r = parts[pick], rays[pick]
        rot = table.rotation[p]  # (M, 3, 3) local → world
        o = torch.einsum("mji,mj->mi", rot, ray_origin[r] - table.position[p])
        d = torch.einsum("mji,mj->mi", rot, flat_dirs[r])
        t, normal = _HIT[name](o, d, table.size[p])
        out_t[pick] = t
        out_n[pick] = torch.einsum("mij,mj->mi", rot, normal)
    hit = torch.isfinite(out_t)
    return parts[hit], rays[hit], out_t[hit], out_n[hit]


@dataclass
class ObjectRenders:
    """``rgb`` (K, B, 3, H, W) in [0, 1]; ``alpha`` (K, B, 1, H, W) covered fraction of each pixel."""

    rgb: Tensor
    alpha: Tensor


def render_objects(
    table: PrimitiveTable,
    c2w: Tensor,
    fovy: Tensor,
    height: int,
    width: int,
    shading: Shading = Shading(),
    supersample: int = 1,
) -> ObjectRenders:
    """Every object of ``table`` from every camera (``c2w`` (B, 4, 4), ``fovy`` (B,) radians)."""
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    s = int(supersample)
    batch, k = c2w.shape[0], table.num_objects
    h, w = height * s, width * s
    _, dirs = camera_rays(c2w.cpu(), fovy.cpu(), h, w)
    n = batch * h * w
    parts, rays, t, normal = _hits(table, c2w[:, :3, 3].float().cpu(), dirs.reshape(batch, h * w, 3))
    owner = table.owner[parts]
    slot = owner * n + rays  # (object, ray) of each hit
    nearest = torch.full((k * n,), torch.inf).scatter_reduce(0, slot, t, "amin")
    win = t <= nearest[slot]
    slot, parts, normal = slot[win], parts[win], normal[win]
    light = F.normalize(torch.tensor(shading.light_direction, dtype=torch.float32), dim=0)
    lambert = (normal @ light).clamp_min(0)[:, None]
    colour = (table.colour[parts] * (shading.ambient + shading.diffuse * lambert)).clamp(0, 1)
    rgb = torch.tensor(shading.background, dtype=torch.float32).repeat(k * n, 1)
    alpha = torch.zeros(k * n, 1)
    rgb[slot] = colour
    alpha[slot] = 1.0
    rgb = rgb.reshape(k * batch, h, w, 3).permute(0, 3, 1, 2)
    alpha = alpha.reshape(k * batch, h, w, 1).permute(0, 3, 1, 2)
    if s > 1:
        rgb, alpha = F.avg_pool2d(rgb, s), F.avg_pool2d(alpha, s)
    return ObjectRenders(
        rgb.reshape(k, batch, 3, height, width).contiguous(), alpha.reshape(k, batch, 1, height, width).contiguous()
    )


def inside(table: PrimitiveTable, points: Tensor) -> Tensor:
    """(K, M) bool: whether each world point (M, 3) lies inside each object (union of its parts)."""
    occupied = torch.zeros(table.num_objects, points.shape[0], dtype=torch.bool)
    for p in range(table.shape.shape[0]):
        q = (points - table.position[p]) @ table.rotation[p]  # world → local
        a, _, c = table.size[p].tolist()
        name = SHAPES[int(table.shape[p])]
        if name == "ellipsoid":
            mask = ((q / table.size[p]) ** 2).sum(-1) <= 1
        elif name == "box":
            mask = (q.abs() <= table.size[p]).all(-1)
        elif name == "cylinder":
            mask = (q[:, 0] ** 2 + q[:, 1] ** 2 <= a * a) & (q[:, 2].abs() <= c)
        elif name == "cone":
            mask = (q[:, 2].abs() <= c) & (q[:, 0] ** 2 + q[:, 1] ** 2 <= (a * (c - q[:, 2]) / (2 * c)) ** 2)
        else:
            mask = torus_sdf(q, table.size[p, 0], table.size[p, 2]) <= 0
        occupied[int(table.owner[p])] |= mask
    return occupied
