"""``NeRFScene``: the threestudio-style implicit volume as a ``stages.scene.base.Scene``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import Cameras, RenderOutput
from .background import Background
from .config import SHADINGS, NeRFConfig
from .field import NeRFField
from ..base import grid_points
from .renderer import camera_rays, march_rays, sphere_bounds

DEFAULT_LR: dict[str, float] = {"encoding": 0.01, "density": 0.001, "feature": 0.001, "background": 0.001}
"""MVDream-threestudio's learning rates per parameter group."""

REGULARIZER_NAMES = ("sparsity", "opaque", "orient", "normal_smooth")


class NeRFScene(nn.Module):
    """Hash-grid NeRF with blob density init, sigmoid albedo, a background model, point-light
    shading and an occupancy-pruned volume renderer. Deterministic for a seed: parameters are
    drawn from ``torch.Generator().manual_seed(seed)`` and the per-render randomness (sample
    jitter, light, background augmentation, occupancy jitter) from a second generator whose
    state is part of ``state_dict()``."""

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
        direction = normalize(camera position + N(0, perturb²)), distance ~ U(light_distance_range);
        otherwise a headlight at the camera position."""
        position = cameras.c2w[:, :3, 3].float()
        if generator is None:
            return position
        c = self.config.shading
        noise = torch.randn(position.shape, generator=generator, device=generator.device).to(position)
        direction = F.normalize(position + noise * c.light_position_perturb, dim=-1)
        u = torch.rand(position.shape[0], 1, generator=generator, device=generator.device).to(position)
        lo, hi = c.light_distance_range
        return direction * (lo + (hi - lo) * u)

    def render(
        self,
        cameras: Cameras,
        height: int,
        width: int,
        shading: str = "albedo",
        light_positions: Tensor | None = None,
        with_normals: bool | None = None,
    ) -> RenderOutput:
        """Render B cameras at H×W.

        Returns ``rgb`` (B,3,H,W) in [0,1], ``opacity`` / ``depth`` (B,1,H,W), ``background``
        (B,3,H,W), ``normal`` (B,3,H,W) unit world normals (zeros where empty) when normals are
        computed (always for non-albedo shading; for albedo when ``with_normals=True``, or when
        it is None and ``shading.compute_normals``),
        and per kept sample (flattened over all rays): ``weights`` (M,), ``ray_indices`` (M,)
        into B·H·W, ``sample_dirs`` (M,3) and, with normals, ``sample_normal`` (M,3).
        ``light_positions`` (B,3) overrides the sampled point light.
        """
        if shading not in SHADINGS:
            raise ValueError(f"shading must be one of {SHADINGS}, got {shading!r}")
        if height < 1 or width < 1:
            raise ValueError(f"render size must be positive, got {height}x{width}")
        c = self.config
        device = self.device
        cameras = cameras.to(device)
        batch = len(cameras)
        generator = self._generator(device) if self.training else None
        origins, dirs = camera_rays(cameras, height, width)
        background = self.background(dirs, generator)  # (B, H, W, 3)
        if with_normals is None:
            with_normals = c.shading.compute_normals
        with_normals = with_normals or shading != "albedo"  # lambertian shading needs them
        if light_positions is None:
            light_positions = self.sample_lights(cameras, generator)
        light_per_ray = light_positions.to(device).float()[:, None, :].expand(batch, height * width, 3).reshape(-1, 3)

        origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
        n_rays = origins.shape[0]
        near, far, hit = sphere_bounds(origins, dirs, c.radius)
        hit_rays = hit.nonzero(as_tuple=True)[0]
        n_samples = c.renderer.num_samples_per_ray
        jitter = None
        if generator is not None and c.renderer.randomized:
            jitter = torch.rand(hit_rays.shape[0], n_samples, generator=generator, device=device)
        occupancy = self.occupancy if c.renderer.grid_prune else None
        chunk = max(1, c.renderer.chunk_samples // n_samples)

        parts: dict[str, list[Tensor]] = {k: [] for k in ("rgb", "opacity", "depth", "normal", "w", "ray", "sn", "sd")}
        for start in range(0, hit_rays.shape[0], chunk):
            rays = hit_rays[start : start + chunk]
            res = march_rays(
                self.field,
                origins[rays],
                dirs[rays],
                near[rays],
                far[rays],
                n_samples=n_samples,
                jitter=None if jitter is None else jitter[start : start + chunk],
                occupancy=occupancy,
                radius=c.radius,
                shading=shading,
                with_normals=with_normals,
                light_positions=light_per_ray[rays],
                ambient=self.ambient,
                diffuse=self.diffuse,
                normal_min_weight=c.shading.normal_min_weight,
            )
            parts["rgb"].append(res.rgb)
            parts["opacity"].append(res.opacity)
            parts["depth"].append(res.depth)
            parts["w"].append(res.weights)
            parts["ray"].append(rays[res.ray])
            parts["sd"].append(res.sample_dirs)
            if with_normals:
                parts["normal"].append(res.normal)
                parts["sn"].append(res.sample_normal)

        def scatter(key: str, channels: int) -> Tensor:
            full = torch.zeros(n_rays, channels, device=device)
            if parts[key]:
                values = torch.cat(parts[key]).reshape(-1, channels)
                full = full.index_put((hit_rays,), values)
            return full.reshape(batch, height, width, channels).permute(0, 3, 1, 2)

        def cat(key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.cat(parts[key]) if parts[key] else torch.zeros(shape, device=device, dtype=dtype)

        fg = scatter("rgb", 3)
        opacity = scatter("opacity", 1)
        bg = background.permute(0, 3, 1, 2)
        out: RenderOutput = {
            "rgb": (fg + bg * (1.0 - opacity)).clamp(0.0, 1.0),
            "opacity": opacity,
            "depth": scatter("depth", 1),
            "background": bg,
            "weights": cat("w", (0,)),
            "ray_indices": cat("ray", (0,), torch.long),
            "sample_dirs": cat("sd", (0, 3)),
        }
        if with_normals:
            out["normal"] = scatter("normal", 3)
            out["sample_normal"] = cat("sn", (0, 3))
        return out

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
        density = torch.cat([self.field.density(p) for p in points.split(c.chunk_samples)])
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
        samples / #pixels with opacity > 0) and ``normal_smooth`` (mean squared difference of the
        normal map between neighbouring pixels). Terms needing normals are absent without them."""
        opacity = out["opacity"]
        clamped = opacity.clamp(1e-3, 1.0 - 1e-3)
        terms = {
            "sparsity": torch.sqrt(opacity**2 + 0.01).mean(),
            "opaque": F.binary_cross_entropy(clamped, clamped),
        }
        if "sample_normal" in out:
            facing = (out["sample_normal"] * out["sample_dirs"]).sum(-1).clamp_min(0.0)
            n_pixels = (opacity > 0).sum().clamp_min(1)
            terms["orient"] = (out["weights"].detach() * facing**2).sum() / n_pixels
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
        chunk = self.config.renderer.chunk_samples
        density = torch.cat([self.field.density(p) for p in points.split(chunk)])
        return density.reshape(resolution, resolution, resolution)

    @torch.no_grad()
    def albedo_at(self, points: Tensor) -> Tensor:
        """Albedo (N, 3) in [0, 1] at world points (N, 3)."""
        points = points.to(self.device, torch.float32)
        chunk = self.config.renderer.chunk_samples
        parts = [torch.sigmoid(self.field.feature_network(self.field.encode(p))) for p in points.split(chunk)]
        return torch.cat(parts) if parts else torch.zeros(0, 3, device=self.device)
