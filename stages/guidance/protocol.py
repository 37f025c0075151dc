"""The guidance protocol: the only coupling between a per-asset optimiser and the models.

See DESIGN.md "Guidance actor protocol". An optimiser registers its asset once, then every
iteration sends a :class:`GuidanceRequest` (detached renders in [0, 1]) and receives a
:class:`GuidanceResponse` whose ``grad_rgb`` is dL/d(rgb). It then calls
``rgb.backward(grad_rgb * weight)``; a plain gradient-descent optimiser therefore moves the
renders *against* ``grad_rgb``.

The same protocol is served in-process (tests, single-asset CLI) and by Ray actors that
batch requests from many assets into one model forward (``pipeline``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
"""Discrete diffusion timesteps of SD1.5 / SD2.1 / MVDream; ``t`` lives in [0, 1000)."""


class UnknownAssetError(KeyError):
    """A request names an asset that this guidance has not registered.

    Raised after a Ray actor restart (its registry is gone): the client re-registers the
    asset and sends the request again.
    """


@dataclass
class GuidanceRequest:
    """One optimiser step's ask for image-space gradients.

    Shapes: ``rgb`` (B, 3, H, W) in [0, 1]; ``timesteps`` (B,) integers in
    [0, NUM_TRAIN_TIMESTEPS); ``c2w`` (B, 4, 4) camera-to-world (OpenGL/Blender convention,
    camera looks along -z); ``elevation`` / ``azimuth`` (B,) in degrees.

    ``seed`` seeds the noise of this request alone (a CPU ``torch.Generator``), so the
    response does not depend on which other requests share the batch.
    """

    asset_id: str
    rgb: Tensor
    timesteps: Tensor
    seed: int
    loss: str = "isd"
    guidance_scale: float = 7.5
    ip_scale: float = 0.5
    c2w: Tensor | None = None
    elevation: Tensor | None = None
    azimuth: Tensor | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_request(self)


@dataclass
class GuidanceResponse:
    """``grad_rgb`` has the shape and dtype of the request's ``rgb`` and lives on the CPU.

    ``loss`` is the usual SDS surrogate ``0.5 * ||grad_latent||^2 / B`` (for logging only),
    ``grad_norm`` the L2 norm of the latent-space gradient, ``timesteps`` the t used.
    """

    asset_id: str
    grad_rgb: Tensor
    loss: float
    grad_norm: float
    timesteps: Tensor
    info: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Guidance(Protocol):
    """What an optimiser needs from a guidance model (in-process object or Ray actor).

    Optional attribute ``concurrent_calls`` (default False): True when ``grad`` is remote and
    may run on another thread while a second guidance answers, so the optimiser asks its IP and
    MVDream guidance at once (``pipeline.clients.ActorGuidance``).
    """

    def register(
        self,
        asset_id: str,
        prompt: str,
        reference: Any | None = None,
        negative_prompt: str = "",
    ) -> None:
        """Encode the prompt (and reference image) once; idempotent for the same asset_id."""

    def release(self, asset_id: str) -> None:
        """Forget an asset's cached embeddings; unknown ids are ignored."""

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
    for name in ("elevation", "azimuth"):
        value = getattr(request, name)
        if value is not None and tuple(value.shape) != (batch,):
            raise ValueError(
                f"GuidanceRequest.{name} must have shape ({batch},), got {tuple(value.shape)}"
            )
    if request.guidance_scale < 0:
        raise ValueError(f"GuidanceRequest.guidance_scale must be >= 0, got {request.guidance_scale}")
    if request.ip_scale < 0:
        raise ValueError(f"GuidanceRequest.ip_scale must be >= 0, got {request.ip_scale}")


def request_noise(seed: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """The request's own Gaussian noise, drawn on the CPU so it is device- and batch-independent."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(dtype)
