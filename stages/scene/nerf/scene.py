"""``NeRFScene``: the threestudio-style implicit volume as a ``stages.scene.base.Scene``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import SHADINGS, Cameras, RenderChunk, RenderOutput, grid_points, rows_image
from .background import Background
from .config import NeRFConfig
from .field import NeRFField
from .renderer import SamplePlan, camera_rays, march_chunk, plan_samples, sphere_bounds

DEFAULT_LR: dict[str, float] = {"encoding": 0.01, "density": 0.001, "feature": 0.001, "background": 0.001}
"""MVDream-threestudio's learning rates per parameter group."""

REGULARIZER_NAMES = ("sparsity", "opaque", "orient", "normal_smooth")


@dataclass
class NeRFRenderPlan:
    """One NeRF render fixed in advance (:meth:`NeRFScene.plan_render`): flat rays (R = B·H·W)
    ``origins`` / ``dirs`` (R, 3), the packed ``samples``, point ``lights`` (B, 3), the
    background ``augmentation`` colours (1 or B, 3) or None."""

    batch: int
    height: int
    width: int
    shading: str
    with_normals: bool
    origins: Tensor
    dirs: Tensor
    samples: SamplePlan
    lights: Tensor
    augmentation: Tensor | None
    sample_outputs: bool
    map_keys: tuple[str, ...]
    sum_keys: tuple[str, ...]


class NeRFScene(nn.Module):
    """Hash-grid NeRF with blob density init, sigmoid albedo, a background model, point-light
    shading and an occupancy-pruned volume renderer. Deterministic for a seed: parameters are
    drawn from ``torch.Generator().manual_seed(seed)`` and the per-render randomness (sample
    jitter seed, light, background augmentation, occupancy jitter) from a second, CPU generator
    whose state is part of ``state_dict()``.

    A render is a plan (:meth:`plan_render`: rays, packed samples, random draws) marched in
    chunks of at most ``renderer.chunk_samples`` samples; :meth:`render_chunks` marches the same
    plan again with autograd for deferred back-propagation (a :class:`~stages.scene.base.DeferredScene`)."""

    def __init__(self, config: NeRFConfig, seed: int) -> None:
        super().__init__()
        config.validate()
        self.config = config
        init = torch.Generator().manual_seed(seed)
        self.field = NeRFField(config, init)
        self.background = Background(config.background, init)
        res = config.renderer.grid_resolution
        self.register_buffer("occupancy", torch.ones(res, res, res, dtype=torch.bool))
        self.register_buffer("occupancy_value", torch.full((res, res, res), -1.0))  # < 0: never evaluated
        self.register_buffer("ambient", torch.tensor(config.shading.ambient_light_color, dtype=torch.float32))
        self.register_buffer("diffuse", torch.tensor(config.shading.diffuse_light_color, dtype=torch.float32))
        self._rng = torch.Generator().manual_seed(seed + 0x5EED)
        if self.field.backend == "tcnn":
            self.to("cuda")
        if config.renderer.grid_prune:
            self.update_occupancy()  # start from the blob, not from an all-occupied grid

    @property
    def backend(self) -> str:
        """``torch`` or ``tcnn`` (after resolving ``auto``)."""
        return self.field.backend

    @property
    def device(self) -> torch.device:
        return self.ambient.device

    # ---- randomness -------------------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator:
        """A fresh generator on ``device`` seeded from the scene's own RNG stream."""
        seed = int(torch.randint(0, 2**62, (1,), generator=self._rng))
        return torch.Generator(device=device).manual_seed(seed)

    def get_extra_state(self) -> dict[str, Tensor]:
        return {"rng": self._rng.get_state()}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self._rng.set_state(state["rng"].cpu())

    # ---- rendering ----------------------------------------------------------------------------
    def sample_lights(self, cameras: Cameras, generator: torch.Generator | None) -> Tensor:
        """Point-light positions (B, 3). Training (generator given): DreamFusion's sampling,
        direction = normalize(camera position + N(0, perturb²)), distance ~ U(light_distance_range),
        drawn on ``generator`` (a CPU generator); otherwise a headlight at the camera position."""
        position = cameras.c2w[:, :3, 3].float()
        if generator is None:
            return position
        c = self.config.shading
        noise = torch.randn(position.shape, generator=generator, device=generator.device).to(position)
        direction = F.normalize(position + noise * c.light_position_perturb, dim=-1)
        u = torch.rand(position.shape[0], 1, generator=generator, device=generator.device).to(position)
        lo, hi = c.light_distance_range
        return direction * (lo + (hi - lo) * u)

    def plan_render(
        self,
        cameras: Cameras,
        height: int,
        width: int,
        shading: str = "albedo",
        light_positions: Tensor | None = None,
        with_normals: bool | None = None,
        sample_outputs: bool = False,
    ) -> "NeRFRenderPlan":
        """Fix one render: its rays, the packed samples that survive the occupancy grid NOW, and
        its random draws (jitter seed, background augmentation, point light) from the scene's
        RNG stream (training mode only). Arguments as :meth:`render`; ``sample_outputs`` keeps
        the per-sample outputs (``weights``, ``ray_indices``, …) in :meth:`render_planned`."""
        if shading not in SHADINGS:
            raise ValueError(f"shading must be one of {SHADINGS}, got {shading!r}")
        if height < 1 or width < 1:
            raise ValueError(f"render size must be positive, got {height}x{width}")
        c = self.config
        cameras = cameras.to(self.device)
        if with_normals is None:
            with_normals = c.shading.compute_normals
        with_normals = with_normals or shading != "albedo"  # lambertian shading needs them
        seed, augmentation, lights = self._draw_render_randomness(cameras)
        if light_positions is not None:
            lights = light_positions.to(self.device).float()
        with torch.no_grad():
            origins, dirs = (v.reshape(-1, 3) for v in camera_rays(cameras, height, width))
            near, far, hit = sphere_bounds(origins, dirs, c.radius)
            samples = plan_samples(
                origins, dirs, near, far, hit,
                n_samples=c.renderer.num_samples_per_ray,
                seed=seed if c.renderer.randomized else None,
                occupancy=self.occupancy if c.renderer.grid_prune else None,
                radius=c.radius,
                chunk_samples=c.renderer.chunk_samples,
                block_samples=c.renderer.march_block_samples,
            )
        maps = ("rgb", "opacity", "depth", "background") + (("normal",) if with_normals else ())
        return NeRFRenderPlan(
            batch=len(cameras), height=height, width=width, shading=shading, with_normals=with_normals,
            origins=origins, dirs=dirs, samples=samples, lights=lights,
            augmentation=None if augmentation is None else augmentation.to(self.device),
            sample_outputs=sample_outputs, map_keys=maps, sum_keys=("orient_sum",) if with_normals else (),
        )

    def _draw_render_randomness(self, cameras: Cameras) -> tuple[int, Tensor | None, Tensor]:
        """(jitter seed, background augmentation, lights) of a render, on the host; eval mode
        draws nothing (seed 0 is unused then, lights are headlights)."""
        if not self.training:
            return 0, None, self.sample_lights(cameras, None)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self._rng))
        augmentation = self.background.draw_augmentation(len(cameras), self._rng)
        return seed, augmentation, self.sample_lights(cameras, self._rng)

    def render(
        self,
        cameras: Cameras,
        height: int,
        width: int,
        shading: str = "albedo",
        light_positions: Tensor | None = None,
        with_normals: bool | None = None,
        sample_outputs: bool = False,
    ) -> RenderOutput:
        """Render B cameras at H×W.

        Returns ``rgb`` (B,3,H,W) in [0,1], ``opacity`` / ``depth`` (B,1,H,W), ``background``
        (B,3,H,W), ``normal`` (B,3,H,W) unit world normals (zeros where empty) when normals are
        computed (always for non-albedo shading; for albedo when ``with_normals=True``, or when
        it is None and ``shading.compute_normals``) with ``orient_sum`` (Σ w·max(0, n·d)² over
        the samples, the ``orient`` regulariser's numerator),
        and with ``sample_outputs``, per kept sample (flattened over all rays): ``weights`` (M,),
        ``ray_indices`` (M,) into B·H·W, ``sample_dirs`` (M,3) and, with normals,
        ``sample_normal`` (M,3). ``light_positions`` (B,3) overrides the sampled point light.
        """
        return self.render_planned(
            self.plan_render(cameras, height, width, shading, light_positions, with_normals, sample_outputs)
        )

    def render_planned(self, plan: "NeRFRenderPlan") -> RenderOutput:
        """The render of ``plan``: its chunks, assembled into images."""
        parts: dict[str, list[Tensor]] = {}
        sums: dict[str, Tensor] = {}
        for chunk, samples in self._march(plan, sample_outputs=plan.sample_outputs):
            for key, rows in chunk.maps.items():
                parts.setdefault(key, []).append(rows)
            for key, value in chunk.sums.items():
                sums[key] = value if key not in sums else sums[key] + value
            for key, value in samples.items():
                parts.setdefault(key, []).append(value)
        out: RenderOutput = {
            key: rows_image(torch.cat(parts[key]), plan.batch, plan.height, plan.width) for key in plan.map_keys
        }
        out.update(sums)
        if plan.sample_outputs:
            empty = plan.origins.new_zeros(0)
            out["weights"] = torch.cat(parts.get("weights", [empty]))
            out["ray_indices"] = torch.cat(parts.get("ray", [empty.long()]))
            out["sample_dirs"] = torch.cat(parts.get("sample_dirs", [empty.reshape(0, 3)]))
            if plan.with_normals:
                out["sample_normal"] = torch.cat(parts.get("sample_normal", [empty.reshape(0, 3)]))
        return out

    def render_chunks(self, plan: "NeRFRenderPlan", out: RenderOutput, step: int) -> Iterator[RenderChunk]:
        """Deferred back-propagation: each ray chunk of the plan rendered again with autograd."""
        for chunk, _ in self._march(plan, sample_outputs=False):
            yield chunk

    def _march(self, plan: "NeRFRenderPlan", sample_outputs: bool) -> Iterator[tuple[RenderChunk, dict[str, Tensor]]]:
        c = self.config
        rays_per_view = plan.height * plan.width
        for chunk in plan.samples.chunks:
            r0, r1 = chunk[0], chunk[1]
            res = march_chunk(
                self.field, plan.samples, chunk, plan.origins, plan.dirs,
                radius=c.radius, shading=plan.shading, with_normals=plan.with_normals,
                light_per_view=plan.lights, rays_per_view=rays_per_view, ambient=self.ambient,
                diffuse=self.diffuse, normal_min_weight=c.shading.normal_min_weight, sample_outputs=sample_outputs,
            )
            replacement = None
            if plan.augmentation is not None:
                views = torch.div(torch.arange(r0, r1, device=self.device), rays_per_view, rounding_mode="floor")
                replacement = plan.augmentation[views] if plan.augmentation.shape[0] > 1 else plan.augmentation
            background = self.background(plan.dirs[r0:r1], replacement)
            maps = {
                "rgb": (res.rgb + background * (1.0 - res.opacity)).clamp(0.0, 1.0),
                "opacity": res.opacity,
                "depth": res.depth,
                "background": background,
            }
            sums = {}
            if plan.with_normals:
                maps["normal"] = res.normal
                sums["orient_sum"] = res.orient_sum
            yield RenderChunk(r0, r1, maps, sums), res.samples

    @property
    def _query_batch(self) -> int:
        """Points per no-grad field query (occupancy refresh, export): ``chunk_samples``, the
        render's own memory bound, but never below 2¹⁶ (tiny chunks would only add calls)."""
        return max(self.config.renderer.chunk_samples, 1 << 16)

    # ---- occupancy grid --------------------------------------------------------------------------
    @torch.no_grad()
    def update_occupancy(self) -> None:
        """Re-evaluate the coarse occupancy grid (nerfacc ``OccGridEstimator`` rule): density at a
        jittered point per cell times the step size, EMA-max with the previous value, a cell is
        occupied while above min(mean, ``grid_threshold``), then dilated by one cell."""
        c = self.config.renderer
        res = c.grid_resolution
        r = self.config.radius
        generator = self._generator(self.device)
        cell = (2.0 * r) / res
        axis = torch.arange(res, device=self.device, dtype=torch.float32)
        corner = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)  # (R, R, R, 3)
        jitter = torch.rand(corner.shape, generator=generator, device=self.device)
        points = (-r + (corner + jitter) * cell).reshape(-1, 3)
        density = torch.cat([self.field.density(p) for p in points.split(self._query_batch)])
        value = (density * (2.0 * r / c.num_samples_per_ray)).reshape(res, res, res)
        previous = self.occupancy_value
        value = torch.where(previous < 0, value, torch.maximum(previous * c.grid_ema_decay, value))
        self.occupancy_value.copy_(value)
        occupied = value > torch.clamp(value.mean(), max=c.grid_threshold)
        # One jittered lookup per cell misses thin or steep features; dilate by one cell to stay
        # conservative (a skipped sample is lost, an extra one only costs time).
        occupied = F.max_pool3d(occupied[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
        self.occupancy.copy_(occupied)

    def step_pre_backward(self, step: int, out: RenderOutput) -> None:
        """Refresh the occupancy grid every ``renderer.grid_update_every`` steps (step 0 included)."""
        if self.config.renderer.grid_prune and step % self.config.renderer.grid_update_every == 0:
            self.update_occupancy()

    def step_post_backward(self, step: int, out: RenderOutput, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to do for a NeRF."""

    # ---- losses and optimiser --------------------------------------------------------------------
    def regularizers(self, out: RenderOutput) -> dict[str, Tensor]:
        """Scalar terms (threestudio formulas): ``sparsity`` mean √(opacity² + 0.01); ``opaque``
        binary entropy of opacity; with normals, ``orient`` (DreamFusion: Σ w·max(0, n·d)² over
        samples, the render's ``orient_sum``, / #pixels with opacity > 0) and ``normal_smooth``
        (mean squared difference of the normal map between neighbouring pixels). Terms needing
        normals are absent without them. Every term is a function of the render's images and
        sums, so deferred back-propagation differentiates it on whole images."""
        opacity = out["opacity"]
        clamped = opacity.clamp(1e-3, 1.0 - 1e-3)
        terms = {
            "sparsity": torch.sqrt(opacity**2 + 0.01).mean(),
            "opaque": F.binary_cross_entropy(clamped, clamped),
        }
        if "orient_sum" in out:
            terms["orient"] = out["orient_sum"] / (opacity > 0).sum().clamp_min(1)
        if "normal" in out:
            n = out["normal"]
            terms["normal_smooth"] = (n[:, :, 1:, :] - n[:, :, :-1, :]).square().mean() + (
                n[:, :, :, 1:] - n[:, :, :, :-1]
            ).square().mean()
        return terms

    def param_groups(self, lr: dict[str, float]) -> list[dict[str, Any]]:
        """Groups ``encoding`` (hash grid), ``density`` / ``feature`` (MLPs), ``background``;
        a group missing from ``lr`` takes ``DEFAULT_LR``; empty groups are left out."""
        unknown = sorted(set(lr) - set(DEFAULT_LR))
        if unknown:
            raise ValueError(f"unknown NeRF parameter group(s) {unknown} in lr; known: {sorted(DEFAULT_LR)}")
        modules = {
            "encoding": self.field.encoding,
            "density": self.field.density_network,
            "feature": self.field.feature_network,
            "background": self.background,
        }
        groups = []
        for name, module in modules.items():
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                groups.append({"name": name, "params": params, "lr": float(lr.get(name, DEFAULT_LR[name]))})
        return groups

    # ---- export --------------------------------------------------------------------------------
    @torch.no_grad()
    def density_grid(self, resolution: int) -> Tensor:
        """Activated density (R, R, R) at ``grid_points(radius, R)`` (ij order, endpoints included)."""
        points = grid_points(self.config.radius, resolution, self.device).reshape(-1, 3)
        chunk = self._query_batch
        density = torch.cat([self.field.density(p) for p in points.split(chunk)])
        return density.reshape(resolution, resolution, resolution)

    @torch.no_grad()
    def albedo_at(self, points: Tensor) -> Tensor:
        """Albedo (N, 3) in [0, 1] at world points (N, 3)."""
        points = points.to(self.device, torch.float32)
        chunk = self._query_batch
        parts = [torch.sigmoid(self.field.feature_network(self.field.encode(p))) for p in points.split(chunk)]
        return torch.cat(parts) if parts else torch.zeros(0, 3, device=self.device)
