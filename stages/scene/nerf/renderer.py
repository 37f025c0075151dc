"""Volume rendering of a ``NeRFField``: camera rays, ray/sphere bounds, stratified samples,
occupancy-grid pruning, packed alpha compositing (pure torch; any device).

A render is planned once (:func:`plan_samples`: which samples survive the occupancy grid, in
chunks bounded by a sample budget) and then marched chunk by chunk (:func:`march_chunk`); the
two steps need one device-to-host transfer per render, whatever the number of chunks, and a
chunk can be marched again with autograd to the same values (deferred back-propagation)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

from ..base import Cameras


def camera_rays(cameras: Cameras, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Origins and unit directions (B, H, W, 3) through pixel centres (OpenGL cameras: look
    along −z, +y up; focal = H / (2 tan(fovy / 2)), as threestudio's ``get_ray_directions``)."""
    c2w = cameras.c2w.float()
    device = c2w.device
    focal = 0.5 * height / torch.tan(0.5 * cameras.fovy.float().to(device))  # (B,)
    j = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    i = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    ii, jj = torch.meshgrid(i, j, indexing="ij")  # (H, W)
    dirs_cam = torch.stack(
        [
            (jj - 0.5 * width)[None] / focal[:, None, None],
            -(ii - 0.5 * height)[None] / focal[:, None, None],
            -torch.ones_like(ii)[None].expand(len(cameras), -1, -1),
        ],
        dim=-1,
    )  # (B, H, W, 3)
    dirs = torch.einsum("bij,bhwj->bhwi", c2w[:, :3, :3], dirs_cam)
    origins = c2w[:, None, None, :3, 3].expand_as(dirs)
    return origins, F.normalize(dirs, dim=-1)


def sphere_bounds(origins: Tensor, dirs: Tensor, radius: float) -> tuple[Tensor, Tensor, Tensor]:
    """Near/far distances (N,) where unit rays (N, 3) cross the ball, and a hit mask (N,)."""
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - radius * radius
    disc = b * b - c
    root = torch.sqrt(disc.clamp_min(0.0))
    near = (-b - root).clamp_min(0.0)
    far = -b + root
    hit = (disc > 0) & (far > near)
    return near, far, hit


def grid_cells(points: Tensor, radius: float, resolution: int) -> Tensor:
    """Flat occupancy-grid cell index (...,) of world points (..., 3) in [-r, r]³."""
    cell = ((points + radius) / (2.0 * radius) * resolution).long().clamp(0, resolution - 1)
    return (cell[..., 0] * resolution + cell[..., 1]) * resolution + cell[..., 2]


def shade(
    albedo: Tensor, normal: Tensor | None, light_dirs: Tensor | None, shading: str, ambient: Tensor, diffuse: Tensor
) -> Tensor:
    """Sample colours (m, 3): ``albedo``; ``textureless`` = ambient + diffuse·max(0, n·l);
    ``diffuse`` = albedo.clamp(0, 1) · textureless (threestudio's point-light material)."""
    if shading == "albedo":
        return albedo
    assert normal is not None and light_dirs is not None
    lambert = (normal * light_dirs).sum(-1, keepdim=True).clamp_min(0.0)
    textureless = lambert * diffuse + ambient
    if shading == "textureless":
        return textureless
    return albedo.clamp(0.0, 1.0) * textureless


def sample_jitter(candidates: Tensor, seed: int) -> Tensor:
    """Uniform offsets in [0, 1) for candidate samples (flat ``ray · S + bin`` ids, int), from a
    counter-based hash of (seed, id): the same id gives the same offset in every pass of an
    iteration and on every device, so a render can be recomputed chunk by chunk without
    storing its random numbers. Multipliers stay below 2³¹, so int64 products never overflow."""
    x = (candidates.long() ^ (int(seed) & _MASK32)) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    x = x ^ (x >> 16)
    return (x >> 8).float() * (1.0 / (1 << 24))


_MASK32 = 0xFFFFFFFF


@dataclass
class SamplePlan:
    """Where the samples of R rays are, packed: kept samples sorted by (ray, bin), and the ray
    chunks the render is split into.

    Per kept sample (M,): ``ray`` (int32 when R·S fits, else int64) and distance ``t``; per ray
    (R,): ``first``, the packed index of its first kept sample, and ``delta``, its bin length;
    ``chunks``: host tuples (ray_start, ray_stop, sample_start, sample_stop) covering all rays in
    order, each holding at most ``max(chunk_samples, S)`` samples."""

    n_samples: int
    ray: Tensor
    t: Tensor
    first: Tensor
    delta: Tensor
    chunks: list[tuple[int, int, int, int]]

    @property
    def n_kept(self) -> int:
        return int(self.ray.shape[0])


def _candidate_t(near: Tensor, delta: Tensor, candidates: Tensor, n_samples: int, seed: int | None) -> Tensor:
    """Sample distances of candidates (flat ids, any shape) of rays with ``near``/``delta`` broadcast alike."""
    bins = torch.remainder(candidates, n_samples).float()
    offset = sample_jitter(candidates, seed) if seed is not None else 0.5
    return near + (bins + offset) * delta


def plan_samples(
    origins: Tensor,
    dirs: Tensor,
    near: Tensor,
    far: Tensor,
    hit: Tensor,
    *,
    n_samples: int,
    seed: int | None,
    occupancy: Tensor | None,
    radius: float,
    chunk_samples: int,
    block_samples: int,
) -> SamplePlan:
    """Stratified samples of R rays (``n_samples`` bins between near and far), those in empty
    occupancy cells or on rays missing the sphere dropped, packed without a per-block host round
    trip: the keep mask is built in blocks of ``block_samples`` candidates, then ONE transfer
    brings the sample count and the chunk boundaries to the host (the only sync of a render)."""
    n_rays, s = origins.shape[0], n_samples
    device = origins.device
    delta = (far - near) / s
    rays_per_block = max(1, block_samples // s)
    mask = torch.empty(n_rays, s, dtype=torch.bool, device=device)
    occupied = None if occupancy is None else occupancy.reshape(-1)
    bins = torch.arange(s, device=device)
    for a in range(0, n_rays, rays_per_block):
        b = min(n_rays, a + rays_per_block)
        if occupied is None:
            mask[a:b] = hit[a:b, None]
            continue
        candidates = torch.arange(a, b, device=device)[:, None] * s + bins
        t = _candidate_t(near[a:b, None], delta[a:b, None], candidates, s, seed)
        points = origins[a:b, None, :] + dirs[a:b, None, :] * t[..., None]
        torch.logical_and(hit[a:b, None], occupied[grid_cells(points, radius, occupancy.shape[0])], out=mask[a:b])
    counts = mask.sum(dim=1)
    cum = torch.cumsum(counts, dim=0)
    # Chunk k ends after the last ray whose running total is <= k·step: a chunk then holds
    # fewer than step + S samples. n_rays·S bounds the total, so these thresholds cover it.
    step = max(1, chunk_samples - s)
    thresholds = torch.arange(1, -(-n_rays * s // step) + 1, device=device, dtype=cum.dtype) * step
    ray_bounds = torch.searchsorted(cum, thresholds, right=True)
    block_ends = torch.arange(rays_per_block, n_rays + rays_per_block, rays_per_block, device=device).clamp_max(n_rays)
    with record_function("d2h::plan"):
        host = torch.cat([cum[-1:], ray_bounds, cum[(ray_bounds - 1).clamp_min(0)], cum[block_ends - 1]]).tolist()
    n_kept, k = int(host[0]), ray_bounds.shape[0]
    bounds = [int(r) for r in host[1 : 1 + k]]
    sample_at = [int(v) if r > 0 else 0 for r, v in zip(bounds, host[1 + k : 1 + 2 * k])]
    block_totals = [int(v) for v in host[1 + 2 * k :]]
    chunks, ray_start, sample_start = [], 0, 0
    for ray_stop, sample_stop in zip(bounds, sample_at):
        if ray_stop > ray_start:
            chunks.append((ray_start, ray_stop, sample_start, sample_stop))
            ray_start, sample_start = ray_stop, sample_stop
    if ray_start < n_rays:  # empty tail (no thresholds when there are no rays)
        chunks.append((ray_start, n_rays, sample_start, n_kept))
    index_dtype = torch.int32 if n_rays * s < 2**31 else torch.int64
    ray = torch.empty(n_kept, dtype=index_dtype, device=device)
    t = torch.empty(n_kept, dtype=torch.float32, device=device)
    done = 0
    for block, a in enumerate(range(0, n_rays, rays_per_block)):
        b, total = min(n_rays, a + rays_per_block), block_totals[block]
        if total > done:  # the j-th kept candidate of the block is where its running count reaches j
            running = torch.cumsum(mask[a:b].reshape(-1), dim=0)
            wanted = torch.arange(1, total - done + 1, device=device, dtype=running.dtype)
            ids = torch.searchsorted(running, wanted) + a * s
            del running, wanted
            rays = torch.div(ids, s, rounding_mode="floor")
            ray[done:total] = rays
            t[done:total] = _candidate_t(near[rays], delta[rays], ids, s, seed)
        done = total
    return SamplePlan(s, ray, t, cum - counts, delta, chunks)


@dataclass
class ChunkResult:
    """Per ray of a chunk (n,): ``rgb`` (n, 3) premultiplied foreground, ``opacity`` / ``depth``
    (n, 1), optional ``normal`` (n, 3) and ``orient_sum`` (Σ w·max(0, n·d)² over the chunk's
    samples); per kept sample (m,), when asked for: ``weights``, ``ray`` (global ray index),
    ``sample_dirs`` (m, 3) and ``sample_normal`` (m, 3)."""

    rgb: Tensor
    opacity: Tensor
    depth: Tensor
    normal: Tensor | None = None
    orient_sum: Tensor | None = None
    samples: dict[str, Tensor] = field(default_factory=dict)


def march_chunk(
    field: "torch.nn.Module",
    plan: SamplePlan,
    chunk: tuple[int, int, int, int],
    origins: Tensor,
    dirs: Tensor,
    *,
    radius: float,
    shading: str,
    with_normals: bool,
    light_per_view: Tensor | None,
    rays_per_view: int,
    ambient: Tensor,
    diffuse: Tensor,
    normal_min_weight: float = 0.0,
    sample_outputs: bool = False,
) -> ChunkResult:
    """Render the rays [r0, r1) of ``chunk`` from their packed samples [s0, s1): one field
    query, front-to-back compositing per ray (an exclusive running sum over the packed samples
    in float64, minus its value at the ray's first sample), and per-ray accumulation."""
    r0, r1, s0, s1 = chunk
    n = r1 - r0
    device = origins.device
    ray, t = plan.ray[s0:s1].long(), plan.t[s0:s1]
    delta = plan.delta[ray]
    ray_dirs = dirs[ray]
    points = torch.addcmul(origins[ray], ray_dirs, t[:, None])
    out = field(points)
    sigma_delta = out["density"] * delta
    exact = sigma_delta.double()
    running = torch.cumsum(exact, dim=0).sub_(exact)
    before = running - running[plan.first[ray] - s0]  # Σ σδ of the ray's earlier samples
    weights = torch.exp(-before.float()) * (1.0 - torch.exp(-sigma_delta))
    normal = None
    if with_normals:
        # Normals cost 6 extra density lookups (or a double backward) per sample; samples with
        # negligible weight cannot change the image, so they keep a zero normal. The visible
        # set has a data-dependent size: one host sync per chunk, only for renders with normals.
        visible = (weights.detach() > normal_min_weight).nonzero(as_tuple=True)[0]
        normal = torch.zeros_like(points).index_put((visible,), field.normal(points[visible]))
    light_dirs = None
    if shading != "albedo":
        assert light_per_view is not None
        light = light_per_view[torch.div(ray, rays_per_view, rounding_mode="floor")]
        light_dirs = F.normalize(light - points, dim=-1)
    color = shade(out["albedo"], normal, light_dirs, shading, ambient, diffuse)
    local = ray - r0

    def accumulate(values: Tensor) -> Tensor:
        return torch.zeros(n, values.shape[-1], device=device, dtype=values.dtype).index_add(0, local, values)

    result = ChunkResult(
        rgb=accumulate(weights[:, None] * color),
        opacity=accumulate(weights[:, None]),
        depth=accumulate((weights * t)[:, None]),
    )
    if normal is not None:
        result.normal = F.normalize(accumulate(weights[:, None] * normal), dim=-1)
        facing = (normal * ray_dirs).sum(-1).clamp_min(0.0)
        result.orient_sum = (weights.detach() * facing**2).sum()
    if sample_outputs:
        result.samples = {"weights": weights, "ray": ray, "sample_dirs": ray_dirs}
        if normal is not None:
            result.samples["sample_normal"] = normal
    return result
