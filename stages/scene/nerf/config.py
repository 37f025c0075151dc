"""Configuration of the NeRF scene (threestudio ``implicit-volume`` + ``nerf-volume-renderer``).

Defaults follow MVDream-threestudio ``configs/mvdream-sd21.yaml`` (hash grid, blob density,
sigmoid albedo, neural environment-map background with ``random_aug``, 512 samples per ray)
and threestudio's class defaults where that config is silent (MLP 64×1, background MLP 16×2
on SH degree 3, point-light material colours, occupancy grid 32³). Only primitives, lists and
nested dataclasses, so ``OmegaConf.structured(NeRFConfig)`` works.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS = ("auto", "torch", "tcnn")
DENSITY_ACTIVATIONS = ("softplus", "exp")
DENSITY_BIASES = ("blob_magic3d", "blob_dreamfusion", "none")
BACKGROUNDS = ("neural", "solid")
NORMAL_TYPES = ("finite_difference", "analytic")


@dataclass
class HashGridConfig:
    """Multi-resolution hash encoding (Instant-NGP / tiny-cuda-nn ``HashGrid``)."""

    n_levels: int = 16
    """Number of resolution levels of the grid; the encoding has n_levels × n_features_per_level features."""
    n_features_per_level: int = 2
    """Features stored per table entry and level: 1, 2, 4 or 8."""
    log2_hashmap_size: int = 19
    """Each level holds at most 2**log2_hashmap_size entries (coarse levels are dense)."""
    base_resolution: int = 16
    """Resolution of the coarsest level (grid points per side of the scene box, >= 2)."""
    per_level_scale: float = 1.447269237440378
    """Growth of the resolution per level; 1.4473 gives a finest resolution of 4096."""
    checkpoint: bool = False
    """Pure-torch backend only: recompute the grid lookups in backward (activation
    checkpointing) to bound memory at large render sizes; costs one extra forward."""


@dataclass
class MLPConfig:
    """threestudio ``VanillaMLP`` (ReLU, bias-free linear layers) used for density and albedo."""

    n_neurons: int = 64
    """Width of each hidden layer."""
    n_hidden_layers: int = 1
    """Number of hidden layers (0: a single linear layer from features to output)."""


@dataclass
class BackgroundConfig:
    kind: str = "neural"
    """``neural`` (MLP on the view direction, SH-encoded) | ``solid`` (constant ``color``)."""
    color: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    """Colour of the ``solid`` background."""
    learned: bool = False
    """``solid`` only: make ``color`` a learnable parameter."""
    sh_degree: int = 3
    """``neural`` only: spherical-harmonics degree of the direction encoding (degree² features, 1..4)."""
    n_neurons: int = 16
    """``neural`` only: width of each hidden layer of the background MLP."""
    n_hidden_layers: int = 2
    """``neural`` only: number of hidden layers of the background MLP."""
    random_aug: bool = True
    """Training only: with probability ``random_aug_prob`` replace the background by a random
    solid colour (MVDream-threestudio sets this; threestudio's class default is False)."""
    random_aug_prob: float = 0.5
    """Probability, per training render, of the random-colour background of ``random_aug`` (in [0, 1])."""
    share_aug_bg: bool = True
    """One random colour for the whole batch (MVDream) instead of one per view."""


@dataclass
class RendererConfig:
    num_samples_per_ray: int = 512
    """Stratified samples between the near/far hits of the bounding sphere."""
    randomized: bool = True
    """Jitter samples within their bins in training mode (midpoints in eval mode)."""
    grid_prune: bool = True
    """Skip samples in cells of a coarse occupancy grid whose density is ~0."""
    grid_resolution: int = 32
    """Cells per side of the occupancy grid over the box [-radius, radius]³ (>= 2)."""
    grid_update_every: int = 16
    """Refresh the occupancy grid every N optimiser steps (called from ``step_pre_backward``)."""
    grid_threshold: float = 0.01
    """A cell stays occupied while ``density * step_size`` (EMA) exceeds min(mean, this)."""
    grid_ema_decay: float = 0.95
    """Each refresh keeps max(previous cell value × this, new value); lower frees emptied cells faster."""
    chunk_samples: int = 1 << 21
    """Bound on the kept samples of one render chunk (whole rays; a chunk holds at most
    max(chunk_samples, num_samples_per_ray)). With deferred back-propagation the peak autograd
    graph is one chunk's, so this bounds the optimiser's memory (~1.7 KB of graph per kept
    sample; at 2²¹ a task peaks at ~6 GiB in phase 2); fewer, larger chunks launch fewer kernels.
    The shipped GPU dataset configs set 2¹⁸, so that 16 tasks share one 80 GB GPU with the
    guidance actors (``python -m benchmarks.memory CONFIG``)."""
    march_block_samples: int = 1 << 23
    """Candidate samples (rays × num_samples_per_ray) tested against the occupancy grid at once
    while planning a render: bounds that step's temporary memory (~70 bytes per candidate)."""


@dataclass
class ShadingConfig:
    """threestudio ``diffuse-with-point-light-material`` + the light sampling of its camera data."""

    ambient_light_color: list[float] = field(default_factory=lambda: [0.1, 0.1, 0.1])
    """Ambient light rgb (3 numbers) added to the lambertian term of ``diffuse`` / ``textureless`` shading."""
    diffuse_light_color: list[float] = field(default_factory=lambda: [0.9, 0.9, 0.9])
    """Point-light rgb (3 numbers) scaled by max(0, n·l) in ``diffuse`` / ``textureless`` shading."""
    light_distance_range: list[float] = field(default_factory=lambda: [0.8, 1.5])
    """Training: distance of the point light from the origin, uniform in [min, max] (world units)."""
    light_position_perturb: float = 1.0
    """Training: light direction = normalize(camera position + N(0, perturb²)) (DreamFusion)."""
    normal_type: str = "finite_difference"
    """``finite_difference`` (threestudio's default: central differences of density with step
    ``finite_difference_eps``, 6 extra density lookups per visible sample; smooth at the scale
    of eps) | ``analytic`` (autograd of the raw density, double backward; exact derivative of
    the trilinear hash cells, so noisier). Measured on CPU, tiny preset, 64² diffuse render
    forward+backward on one thread: finite_difference ≈ 0.55 s, analytic ≈ 0.32 s, albedo
    (no normals) ≈ 0.08 s."""
    finite_difference_eps: float = 0.01
    """Step (world units) of the central differences of ``finite_difference`` normals."""
    normal_min_weight: float = 1e-4
    """Normals are computed only at samples whose compositing weight exceeds this (others get a
    zero normal and contribute < this to the image); 0 computes them at every kept sample."""
    compute_normals: bool = False
    """Compute normals on every render, also ``albedo`` ones (needed by the ``orient`` and
    ``normal_smooth`` regularisers); otherwise only for ``diffuse`` / ``textureless``."""


def _compile_backends() -> list[str]:
    import torch._dynamo

    return torch._dynamo.list_backends(exclude_tags=())


@dataclass
class NeRFConfig:
    radius: float = 1.0
    """The scene lives in the ball of this radius; points are normalised by the box [-r, r]³."""
    backend: str = "auto"
    """Hash-grid backend: ``auto`` (tinycudann when importable and CUDA is available, else
    torch) | ``torch`` | ``tcnn``. Both share one parameter layout, so checkpoints move across."""
    compile: str = "off"
    """``torch.compile`` the pure-torch hash grid + MLPs of the render path: ``off`` | a
    ``torch.compile`` backend (``inductor`` fuses the elementwise index/weight math; needs a C++
    compiler on CPU, Triton on CUDA). Queries are padded to power-of-two sizes (≥ 1024 points),
    so a run compiles one graph per size bucket (about log2(chunk_samples) at most); the first
    call of each bucket pays the compile time. Same values as eager (1e-4 relative)."""
    density_activation: str = "softplus"
    """Raw density (MLP output + ``density_bias``) → σ: ``softplus`` | ``exp``."""
    density_bias: str = "blob_magic3d"
    """Pre-activation density bias: ``blob_magic3d`` scale·(1 − |x|/std), ``blob_dreamfusion``
    scale·exp(−|x|²/(2 std²)), or ``none``."""
    density_blob_scale: float = 10.0
    """``scale`` of the blob ``density_bias`` (the bias at the centre)."""
    density_blob_std: float = 0.5
    """``std`` of the blob ``density_bias`` (world units, > 0)."""
    hash_grid: HashGridConfig = field(default_factory=HashGridConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    renderer: RendererConfig = field(default_factory=RendererConfig)
    shading: ShadingConfig = field(default_factory=ShadingConfig)

    @classmethod
    def tiny(cls) -> "NeRFConfig":
        """A CPU-sized preset for tests and the quickstart (8 levels up to resolution 128,
        2**14 entries, 16-wide MLPs, 24 samples per ray, 8-wide background MLP)."""
        return cls(
            hash_grid=HashGridConfig(
                n_levels=8, n_features_per_level=2, log2_hashmap_size=14, base_resolution=8, per_level_scale=1.4860
            ),
            mlp=MLPConfig(n_neurons=16, n_hidden_layers=1),
            background=BackgroundConfig(n_neurons=8, n_hidden_layers=1),
            renderer=RendererConfig(num_samples_per_ray=24, chunk_samples=1 << 18),
        )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad key (``nerf.<key>``)."""
        checks: list[tuple[bool, str]] = [
            (self.radius > 0, f"nerf.radius must be > 0, got {self.radius}"),
            (self.backend in BACKENDS, f"nerf.backend must be one of {BACKENDS}, got {self.backend!r}"),
            (
                self.density_activation in DENSITY_ACTIVATIONS,
                f"nerf.density_activation must be one of {DENSITY_ACTIVATIONS}, got {self.density_activation!r}",
            ),
            (
                self.density_bias in DENSITY_BIASES,
                f"nerf.density_bias must be one of {DENSITY_BIASES}, got {self.density_bias!r}",
            ),
            (self.density_blob_std > 0, f"nerf.density_blob_std must be > 0, got {self.density_blob_std}"),
            (self.hash_grid.n_levels >= 1, "nerf.hash_grid.n_levels must be >= 1"),
            (
                self.hash_grid.n_features_per_level in (1, 2, 4, 8),
                "nerf.hash_grid.n_features_per_level must be 1, 2, 4 or 8",
            ),
            (1 <= self.hash_grid.log2_hashmap_size <= 30, "nerf.hash_grid.log2_hashmap_size must be in [1, 30]"),
            (self.hash_grid.base_resolution >= 2, "nerf.hash_grid.base_resolution must be >= 2"),
            (self.hash_grid.per_level_scale >= 1.0, "nerf.hash_grid.per_level_scale must be >= 1"),
            (
                self.mlp.n_neurons >= 1 and self.mlp.n_hidden_layers >= 0,
                "nerf.mlp needs n_neurons >= 1 and n_hidden_layers >= 0",
            ),
            (
                self.background.kind in BACKGROUNDS,
                f"nerf.background.kind must be one of {BACKGROUNDS}, got {self.background.kind!r}",
            ),
            (len(self.background.color) == 3, "nerf.background.color must have 3 entries"),
            (1 <= self.background.sh_degree <= 4, "nerf.background.sh_degree must be in [1, 4]"),
            (0.0 <= self.background.random_aug_prob <= 1.0, "nerf.background.random_aug_prob must be in [0, 1]"),
            (self.renderer.num_samples_per_ray >= 1, "nerf.renderer.num_samples_per_ray must be >= 1"),
            (self.renderer.grid_resolution >= 2, "nerf.renderer.grid_resolution must be >= 2"),
            (self.renderer.grid_update_every >= 1, "nerf.renderer.grid_update_every must be >= 1"),
            (self.renderer.chunk_samples >= 1, "nerf.renderer.chunk_samples must be >= 1"),
            (self.renderer.march_block_samples >= 1, "nerf.renderer.march_block_samples must be >= 1"),
            (self.shading.normal_type in NORMAL_TYPES, f"nerf.shading.normal_type must be one of {NORMAL_TYPES}"),
            (len(self.shading.light_distance_range) == 2, "nerf.shading.light_distance_range must be [min, max]"),
            (len(self.shading.ambient_light_color) == 3, "nerf.shading.ambient_light_color must have 3 entries"),
            (len(self.shading.diffuse_light_color) == 3, "nerf.shading.diffuse_light_color must have 3 entries"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.compile != "off" and self.compile not in _compile_backends():
            raise ValueError(f"nerf.compile must be off or a torch.compile backend {_compile_backends()}, got {self.compile!r}")
