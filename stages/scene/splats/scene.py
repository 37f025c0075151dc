"""The 3D Gaussian splat scene: parameters, rendering, regularisers, densification, state."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import SHADINGS, Cameras, RenderChunk, RenderOutput, image_rows
from . import densify as densify_ops
from .cameras import intrinsics_from_fovy, viewmats_from_c2w
from .config import SplatConfig
from .density import colors_at, density_grid
from .init import load_point_cloud, mean_neighbour_distance, random_ball_points
from .rasterize_gsplat import gsplat_available, gsplat_cuda_ready, rasterize_gsplat
from .rasterize_torch import quat_to_rotmat, rasterize_torch
from .sh import eval_sh, num_sh_bases, rgb_to_sh

GAUSSIAN_PARAMS = ("means", "scales", "quats", "opacities", "colors", "colors_rest")
AMBIENT, DIFFUSE = 0.1, 0.9  # MVDream-threestudio's point-light material colours

Rasterizer = Callable[..., tuple[Tensor, Tensor, dict[str, Any]]]


@dataclass
class SplatRenderPlan:
    """One splat render fixed in advance (:meth:`SplatScene.plan_render`): OpenCV ``viewmats``
    (C, 4, 4), ``Ks`` (C, 3, 3), point ``lights`` (C, 3) for lit shading, random ``background``
    colours (C, 3) or None (the solid colour)."""

    viewmats: Tensor
    Ks: Tensor
    height: int
    width: int
    shading: str
    lights: Tensor | None
    background: Tensor | None
    map_keys: tuple[str, ...]
    sum_keys: tuple[str, ...] = ()


def select_rasterizer(backend: str, device: torch.device) -> Rasterizer:
    """``auto``: gsplat on CUDA when importable, the torch fallback otherwise."""
    if backend == "torch":
        return rasterize_torch
    if backend == "gsplat":
        if device.type != "cuda":
            raise ValueError(f"splats.backend=gsplat needs the scene on CUDA, it is on {device}")
        if not gsplat_available():
            raise ValueError("splats.backend=gsplat but gsplat is not installed (pip install 'modedreamer-ray[cuda]')")
        if not gsplat_cuda_ready():
            raise ValueError("splats.backend=gsplat but gsplat's CUDA kernels did not build (is nvcc on PATH?)")
        return rasterize_gsplat
    if backend == "auto":
        if device.type != "cuda":
            return rasterize_torch
        if gsplat_cuda_ready():
            return rasterize_gsplat
        warnings.warn("splats.backend=auto on CUDA without a working gsplat: using the slow torch rasteriser")
        return rasterize_torch
    raise ValueError(f"splats.backend must be auto|gsplat|torch, got {backend!r}")


def _as_config(config: Any) -> SplatConfig:
    """A ``SplatConfig`` from itself or from an OmegaConf structured config of one."""
    if isinstance(config, SplatConfig):
        return config
    from omegaconf import OmegaConf

    if OmegaConf.is_config(config):
        config = OmegaConf.to_object(config)
    if not isinstance(config, SplatConfig):
        raise TypeError(f"SplatScene needs a SplatConfig, got {type(config).__name__}")
    return config


class SplatScene(nn.Module):
    """N anisotropic 3D Gaussians + a solid background (implements ``stages.scene.base.Scene``).

    Parameters (``self.splats``, an ``nn.ParameterDict`` so gsplat's strategy can replace them):
    ``means`` (N, 3), ``scales`` (N, 3) log, ``quats`` (N, 4) wxyz unnormalised,
    ``opacities`` (N,) logit, ``colors`` (N, 3) logit rgb (``color_mode: sigmoid``) or (N, 1, 3)
    SH DC (``sh``), ``colors_rest`` (N, K-1, 3) higher SH bands when ``sh_degree`` > 0.
    ``background`` (3,) rgb in [0, 1] (a parameter when learned, else a buffer).

    Randomness (initialisation, background augmentation, split sampling) comes from the
    scene's own generator seeded by ``seed``, whose state is part of ``state_dict``.
    """

    def __init__(self, config: SplatConfig, seed: int):
        super().__init__()
        config = _as_config(config)
        config.validate()
        self.config = config
        self.generator = torch.Generator().manual_seed(int(seed))
        self.splats = nn.ParameterDict(self._initial_params())
        background = torch.tensor([float(v) for v in config.background_color])
        if config.background_learned:
            self.background = nn.Parameter(background)
        else:
            self.register_buffer("background", background)
        self.strategy = None
        self.strategy_state: dict[str, Any] = {}
        if config.densify.enabled:
            if gsplat_available():
                self.strategy = densify_ops.make_strategy(config.densify)
                self.strategy_state = self.strategy.initialize_state(scene_scale=config.radius)
            else:
                warnings.warn(
                    "splats.densify.enabled but gsplat is not installed: densification is skipped "
                    "(pip install gsplat; its strategy runs on CPU too)",
                    stacklevel=2,
                )

    # ------------------------------------------------------------------ parameters
    def _initial_params(self) -> dict[str, nn.Parameter]:
        cfg = self.config
        if cfg.init_ply:
            means, rgb = load_point_cloud(cfg.init_ply)
        else:
            means = random_ball_points(cfg.init_num_points, cfg.init_radius, self.generator)
            rgb = None
        n = means.shape[0]
        if rgb is None:
            noise = (torch.rand(n, 3, generator=self.generator) * 2 - 1) * cfg.init_color_noise
            rgb = (torch.tensor([float(v) for v in cfg.init_color]) + noise).clamp(0.0, 1.0)
        scales = torch.log(mean_neighbour_distance(means) * cfg.init_scale)[:, None].repeat(1, 3)
        quats = torch.zeros(n, 4)
        quats[:, 0] = 1.0
        opacities = torch.full((n,), math.log(cfg.init_opacity / (1 - cfg.init_opacity)))
        params = {"means": means, "scales": scales, "quats": quats, "opacities": opacities}
        if cfg.color_mode == "sigmoid":
            params["colors"] = torch.logit(rgb.clamp(1e-4, 1 - 1e-4))
        else:
            params["colors"] = rgb_to_sh(rgb)[:, None, :]
            if cfg.sh_degree > 0:
                params["colors_rest"] = torch.zeros(n, num_sh_bases(cfg.sh_degree) - 1, 3)
        return {k: nn.Parameter(v.float().contiguous()) for k, v in params.items()}

    @property
    def num_gaussians(self) -> int:
        return int(self.splats["means"].shape[0])

    def gaussians(self) -> dict[str, Tensor]:
        """Activated values: means (N,3), scales (N,3), quats (N,4) unit, opacities (N,), rgb (N,3)
        (the view-independent DC colour), sh (N, K, 3) SH coefficients (DC first)."""
        p = self.splats
        if self.config.color_mode == "sigmoid":
            rgb = torch.sigmoid(p["colors"])
            sh = rgb_to_sh(rgb)[:, None, :]
        else:
            sh = p["colors"] if "colors_rest" not in p else torch.cat([p["colors"], p["colors_rest"]], dim=1)
            rgb = torch.clamp_min(sh[:, 0, :] * 0.28209479177387814 + 0.5, 0.0)
        return {
            "means": p["means"],
            "scales": torch.exp(p["scales"]),
            "quats": F.normalize(p["quats"], dim=-1),
            "opacities": torch.sigmoid(p["opacities"]),
            "rgb": rgb,
            "sh": sh,
        }

    def to_ply_dict(self) -> dict[str, Tensor]:
        """Raw values in the 3DGS PLY convention (detached, CPU float32): ``means`` (N,3),
        ``f_dc`` (N,3), ``f_rest`` (N,(K-1)*3) channel-major, ``opacities`` (N,) logit,
        ``scales`` (N,3) log, ``quats`` (N,4) wxyz normalised."""
        with torch.no_grad():
            g = self.gaussians()
            sh = g["sh"].detach().float().cpu()
            n, k = sh.shape[0], sh.shape[1]
            rest = sh[:, 1:, :].transpose(1, 2).reshape(n, 3 * (k - 1))  # channel-major, as 3DGS
            return {
                "means": self.splats["means"].detach().float().cpu(),
                "f_dc": sh[:, 0, :].contiguous(),
                "f_rest": rest.contiguous(),
                "opacities": self.splats["opacities"].detach().float().cpu(),
                "scales": self.splats["scales"].detach().float().cpu(),
                "quats": g["quats"].detach().float().cpu(),
            }

    # ------------------------------------------------------------------ as a field (mesh export)
    @torch.no_grad()
    def density_grid(self, resolution: int) -> Tensor:
        """The summed Gaussians (:func:`~stages.scene.splats.density.density_grid`) at
        ``grid_points(radius, R)``, (R, R, R): what the marching-cubes exporter meshes."""
        g = self.gaussians()
        return density_grid(g["means"], g["quats"], g["scales"], g["opacities"], self.config.radius, resolution)

    @torch.no_grad()
    def albedo_at(self, points: Tensor) -> Tensor:
        """View-independent colour (N, 3) in [0, 1] at world points: the nearby Gaussians' DC
        colours weighted by their density there (mesh vertex colours)."""
        g = self.gaussians()
        rgb = g["rgb"].clamp(0.0, 1.0)
        return colors_at(points.to(g["means"].device, torch.float32), g["means"], g["quats"], g["scales"], g["opacities"], rgb)

    # ------------------------------------------------------------------ rendering
    def render(self, cameras: Cameras, height: int, width: int, shading: str = "albedo") -> RenderOutput:
        """Render every camera: ``rgb`` (B,3,H,W) in [0,1], ``opacity`` (B,1,H,W), ``depth``
        (B,1,H,W) expected camera-space z (0 where empty), ``normal`` (B,3,H,W) for
        ``diffuse``/``textureless`` shading; plus ``means2d`` (B,N,2) and ``radii`` (B,N,2)
        for densification (gsplat's ``info``)."""
        return self.render_planned(self.plan_render(cameras, height, width, shading))

    def plan_render(self, cameras: Cameras, height: int, width: int, shading: str = "albedo") -> "SplatRenderPlan":
        """Fix one render's random draws (point lights, background colours; training only) from
        the scene generator, so that :meth:`render_chunks` renders the same views again."""
        if shading not in SHADINGS:
            raise ValueError(f"shading must be one of {SHADINGS}, got {shading!r}")
        if height < 1 or width < 1:
            raise ValueError(f"render size must be positive, got {height}x{width}")
        device = self.splats["means"].device
        cameras = cameras.to(device)
        viewmats = viewmats_from_c2w(cameras.c2w.float())
        lights = None
        if shading != "albedo":
            lights = self._light_positions(torch.linalg.inv(viewmats)[:, :3, 3])
        maps = ("rgb", "opacity", "depth") + (("normal",) if shading != "albedo" else ())
        return SplatRenderPlan(
            viewmats=viewmats, Ks=intrinsics_from_fovy(cameras.fovy.float(), height, width), height=height,
            width=width, shading=shading, lights=lights, background=self._draw_background(viewmats.shape[0], device),
            map_keys=maps,
        )

    def render_planned(self, plan: "SplatRenderPlan") -> RenderOutput:
        """All views of ``plan`` in one rasteriser call."""
        return self._render_views(plan, slice(None))

    def render_chunks(self, plan: "SplatRenderPlan", out: RenderOutput, step: int) -> Iterator[RenderChunk]:
        """Groups of ``chunk_views`` views rendered again with autograd. gsplat's strategy hooks
        keep their order: its pre-backward hook (retain the projected means' gradient) runs on
        each chunk before that chunk's backward; after the last chunk the chunks' screen-space
        gradients and radii are concatenated into ``out["means2d"]`` / ``out["radii"]``, exactly
        what one render of every view gives, for :meth:`step_post_backward`."""
        n_views, pixels = plan.viewmats.shape[0], plan.height * plan.width
        means2d, radii = [], []
        hooked = False
        for v0 in range(0, n_views, self.config.chunk_views):
            v1 = min(n_views, v0 + self.config.chunk_views)
            part = self._render_views(plan, slice(v0, v1))
            if self.strategy is not None and part["means2d"].requires_grad:
                self.strategy.step_pre_backward(dict(self.splats), {}, self.strategy_state, step, self._strategy_info(part))
                hooked = True
            means2d.append(part["means2d"])
            radii.append(part["radii"])
            yield RenderChunk(v0 * pixels, v1 * pixels, {k: image_rows(part[k]) for k in plan.map_keys})
        merged = torch.cat([m.detach() for m in means2d])
        if hooked:  # each chunk's retained gradient (zeros where no gradient reached it)
            merged.grad = torch.cat([torch.zeros_like(m) if m.grad is None else m.grad for m in means2d])
        out["means2d"], out["radii"] = merged, torch.cat(radii)

    def _render_views(self, plan: "SplatRenderPlan", views: slice) -> RenderOutput:
        viewmats, Ks = plan.viewmats[views], plan.Ks[views]
        device = viewmats.device
        g = self.gaussians()
        sh_degree: Optional[int] = None
        normals = None
        if plan.shading == "albedo":
            if self.config.color_mode == "sh":
                colors, sh_degree = g["sh"], self.config.sh_degree
            else:
                colors = g["rgb"]
        else:
            campos = torch.linalg.inv(viewmats)[:, :3, 3]  # (C, 3)
            albedo = self._view_colors(g, campos)
            if plan.shading == "textureless":
                albedo = torch.ones_like(albedo)
            normals = self._gaussian_normals(g, campos)  # (C, N, 3) facing the camera
            to_light = F.normalize(plan.lights[views][:, None, :] - g["means"][None], dim=-1)
            lambert = (normals * to_light).sum(-1, keepdim=True).clamp_min(0.0)
            colors = torch.cat([albedo * (AMBIENT + DIFFUSE * lambert), normals], dim=-1)

        rasterize = select_rasterizer(self.config.backend, device)
        render, alpha, meta = rasterize(
            g["means"],
            g["quats"],
            g["scales"],
            g["opacities"],
            colors,
            viewmats,
            Ks,
            plan.width,
            plan.height,
            sh_degree=sh_degree,
            near_plane=self.config.near_plane,
            far_plane=self.config.far_plane,
            eps2d=self.config.eps2d,
            tile_size=self.config.tile_size,
        )
        fg = render[..., :3]
        if self.config.color_mode == "sh":
            fg = torch.minimum(fg, alpha)  # SH colours are unbounded above; keep rgb in [0, 1]
        background = self._background_colors(None if plan.background is None else plan.background[views])
        rgb = fg + background[:, None, None, :] * (1.0 - alpha)
        out = {
            "rgb": rgb.permute(0, 3, 1, 2),
            "opacity": alpha.permute(0, 3, 1, 2),
            "depth": render[..., -1:].permute(0, 3, 1, 2),
            "means2d": meta["means2d"],
            "radii": meta["radii"],
        }
        if normals is not None:
            normal = F.normalize(render[..., 3:6], dim=-1)
            out["normal"] = normal.permute(0, 3, 1, 2)
        return out

    def _view_colors(self, g: dict[str, Tensor], campos: Tensor) -> Tensor:
        """Per-camera colours (C, N, 3)."""
        if self.config.color_mode == "sh" and self.config.sh_degree > 0:
            dirs = g["means"][None] - campos[:, None, :]
            sh = g["sh"][None].expand(campos.shape[0], *g["sh"].shape)
            return torch.clamp_min(eval_sh(self.config.sh_degree, sh, dirs) + 0.5, 0.0).clamp_max(1.0)
        return g["rgb"].clamp_max(1.0)[None].expand(campos.shape[0], -1, -1)

    @staticmethod
    def _gaussian_normals(g: dict[str, Tensor], campos: Tensor) -> Tensor:
        """Shortest axis of each Gaussian, flipped to face each camera (C, N, 3)."""
        rot = quat_to_rotmat(g["quats"])  # (N, 3, 3), columns = axes
        axis = g["scales"].argmin(dim=-1)
        normal = rot.gather(2, axis[:, None, None].expand(-1, 3, 1)).squeeze(-1)  # (N, 3)
        facing = ((campos[:, None, :] - g["means"][None]) * normal[None]).sum(-1, keepdim=True)
        return torch.where(facing < 0, -normal[None], normal[None])

    def _light_positions(self, campos: Tensor) -> Tensor:
        """A point light near each camera (jittered by the scene generator in training mode)."""
        if not self.training:
            return campos
        jitter = torch.randn(campos.shape, generator=self.generator).to(campos) * 0.5
        return campos + jitter * campos.norm(dim=-1, keepdim=True)

    def _draw_background(self, n_cams: int, device: torch.device) -> Tensor | None:
        """Random background colours (C, 3) of one training render, or None (the solid colour):
        drawn on the scene generator (host), with probability ``background_random_aug_prob``."""
        cfg = self.config
        if not (self.training and cfg.background_random_aug):
            return None
        if torch.rand((), generator=self.generator).item() >= cfg.background_random_aug_prob:
            return None
        rows = 1 if cfg.background_random_aug_shared else n_cams
        return torch.rand(rows, 3, generator=self.generator).to(device).expand(n_cams, 3)

    def _background_colors(self, random: Tensor | None) -> Tensor:
        """Background rgb per camera (C, 3): the solid colour, or the plan's random colours."""
        if random is None:
            return self.background.clamp(0.0, 1.0)[None]
        colour = self.background.clamp(0.0, 1.0)[None].expand(random.shape[0], 3)
        return colour * 0.0 + random  # keep the parameter in the graph (zero gradient)

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, lr: dict[str, float]) -> list[dict[str, Any]]:
        """Adam groups named ``means scales quats opacities colors [colors_rest] [background]``.

        ``lr`` maps group name -> learning rate; names it lacks use ``config.lr``. Each group
        holds one tensor and keeps its ``name`` (the densifier finds groups by name).
        """
        params = dict(self.splats.items())
        if isinstance(self.background, nn.Parameter):
            params["background"] = self.background
        return [
            {"params": [param], "lr": float(lr.get(name, getattr(self.config.lr, name))), "name": name}
            for name, param in params.items()
        ]

    def make_optimizer(self, lr: Optional[dict[str, float]] = None) -> torch.optim.Adam:
        """``Adam(param_groups(lr), eps=1e-15)`` as 3DGS/gsplat use it."""
        return torch.optim.Adam(self.param_groups(lr or {}), eps=1e-15)

    def regularizers(self, out: RenderOutput) -> dict[str, Tensor]:
        """``opacity``: mean Gaussian opacity; ``scale``: mean excess of the largest scale over
        ``max_scale``·``radius``; ``outside``: mean distance of centres outside the ``radius``
        sphere; ``sparsity``: mean rendered opacity."""
        radius, n = self.config.radius, max(1, self.num_gaussians)  # sums / n: 0, not NaN, when empty
        scales = torch.exp(self.splats["scales"]).amax(dim=-1)
        return {
            "opacity": torch.sigmoid(self.splats["opacities"]).sum() / n,
            "scale": F.relu(scales / radius - self.config.max_scale).sum() / n,
            "outside": F.relu(self.splats["means"].norm(dim=-1) - radius).sum() / n,
            "sparsity": out["opacity"].mean(),
        }

    def _strategy_info(self, out: RenderOutput) -> dict[str, Any]:
        means2d = out["means2d"]
        return {
            "means2d": means2d,
            "radii": out["radii"],
            "width": int(out["rgb"].shape[-1]),
            "height": int(out["rgb"].shape[-2]),
            "n_cameras": int(means2d.shape[0]),
            "gaussian_ids": None,
        }

    def step_pre_backward(self, step: int, out: RenderOutput) -> None:
        """Retain the gradient of the projected means (gsplat strategy's pre-backward hook)."""
        if self.strategy is None or not out["means2d"].requires_grad:
            return
        self.strategy.step_pre_backward(dict(self.splats), {}, self.strategy_state, step, self._strategy_info(out))

    def step_post_backward(self, step: int, out: RenderOutput, optimizer: torch.optim.Optimizer) -> None:
        """Accumulate screen-space gradients and, on refine steps, clone/split/prune in place
        (parameters and the Adam moments of ``optimizer`` are resized together)."""
        if self.strategy is None or out["means2d"].grad is None:
            return
        strategy = self.strategy
        if self.num_gaussians >= self.config.densify.max_gaussians:
            strategy = densify_ops.without_growth(strategy)
        views = densify_ops.group_views(optimizer, list(self.splats.keys()))
        device = self.splats["means"].device
        for key, value in self.strategy_state.items():  # restored on the CPU before scene.to(device)
            if isinstance(value, Tensor) and value.device != device:
                self.strategy_state[key] = value.to(device)
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        cuda_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):  # split sampling from the scene's generator
            torch.manual_seed(seed)
            strategy.step_post_backward(self.splats, views, self.strategy_state, step, self._strategy_info(out))

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "strategy": {k: v for k, v in self.strategy_state.items() if isinstance(v, Tensor) or v is None},
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        if self.strategy is not None:
            for key, value in state.get("strategy", {}).items():
                self.strategy_state[key] = value

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a state whose Gaussian count may differ: parameters are resized in place first,
        so an optimiser built on this scene still refers to them (load its state afterwards)."""
        for name in GAUSSIAN_PARAMS:
            key = f"splats.{name}"
            if key in state_dict and name in self.splats:
                param = self.splats[name]
                value = state_dict[key]
                if param.shape != value.shape:
                    param.data = torch.empty(value.shape, dtype=param.dtype, device=param.device)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
