"""The guidance protocol: the only coupling between a per-asset optimiser and the models.

docs/ARCHITECTURE.md "Guidance actor protocol". An optimiser registers its asset ONCE per guidance
family with that family's frozen settings (:class:`IPSettings` for the SD1.5 + IP-Adapter side,
:class:`MVDreamSettings` for the multi-view side), then every iteration sends a
:class:`GuidanceRequest` that carries only what changes per step (detached renders in [0, 1],
timesteps, a noise seed, the cameras) and receives a :class:`GuidanceResponse` whose ``grad_rgb``
is dL/d(rgb). It then calls ``rgb.backward(grad_rgb * weight)``; a plain gradient-descent
optimiser therefore moves the renders *against* ``grad_rgb``.

The same protocol is served in-process (tests, single-asset CLI) and by Ray actors that
batch requests from many assets into one model forward (``pipeline``). The settings' defaults are
the method's defaults: ``stages.optimize.config`` refers to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, Sequence, Union, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from stages.guidance.losses import SD_BRANCHES, check_loss_name

NUM_TRAIN_TIMESTEPS = 1000
"""Discrete diffusion timesteps of SD1.5 / SD2.1 / MVDream; ``t`` lives in [0, 1000)."""

Family = Literal["ip", "mvd"]
"""Which side of the method a request belongs to: ``ip`` (SD1.5 + IP-Adapter) or ``mvd`` (MVDream)."""

MVDREAM_NEGATIVE_PROMPT = (
    "ugly, bad anatomy, blurry, pixelated obscure, unnatural colors, poor lighting, dull, and unclear, "
    "cropped, lowres, low quality, artifacts, duplicate, morbid, mutilated, poorly drawn face, deformed, "
    "dehydrated, bad proportions"
)
"""MVDream-threestudio's negative prompt (``configs/mvdream-sd21.yaml``)."""


class UnknownAssetError(KeyError):
    """A request names an asset that this guidance has not registered.

    Raised after a Ray actor restart (its registry is gone): the client
    (``pipeline.clients.ActorGuidance``) registers the asset again and repeats the request.
    """


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _non_negative(owner: str, **values: float) -> None:
    for name, value in values.items():
        _check(math.isfinite(float(value)) and float(value) >= 0, f"{owner}.{name} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class IPSettings:
    """How the SD1.5 + IP-Adapter side answers one asset (given once, at ``register``)."""

    family: ClassVar[Family] = "ip"
    loss: str = "isd"
    """The 2D loss (``stages.guidance.losses.LOSS_NAMES``; ``sds_mvd`` is plain SDS here)."""
    guidance_scale: float = 7.5
    """CFG scale of the SD1.5 / IP-Adapter predictions."""
    ip_scale: float = 0.5
    """IP-Adapter scale of the reference-conditioned (and null-image) evaluations."""
    sd_branch: str = "vanilla"
    """Reading of ε_SD: ``vanilla`` (IP scale 0) | ``ip_null`` (adapter with a zero image embedding)."""
    cv_guidance_scale: float = 100.0
    """The second CFG scale of the CFG-100 ablations: of the IP prediction in ``cv_random_cfg100``
    (the paper's "Rand. noise (CFG 100)"), of the SD control variate in ``cv_sd_cfg100``."""
    delta_t: int = 50
    """Timestep offset δt of the ``cv_t_delta_sd`` / ``cv_t_delta_ip`` ablations."""
    view_prompts: bool = True
    """Append threestudio's view suffix (", front view", ...) to the prompt per view (needs the
    request's elevation and azimuth)."""
    negative_prompt: str = ""
    """Negative prompt of the SD1.5 side (threestudio's default: empty)."""

    def __post_init__(self) -> None:
        try:
            check_loss_name(self.loss)
        except ValueError as error:
            raise ValueError(f"IPSettings.loss: {error}") from None
        _check(self.sd_branch in SD_BRANCHES, f"IPSettings.sd_branch must be one of {SD_BRANCHES}, got {self.sd_branch!r}")
        _non_negative("IPSettings", guidance_scale=self.guidance_scale, ip_scale=self.ip_scale, cv_guidance_scale=self.cv_guidance_scale)
        _check(
            isinstance(self.delta_t, int) and not isinstance(self.delta_t, bool) and 0 <= self.delta_t < NUM_TRAIN_TIMESTEPS,
            f"IPSettings.delta_t must be an int in [0, {NUM_TRAIN_TIMESTEPS}), got {self.delta_t!r}",
        )


@dataclass(frozen=True)
class MVDreamSettings:
    """How the multi-view (MVDream SDS, Eq. 8) side answers one asset (given once, at ``register``)."""

    family: ClassVar[Family] = "mvd"
    guidance_scale: float = 50.0
    """MVDream CFG (MVDream-threestudio: 50)."""
    recon_loss: bool = True
    """MVDream-threestudio's x0-reconstruction form of SDS (False: plain SDS)."""
    recon_std_rescale: float = 0.5
    """Blend of the std-rescaled x0 estimate (their default 0.5), in [0, 1]."""
    n_view: int = 4
    """Views per group that share a timestep and attend to each other."""
    negative_prompt: str = MVDREAM_NEGATIVE_PROMPT
    """Negative prompt of the MVDream side (its unconditional CFG branch); ``""``: an empty prompt."""

    def __post_init__(self) -> None:
        _non_negative("MVDreamSettings", guidance_scale=self.guidance_scale)
        _check(0.0 <= self.recon_std_rescale <= 1.0, f"MVDreamSettings.recon_std_rescale must be in [0, 1], got {self.recon_std_rescale}")
        _check(int(self.n_view) >= 1, f"MVDreamSettings.n_view must be >= 1, got {self.n_view}")


GuidanceSettings = Union[IPSettings, MVDreamSettings]
SETTINGS: dict[str, type] = {"ip": IPSettings, "mvd": MVDreamSettings}
"""The settings class of each family."""


def settings_for(family: Family, settings: GuidanceSettings | None) -> GuidanceSettings:
    """``settings`` checked against ``family`` (None: the family's defaults)."""
    if family not in SETTINGS:
        raise ValueError(f"unknown guidance family {family!r}; expected one of {tuple(SETTINGS)}")
    if settings is None:
        return SETTINGS[family]()
    if not isinstance(settings, SETTINGS[family]):
        raise TypeError(f"the {family!r} guidance family takes {SETTINGS[family].__name__}, got {type(settings).__name__}")
    return settings


@dataclass
class GuidanceRequest:
    """One optimiser step's ask for image-space gradients: only what changes per step.

    ``rgb`` in [0, 1]; ``timesteps`` integers in [0, NUM_TRAIN_TIMESTEPS); ``c2w``
    camera-to-world (OpenGL/Blender convention, camera looks along -z); ``elevation`` /
    ``azimuth`` in degrees; ``fovy`` vertical field of view in radians. ``family`` names the
    registered settings that answer it (a guidance may serve both sides of an asset).

    ``seed`` seeds the noise of this request alone (a CPU ``torch.Generator``), so the
    response does not depend on which other requests share the batch.
    """

    asset_id: str
    rgb: Float[Tensor, "batch 3 height width"]
    timesteps: Int[Tensor, " batch"]
    seed: int
    family: Family = "ip"
    c2w: Float[Tensor, "batch 4 4"] | None = None
    elevation: Float[Tensor, " batch"] | None = None
    azimuth: Float[Tensor, " batch"] | None = None
    fovy: Float[Tensor, " batch"] | None = None

    def __post_init__(self) -> None:
        validate_request(self)


@dataclass
class GuidanceResponse:
    """``grad_rgb`` has the shape and dtype of the request's ``rgb`` and lives on the CPU.

    ``loss`` is the usual SDS surrogate ``0.5 * ||grad_latent||^2 / B`` (for logging only),
    ``grad_norm`` the L2 norm of the latent-space gradient, ``timesteps`` the t used.
    """

    asset_id: str
    grad_rgb: Float[Tensor, "batch 3 height width"]
    loss: float
    grad_norm: float
    timesteps: Int[Tensor, " batch"]
    info: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Guidance(Protocol):
    """What an optimiser needs from a guidance model (in-process object or Ray actor).

    Optional attribute ``concurrent_calls`` (default False): True when ``grad`` is remote and
    may run on another thread while a second guidance answers, so
    :meth:`stages.guidance.set.GuidanceSet.ask` asks the IP and MVDream guidance at once
    (``pipeline.clients.ActorGuidance``).
    """

    def register(
        self, asset_id: str, prompt: str, reference: Any | None = None, settings: GuidanceSettings | None = None
    ) -> None:
        """Encode the prompt (and reference image) once and keep the asset's ``settings`` (None: the
        family's defaults); idempotent for the same inputs, new settings replace the old ones.
        A guidance serving both families keeps one registration per (asset, family)."""

    def release(self, asset_id: str) -> None:
        """Forget an asset (every family); unknown ids are ignored."""

    def grad(self, requests: Sequence[GuidanceRequest]) -> list[GuidanceResponse]:
        """Answer a batch of requests (possibly from different assets) in one model forward."""


def validate_request(request: GuidanceRequest) -> None:
    """Raise ``ValueError`` naming the field when a request is malformed."""
    rgb = request.rgb
    if not isinstance(rgb, Tensor) or rgb.ndim != 4 or rgb.shape[1] != 3:
        shape = tuple(rgb.shape) if isinstance(rgb, Tensor) else type(rgb).__name__
        raise ValueError(f"GuidanceRequest.rgb must be a (B, 3, H, W) tensor, got {shape}")
    if not rgb.is_floating_point():
        raise ValueError(f"GuidanceRequest.rgb must be floating point, got {rgb.dtype}")
    batch = rgb.shape[0]
    t = request.timesteps
    if not isinstance(t, Tensor) or t.shape != (batch,):
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"GuidanceRequest.timesteps must have shape ({batch},), got {shape}")
    if t.is_floating_point():
        raise ValueError(f"GuidanceRequest.timesteps must be integers, got {t.dtype}")
    if batch and (int(t.min()) < 0 or int(t.max()) >= NUM_TRAIN_TIMESTEPS):
        raise ValueError(
            f"GuidanceRequest.timesteps out of range [0, {NUM_TRAIN_TIMESTEPS}): "
            f"min {int(t.min())}, max {int(t.max())}"
        )
    if request.c2w is not None and tuple(request.c2w.shape) != (batch, 4, 4):
        raise ValueError(
            f"GuidanceRequest.c2w must have shape ({batch}, 4, 4), got {tuple(request.c2w.shape)}"
        )
    for name in ("elevation", "azimuth", "fovy"):
        value = getattr(request, name)
        if value is not None and tuple(value.shape) != (batch,):
            raise ValueError(
                f"GuidanceRequest.{name} must have shape ({batch},), got {tuple(value.shape)}"
            )
    if request.family not in SETTINGS:
        raise ValueError(f"GuidanceRequest.family must be one of {tuple(SETTINGS)}, got {request.family!r}")


def request_noise(seed: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Float[Tensor, "..."]:
    """The request's own Gaussian noise, drawn on the CPU so it is device- and batch-independent."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(dtype)
