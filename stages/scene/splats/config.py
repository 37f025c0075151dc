"""Configuration of the 3D Gaussian splat scene (OmegaConf-structured friendly).

Defaults follow threestudio-3dgs' text-to-3D MVDream config (``gaussian_splatting_mvdream.yaml``:
4096 points in a sphere of radius 0.5, opacity 0.1, grad threshold 0.01) scaled to this
project's 6000-iteration schedule, and gsplat's ``DefaultStrategy`` for densification.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

BACKENDS = ("auto", "gsplat", "torch")
COLOR_MODES = ("sigmoid", "sh")


@dataclass
class DensifyConfig:
    """Fields of gsplat's ``DefaultStrategy`` (same names, same meaning), text-to-3D defaults.

    Gradients are the image-plane gradients of the projected means normalised to [-1, 1]
    screen space (gsplat's convention, equivalent to the original 3DGS' NDC gradient).
    """

    enabled: bool = True
    """Densify/prune during optimisation (needs the ``gsplat`` package, CPU or CUDA)."""
    prune_opa: float = 0.01
    """Prune Gaussians whose opacity falls below this (threestudio-3dgs ``min_opac_prune``)."""
    grow_grad2d: float = 0.01
    """Clone/split Gaussians whose mean screen-space gradient exceeds this (3dgs text-to-3D: 0.01)."""
    grow_scale3d: float = 0.01
    """Below this largest scale (× ``scene_scale`` = ``radius``) clone, above it split."""
    grow_scale2d: float = 0.05
    """Before ``refine_scale2d_stop_iter`` also split Gaussians whose screen radius
    (÷ max(width, height)) exceeds this."""
    prune_scale3d: float = 0.1
    """Prune Gaussians larger than this (× ``radius``); gsplat applies it only after ``reset_every``."""
    prune_scale2d: float = 0.15
    """Before ``refine_scale2d_stop_iter`` (and after ``reset_every``) also prune Gaussians whose screen
    radius (÷ max(width, height)) exceeds this."""
    refine_scale2d_stop_iter: int = 0
    """Apply the screen-size rules ``grow_scale2d`` / ``prune_scale2d`` before this iteration; 0 disables them."""
    refine_start_iter: int = 300
    """Densify/prune only at iterations after this one."""
    refine_stop_iter: int = 3000
    """Stop densifying half-way through the default 6000 iterations."""
    reset_every: int = 100_000
    """Opacity reset period; text-to-3D disables it (threestudio-3dgs uses 50e6)."""
    refine_every: int = 300
    """Densify/prune every N iterations (between ``refine_start_iter`` and ``refine_stop_iter``)."""
    pause_refine_after_reset: int = 0
    """Skip densify/prune for this many iterations after each opacity reset; 0: no pause."""
    revised_opacity: bool = False
    """Give split Gaussians gsplat's revised opacity (arXiv:2404.06109, experimental)."""
    max_gaussians: int = 200_000
    """Skip growing once the scene holds this many Gaussians (pruning still runs)."""


@dataclass
class SplatLearningRates:
    """Adam learning rate per parameter group (threestudio-3dgs MVDream config)."""

    means: float = 1e-3
    """Gaussian centres."""
    scales: float = 5e-3
    """Log-scales."""
    quats: float = 5e-3
    """Rotation quaternions."""
    opacities: float = 5e-2
    """Opacity logits."""
    colors: float = 1e-2
    """Colour logits (``color_mode: sigmoid``) or SH band 0 (``color_mode: sh``)."""
    colors_rest: float = 5e-4
    """Higher SH bands (only when ``sh_degree`` > 0): ``colors`` / 20 as in 3DGS."""
    background: float = 1e-3
    """Solid background colour (only when ``background_learned``)."""


@dataclass
class SplatConfig:
    """A scene of N anisotropic 3D Gaussians inside the sphere of radius ``radius``."""

    radius: float = 1.0
    """The object lives inside this sphere (contract shared with the NeRF scene)."""
    init_num_points: int = 4096
    """Number of random initial Gaussians (ignored when ``init_ply`` is set)."""
    init_radius: float = 0.5
    """Initial points are uniform in the ball of this radius."""
    init_ply: Optional[str] = None
    """Point cloud to start from: ``.ply`` (x y z [red green blue]) or ``.npz`` (``xyz`` [``rgb``])."""
    init_opacity: float = 0.1
    """Initial opacity of every Gaussian, in (0, 1)."""
    init_scale: float = 1.0
    """Initial scale = this × mean distance to the 3 nearest neighbours."""
    init_color: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    """Initial rgb of random points (plus ±``init_color_noise`` uniform noise)."""
    init_color_noise: float = 0.05
    """Half-width of the uniform noise added per channel to ``init_color`` (result clamped to [0, 1])."""
    color_mode: str = "sigmoid"
    """``sigmoid``: colour = sigmoid(param), bounded in (0, 1); ``sh``: spherical-harmonics
    coefficients, colour = 0.5 + SH(dir) clamped at 0 (gsplat/3DGS convention)."""
    sh_degree: int = 0
    """View-dependent colour degree (0..3); > 0 needs ``color_mode: sh``."""
    background_color: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    """Initial (or fixed, without ``background_learned``) solid background rgb, 3 numbers in [0, 1]."""
    background_learned: bool = True
    """Learn the solid background colour (kept in [0, 1] by clamping)."""
    background_random_aug: bool = True
    """In training mode replace the background by a random colour with ``background_random_aug_prob``."""
    background_random_aug_prob: float = 0.5
    """Probability, per training render, of the random background of ``background_random_aug`` (in [0, 1])."""
    background_random_aug_shared: bool = True
    """One random colour for the whole batch (MVDream's ``share_aug_bg``) instead of one per view."""
    backend: str = "auto"
    """``auto`` (gsplat on CUDA when importable, else torch) | ``gsplat`` | ``torch``."""
    near_plane: float = 0.01
    """Gaussians whose camera-space depth is not above this (world units) are culled."""
    far_plane: float = 1e10
    """Gaussians whose camera-space depth is not below this (world units) are culled."""
    eps2d: float = 0.3
    """Dilation added to the 2D covariance (gsplat ``eps2d``, antialiasing off)."""
    tile_size: int = 16
    """Torch backend: side of the square pixel chunks evaluated densely against the Gaussians
    touching them (memory ~ tile_size² × Gaussians per tile; 16 as gsplat's tiles)."""
    max_scale: float = 0.5
    """The ``scale`` regulariser penalises scales above this × ``radius``."""
    chunk_views: int = 1
    """Views rendered per chunk by deferred back-propagation (``method.backprop``): the peak
    autograd graph is this many views' rasterisation; each chunk costs one more rasteriser call."""
    lr: SplatLearningRates = field(default_factory=SplatLearningRates)
    densify: DensifyConfig = field(default_factory=DensifyConfig)

    @staticmethod
    def tiny() -> "SplatConfig":
        """Small CPU preset for tests and the quickstart: 512 Gaussians, torch backend, quick densify."""
        return SplatConfig(
            init_num_points=512,
            backend="torch",
            densify=DensifyConfig(refine_start_iter=20, refine_stop_iter=150, refine_every=20, max_gaussians=2048),
        )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad key."""
        if self.backend not in BACKENDS:
            raise ValueError(f"splats.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.color_mode not in COLOR_MODES:
            raise ValueError(f"splats.color_mode must be one of {COLOR_MODES}, got {self.color_mode!r}")
        if not 0 <= self.sh_degree <= 3:
            raise ValueError(f"splats.sh_degree must be in 0..3, got {self.sh_degree}")
        if self.sh_degree > 0 and self.color_mode != "sh":
            raise ValueError("splats.sh_degree > 0 needs splats.color_mode: sh")
        if self.radius <= 0:
            raise ValueError(f"splats.radius must be > 0, got {self.radius}")
        if not 0 < self.init_radius:
            raise ValueError(f"splats.init_radius must be > 0, got {self.init_radius}")
        if self.init_ply is None and self.init_num_points < 1:
            raise ValueError(f"splats.init_num_points must be >= 1, got {self.init_num_points}")
        if not 0 < self.init_opacity < 1:
            raise ValueError(f"splats.init_opacity must be in (0, 1), got {self.init_opacity}")
        if self.init_scale <= 0:
            raise ValueError(f"splats.init_scale must be > 0, got {self.init_scale}")
        for key in ("init_color", "background_color"):
            value = getattr(self, key)
            if len(value) != 3 or not all(0.0 <= float(v) <= 1.0 for v in value):
                raise ValueError(f"splats.{key} must be 3 numbers in [0, 1], got {list(value)}")
        if not 0 <= self.background_random_aug_prob <= 1:
            raise ValueError(
                f"splats.background_random_aug_prob must be in [0, 1], got {self.background_random_aug_prob}"
            )
        if self.tile_size < 1:
            raise ValueError(f"splats.tile_size must be >= 1, got {self.tile_size}")
        if self.chunk_views < 1:
            raise ValueError(f"splats.chunk_views must be >= 1, got {self.chunk_views}")
        if not 0 < self.near_plane < self.far_plane:
            raise ValueError("splats.near_plane must be > 0 and < splats.far_plane")
