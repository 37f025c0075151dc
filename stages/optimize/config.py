"""Configuration of one asset's optimisation (nested dataclasses, OmegaConf-structured friendly).

Defaults are the paper's setting where the paper states one (docs/ARCHITECTURE.md "The method"): 6000 iterations of α·ISD + β·SDS-MVD
with α 0.4→0.8 and β 0.6→0.02. The rest is reconstructed from MVDream-threestudio, on which the
method builds: its timestep anneal, its render schedule (8 views at 64² then 4 views at 256² from
half-way; the paper gives none), AdamW (0.9, 0.99), eps 1e-15. :meth:`OptimizeConfig.tiny` is a CPU-sized
preset for tests and the quickstart. Build from YAML / dotlist overrides with
:func:`load_optimize_config`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from stages.config_loading import Choice, ConfigError, merge_config, read_yaml, to_object
from stages.guidance.losses import LOSS_NAMES, check_loss_name
from stages.guidance.protocol import IPSettings, MVDreamSettings
from stages.optimize.schedules import ScheduleConfig
from stages.scene.base import SHADINGS
from stages.scene.cameras import CameraConfig
from stages.scene.nerf.config import NeRFConfig
from stages.scene.splats.config import SplatConfig


class Representation(Choice):
    """The 3D representation optimised."""

    nerf = "nerf"
    splats = "splats"


class SdBranch(Choice):
    """Reading of ε_SD (:data:`stages.guidance.losses.SD_BRANCHES`)."""

    vanilla = "vanilla"
    ip_null = "ip_null"


class VideoFormat(Choice):
    mp4 = "mp4"
    gif = "gif"


class Backprop(Choice):
    """How renders are back-propagated (see ``OptimizeConfig.backprop``)."""

    auto = "auto"
    deferred = "deferred"
    direct = "direct"


class Preset(Choice):
    """Defaults an optimisation config starts from."""

    paper = "paper"
    tiny = "tiny"


MVDREAM_ONLY = ("mvdream", "sds_mvd")
"""Loss names that use MVDream alone (no SD1.5 / IP-Adapter side)."""
OPTIMIZE_LOSSES = tuple(n for n in LOSS_NAMES if n != "sds_mvd") + MVDREAM_ONLY
"""``method.loss`` stays a string checked by :func:`stages.guidance.losses.check_loss_name`, which
refuses a renamed loss naming its successors (an Enum would only list the current names)."""


@dataclass
class IsdConfig:
    """The SD1.5 + IP-Adapter side (ISD and the other 2D losses); defaults and meaning are
    :class:`~stages.guidance.protocol.IPSettings`' (the loss is ``method.loss``)."""

    sd_branch: SdBranch = SdBranch(IPSettings.sd_branch)
    """Reading of ε_SD: ``vanilla`` (IP scale 0) | ``ip_null`` (adapter with a zero image embedding)."""
    ip_scale: float = IPSettings.ip_scale
    """IP-Adapter scale of the reference-conditioned branch."""
    guidance_scale: float = IPSettings.guidance_scale
    """CFG scale of the SD1.5 / IP-Adapter predictions."""
    cv_guidance_scale: float = IPSettings.cv_guidance_scale
    """The second CFG scale of the CFG-100 ablations: of the IP prediction in ``cv_random_cfg100``
    (the paper's "Rand. noise (CFG 100)"), of the SD control variate in ``cv_sd_cfg100``."""
    delta_t: int = IPSettings.delta_t
    """Timestep offset δt of the ``cv_t_delta_sd`` / ``cv_t_delta_ip`` ablations."""
    view_prompts: bool = IPSettings.view_prompts
    """Append threestudio's view suffix (", front view", ...) to the prompt per view."""
    negative_prompt: str = IPSettings.negative_prompt
    """Negative prompt of the SD1.5 side (threestudio's default: empty)."""


@dataclass
class MvdConfig:
    """The MVDream side (SDS-MVD, Eq. 8); defaults and meaning are
    :class:`~stages.guidance.protocol.MVDreamSettings`' (``n_view`` is ``method.cameras.n_view``)."""

    enabled: bool = True
    """Add β·SDS-MVD to the IP-side loss (ignored for ``loss: mvdream``, which is MVDream alone)."""
    guidance_scale: float = MVDreamSettings.guidance_scale
    """MVDream CFG (MVDream-threestudio: 50)."""
    recon_loss: bool = MVDreamSettings.recon_loss
    """MVDream-threestudio's x0-reconstruction form of SDS."""
    recon_std_rescale: float = MVDreamSettings.recon_std_rescale
    """Blend of the std-rescaled x0 estimate (their default 0.5)."""
    weight: float = 1.0
    """Weight of the MVDream term for ``loss: mvdream`` (threestudio ``lambda_sds``)."""
    negative_prompt: str = MVDreamSettings.negative_prompt
    """Negative prompt of the MVDream side (its unconditional CFG branch); ``""`` uses an empty prompt."""


@dataclass
class OptimizerConfig:
    """AdamW over the scene's parameter groups."""

    lr: dict[str, float] = field(default_factory=dict)
    """Learning-rate overrides by parameter-group name (the scene's ``param_groups`` defaults otherwise)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """AdamW (β1, β2), each in [0, 1)."""
    eps: float = 1e-15
    """AdamW epsilon (> 0)."""
    weight_decay: Optional[float] = None
    """AdamW weight decay; ``None``: 0.01 for NeRF (torch's AdamW default, which
    MVDream-threestudio runs with) and 0 for splats (3DGS / gsplat use plain Adam)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class ShadingConfig:
    """Shading drawn per iteration (threestudio diffuse-with-point-light material)."""

    albedo: float = 1.0
    """Relative probability of ``albedo`` shading (MVDream default: always albedo)."""
    diffuse: float = 0.0
    """Relative probability of lambertian ``diffuse`` shading."""
    textureless: float = 0.0
    """Relative probability of ``textureless`` shading."""
    albedo_only_fraction: float = 0.0
    """Fraction of the run (from the start) that always uses albedo (threestudio ``ambient_only_steps``)."""


@dataclass
class ExportConfig:
    """What :func:`stages.export.export_asset` writes."""

    preview_resolution: int = 256
    """Pixels per side of each view of ``preview.png`` (eight views, 2 × 4 grid)."""
    turntable_frames: int = 60
    """Frames of the turntable video: views evenly spaced over 360° of azimuth."""
    turntable_fps: int = 20
    """Frame rate of the turntable video."""
    turntable_resolution: int = 256
    """Pixels per side of each turntable frame."""
    video_format: VideoFormat = VideoFormat.mp4
    """``mp4`` (falls back to ``gif`` when ffmpeg is missing) | ``gif``."""
    mesh: bool = True
    """Write ``mesh.glb`` + ``mesh.obj``/``mesh.mtl``: marching cubes on the NeRF density, or on the
    splats' summed Gaussian density (DreamGaussian's extraction; the PLY is written either way)."""
    mesh_resolution: int = 128
    """Marching-cubes grid resolution."""
    mesh_threshold: str = "auto"
    """Density iso-level: a number, or ``auto`` (mean + 5 std of the grid, threestudio). Splat
    density is summed opacity, so a number near 1 is DreamGaussian's choice (``density_thresh=1``)."""
    mesh_target_faces: int = 0
    """Decimate the mesh to about this many faces; 0 keeps all."""
    render_chunk: int = 8
    """Views rendered per call while exporting (memory bound)."""


@dataclass
class OptimizeConfig:
    """One asset's optimisation: representation, loss, schedules, optimiser, checkpoints, export."""

    representation: Representation = Representation.nerf
    """What is optimised: a NeRF (``nerf`` section) or 3D Gaussian splats (``splats`` section)."""
    nerf: NeRFConfig = field(default_factory=NeRFConfig)
    splats: SplatConfig = field(default_factory=SplatConfig)
    iterations: int = 6000
    """Optimisation steps; the schedules (α/β, timesteps, milestones) are fractions of it."""
    loss: str = "isd"
    """IP-side loss (α-weighted): ``isd`` | ``sds`` | ``ip_sds``; the control-variate ablations
    ``cv_random`` | ``cv_random_cfg100`` | ``cv_t_delta_sd`` (the paper's Table 3) and
    ``cv_t_delta_ip`` | ``cv_sd_cfg100`` | ``cv_independent_noise`` (extra); or ``mvdream``
    (MVDream SDS alone). README "Losses" gives each formula."""
    isd: IsdConfig = field(default_factory=IsdConfig)
    mvd: MvdConfig = field(default_factory=MvdConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    cameras: CameraConfig = field(default_factory=CameraConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    regularizers: dict[str, float] = field(
        default_factory=lambda: {"sparsity": 0.0, "opaque": 0.0, "orient": 0.0, "normal_smooth": 0.0}
    )
    """Weights of the scene's named regularisation terms (its ``regularizers()``): NeRF
    ``sparsity`` / ``opaque`` / ``orient`` / ``normal_smooth`` (the last two only on renders
    with normals); splats ``opacity`` / ``scale`` / ``outside`` / ``sparsity``. Weight 0 or
    absent: unused (MVDream-threestudio sets all to 0)."""
    shading: ShadingConfig = field(default_factory=ShadingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    checkpoint_every: int = 500
    """Write a resumable checkpoint every N iterations (0: only at the end)."""
    preview_every: int = 500
    """Render preview views for the callback every N iterations (0: never); the dataset pipeline
    logs them to the asset's MLflow run as they are made (the one-asset CLI passes no callback)."""
    preview_resolution: int = 128
    """Pixels per side of the preview views passed to the callback every ``preview_every`` iterations."""
    device: str = "auto"
    """``auto`` (cuda when available) | ``cpu`` | ``cuda`` | ``cuda:N``."""
    progress: bool = False
    """Show a tqdm progress bar."""
    backprop: Backprop = Backprop.auto
    """How renders are back-propagated: ``deferred`` (render once without autograd, ask the
    guidance, then render again chunk by chunk with autograd, each chunk back-propagated at once:
    the peak graph is one chunk's, NeRF ``renderer.chunk_samples`` samples or splats
    ``chunk_views`` views, for one extra forward), ``direct`` (one render with its whole graph
    alive), or ``auto``: deferred for scenes that support it (NeRF, splats), else direct. Both
    give the same gradients up to float rounding."""

    @staticmethod
    def tiny(representation: str = "nerf") -> "OptimizeConfig":
        """CPU-sized preset: 100 iterations at 32² with 4 views, tiny scene, small exports."""
        cfg = OptimizeConfig(representation=Representation(representation), iterations=100)
        cfg.nerf = _tiny_or_default(NeRFConfig)
        cfg.splats = _tiny_or_default(SplatConfig)
        cfg.schedule = ScheduleConfig(milestones=[0.5], resolutions=[32, 32], batch_sizes=[4, 4])
        cfg.checkpoint_every = 50
        cfg.preview_every = 100  # a preview costs about one iteration: 1 % here (benchmarks.tracking)
        cfg.preview_resolution = 32
        cfg.export = ExportConfig(
            preview_resolution=64, turntable_frames=12, turntable_fps=12, turntable_resolution=64, mesh_resolution=48
        )
        cfg.device = "cpu"
        return cfg

    def weight_decay(self) -> float:
        """The AdamW weight decay of this representation (see ``optimizer.weight_decay``)."""
        if self.optimizer.weight_decay is not None:
            return float(self.optimizer.weight_decay)
        return 0.01 if self.representation == "nerf" else 0.0

    def scene_config(self) -> NeRFConfig | SplatConfig:
        """The config of the chosen representation."""
        return self.nerf if self.representation == "nerf" else self.splats

    @property
    def uses_ip(self) -> bool:
        """Whether the SD1.5 / IP-Adapter guidance is needed."""
        return self.loss not in MVDREAM_ONLY

    @property
    def uses_mvd(self) -> bool:
        """Whether the MVDream guidance is needed."""
        return self.loss in MVDREAM_ONLY or self.mvd.enabled

    def ip_settings(self) -> IPSettings:
        """What the IP-side guidance answers this asset with (``method.loss`` + ``method.isd``)."""
        isd = self.isd
        return IPSettings(
            loss=str(self.loss), guidance_scale=float(isd.guidance_scale), ip_scale=float(isd.ip_scale),
            sd_branch=str(isd.sd_branch), cv_guidance_scale=float(isd.cv_guidance_scale), delta_t=int(isd.delta_t),
            view_prompts=bool(isd.view_prompts), negative_prompt=str(isd.negative_prompt),
        )

    def mvd_settings(self) -> MVDreamSettings:
        """What the MVDream guidance answers this asset with (``method.mvd`` + ``cameras.n_view``)."""
        mvd = self.mvd
        return MVDreamSettings(
            guidance_scale=float(mvd.guidance_scale), recon_loss=bool(mvd.recon_loss),
            recon_std_rescale=float(mvd.recon_std_rescale), n_view=int(self.cameras.n_view),
            negative_prompt=str(mvd.negative_prompt),
        )

    def guidance_settings(self) -> dict[str, IPSettings | MVDreamSettings]:
        """The settings of each guidance family this method uses (registered once per asset)."""
        settings: dict[str, IPSettings | MVDreamSettings] = {}
        if self.uses_ip:
            settings["ip"] = self.ip_settings()
        if self.uses_mvd:
            settings["mvd"] = self.mvd_settings()
        return settings

    def validate(self) -> "OptimizeConfig":
        """Raise ``ValueError`` naming the first bad key (``method.<key> ...``); returns self."""
        p = "method"
        if int(self.iterations) <= 0:
            raise ValueError(f"{p}.iterations must be > 0, got {self.iterations}")
        try:
            check_loss_name(self.loss, OPTIMIZE_LOSSES)
        except ValueError as error:
            raise ValueError(f"{p}.loss: {error}") from None
        for key, value in (
            ("isd.ip_scale", self.isd.ip_scale),
            ("isd.guidance_scale", self.isd.guidance_scale),
            ("isd.cv_guidance_scale", self.isd.cv_guidance_scale),
            ("mvd.guidance_scale", self.mvd.guidance_scale),
            ("mvd.weight", self.mvd.weight),
        ):
            _require(math.isfinite(float(value)) and float(value) >= 0, f"{p}.{key} must be a finite number >= 0, got {value}")
        _require(0 <= self.mvd.recon_std_rescale <= 1, f"{p}.mvd.recon_std_rescale must be in [0, 1], got {self.mvd.recon_std_rescale}")
        _require(int(self.isd.delta_t) >= 0, f"{p}.isd.delta_t must be >= 0, got {self.isd.delta_t}")
        self._validate_schedule(p)
        self.cameras.validate(f"{p}.cameras")
        scene_validate = getattr(self.scene_config(), "validate", None)
        if callable(scene_validate):
            try:
                scene_validate()
            except ValueError as error:  # "nerf.x ..." / "splats.x ..." → "method.nerf.x ..."
                message = str(error)
                raise ValueError(message if message.startswith(p) else f"{p}.{message}") from error
        for key, weight in self.regularizers.items():
            _require(math.isfinite(float(weight)) and float(weight) >= 0, f"{p}.regularizers.{key} must be >= 0, got {weight}")
        opt = self.optimizer
        for key, lr in opt.lr.items():
            _require(math.isfinite(float(lr)) and float(lr) >= 0, f"{p}.optimizer.lr.{key} must be >= 0, got {lr}")
        _require(len(opt.betas) == 2 and all(0 <= b < 1 for b in opt.betas), f"{p}.optimizer.betas must be two numbers in [0, 1), got {list(opt.betas)}")
        _require(opt.eps > 0, f"{p}.optimizer.eps must be > 0, got {opt.eps}")
        _require(opt.weight_decay is None or opt.weight_decay >= 0, f"{p}.optimizer.weight_decay must be >= 0, got {opt.weight_decay}")
        _require(opt.grad_clip >= 0, f"{p}.optimizer.grad_clip must be >= 0 (0 disables), got {opt.grad_clip}")
        probs = [self.shading.albedo, self.shading.diffuse, self.shading.textureless]
        for name, value in zip(SHADINGS, probs):
            _require(value >= 0, f"{p}.shading.{name} must be >= 0, got {value}")
        _require(sum(probs) > 0, f"{p}.shading: albedo + diffuse + textureless must be > 0")
        _require(0 <= self.shading.albedo_only_fraction <= 1, f"{p}.shading.albedo_only_fraction must be in [0, 1], got {self.shading.albedo_only_fraction}")
        _require(self.checkpoint_every >= 0, f"{p}.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        _require(self.preview_every >= 0, f"{p}.preview_every must be >= 0, got {self.preview_every}")
        _require(self.preview_resolution > 0, f"{p}.preview_resolution must be > 0, got {self.preview_resolution}")
        ex = self.export
        for key in ("preview_resolution", "turntable_frames", "turntable_fps", "turntable_resolution", "mesh_resolution", "render_chunk"):
            _require(int(getattr(ex, key)) > 0, f"{p}.export.{key} must be > 0, got {getattr(ex, key)}")
        _require(int(ex.mesh_target_faces) >= 0, f"{p}.export.mesh_target_faces must be >= 0, got {ex.mesh_target_faces}")
        return self

    def _validate_schedule(self, p: str) -> None:
        s = self.schedule
        try:
            s.validate()
        except ValueError as error:  # re-word "ScheduleConfig.x" as the config key
            raise ValueError(str(error).replace("ScheduleConfig.", f"{p}.schedule.")) from error
        for key in ("alpha_start", "alpha_end", "beta_start", "beta_end"):
            value = float(getattr(s, key))
            _require(0.0 <= value <= 1.0, f"{p}.schedule.{key} must be in [0, 1], got {value}")
        for batch in s.batch_sizes:
            _require(int(batch) % self.cameras.n_view == 0, f"{p}.schedule.batch_sizes must be multiples of cameras.n_view={self.cameras.n_view}, got {list(s.batch_sizes)}")

    def resume_digest(self) -> str:
        """Digest of the fields that change the optimisation result (a checkpoint written under
        another value of these cannot be resumed); logging, export and device are left out.
        Asset ids use :func:`stages.optimize.identity.identity_digest`."""
        from stages.digest import digest

        return digest(without_runtime_keys(asdict(self)), 16, compact=False)


RUNTIME_KEYS = (
    "checkpoint_every", "preview_every", "preview_resolution", "device", "progress", "export", "backprop",
    "nerf.compile", "nerf.renderer.chunk_samples", "nerf.renderer.march_block_samples", "splats.chunk_views",
)
"""Keys (dotted: nested) that do not change the optimised scene. ``backprop``, ``compile`` and the
render chunks only up to float rounding: they trade memory for speed, so lowering one to fit a GPU
keeps asset ids and checkpoints."""


def without_runtime_keys(fields: dict[str, Any]) -> dict[str, Any]:
    """``asdict(OptimizeConfig)`` without :data:`RUNTIME_KEYS` (a copy)."""
    out = copy.deepcopy(fields)
    for key in RUNTIME_KEYS:
        *parents, leaf = key.split(".")
        node = out
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return out


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _tiny_or_default(cls: type) -> Any:
    tiny = getattr(cls, "tiny", None)
    return tiny() if callable(tiny) else cls()


def load_optimize_config(
    source: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = (), base: OptimizeConfig | None = None
) -> OptimizeConfig:
    """``base`` (default: paper defaults) ← YAML file / mapping ``source`` ← ``key=value`` overrides.

    A YAML file may hold the keys at top level or under ``method:``. The special override
    ``preset=tiny`` (or ``preset: tiny`` in the file) starts from :meth:`OptimizeConfig.tiny`.
    Unknown keys and bad values raise :class:`~stages.config_loading.ConfigError` (a
    ``ValueError``) naming them as ``method.<key>``; the result is validated.
    """
    from omegaconf import OmegaConf

    name = str(source) if isinstance(source, (str, Path)) else "method config"
    if source is None:
        file_cfg = OmegaConf.create({})
    elif isinstance(source, (str, Path)):
        file_cfg = read_yaml(source, what="method config")
    else:
        file_cfg = OmegaConf.create(dict(source)) if not OmegaConf.is_config(source) else source.copy()
    if "method" in file_cfg:
        file_cfg = file_cfg.method
    dotlist = OmegaConf.from_dotlist([o for o in overrides if o.split("=", 1)[0] == "preset"])
    preset = dotlist.get("preset", None) or file_cfg.pop("preset", None)
    rest = [o for o in overrides if o.split("=", 1)[0] != "preset"]
    if base is None:
        base = OptimizeConfig.tiny() if Preset.parse(preset or Preset.paper, "method.preset") == Preset.tiny else OptimizeConfig()
    merged = merge_config(base, file_cfg, overrides=rest, source=name, key_prefix="method.")
    config: OptimizeConfig = to_object(merged, name, key_prefix="method.")
    try:
        return config.validate()
    except ValueError as error:
        raise ConfigError(f"{name}: config key {error}") from None


def save_method_config(config: OptimizeConfig, path: Path | str) -> Path:
    """Write ``config`` as OmegaConf YAML (:func:`~stages.atomic.atomic_write`);
    :func:`load_optimize_config` reads it back, so evaluation can rebuild the scene that
    ``checkpoint.pt`` belongs to."""
    from omegaconf import OmegaConf

    from stages.atomic import atomic_write

    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(config)), encoding="utf-8")
    return path
