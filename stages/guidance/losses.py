"""Score-distillation losses as data: which noise predictions each needs, and how to combine them.

A loss is a :class:`LossSpec`: the UNet evaluations it needs (text cond/uncond, image
prompt ref/null/none, timestep t or t+δt, shared or independent noise) and a ``residual``
that turns those predictions into the noise residual r. The latent-space gradient is
``w(t) * r``; a guidance model back-propagates it through its VAE encoder to get grad_rgb.

Keeping the evaluations as data lets one guidance object put every evaluation of every
request of a batch into ONE UNet forward (per-sample IP scale), and lets the analytic
teacher (``stages.teacher``) evaluate exactly the same losses in closed form.

Names (see DESIGN.md and README "Losses"):

========== =====================================================================
sds        ε_SD^cfg − ε                               (plain SDS, no image prompt)
ip_sds     ε_IP^cfg − ε                               (IP-Adapter SDS)
isd        ε_IP^cfg − ε_SD^cfg                        (ModeDreamer Eq. 7)
sds_mvd    ε_MVD^cfg − ε                              (MVDream SDS, Eq. 8; CFG 50)
cv_random  ε_IP^cfg − ε  at CFG ``guidance_scale`` (7.5): random noise as control variate
cv_cfg100  ε_IP^cfg − ε_SD^cfg100: the SD control variate taken at CFG ``cv_guidance_scale``
cv_t_delta ε_IP^cfg(x_t, t) − ε_IP^cfg(x_{t+δt}, t+δt): the same UNet at a nearby timestep
cv_same_t  (ε_IP^cfg(x_t) − ε) − (ε_SD^cfg(x'_t) − ε'): SD control variate at the same t
           but on an independently noised x'_t (no shared noise, so no correlation gain)
========== =====================================================================

``isd`` has two readings of ε_SD (DESIGN.md): ``sd_branch="vanilla"`` (IP scale 0: four
evaluations) and ``sd_branch="ip_null"`` (the adapter with a zero image embedding, sharing
the unconditional branch, so ε_IP^cfg − ε_SD^cfg = s·(e(y, ref) − e(y, null)): two
evaluations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

TextCond = Literal["cond", "uncond"]
ImageCond = Literal["ref", "null", "none"]
"""``ref``: IP-Adapter with the reference image embedding at the request's IP scale;
``null``: IP-Adapter with a zero image embedding at the request's IP scale;
``none``: IP scale 0, i.e. the vanilla UNet (also the only choice for models without IP)."""
TimestepChoice = Literal["t", "t_delta"]
NoiseChoice = Literal["shared", "independent"]

SD_BRANCHES = ("vanilla", "ip_null")


@dataclass(frozen=True)
class Evaluation:
    """One noise prediction a loss needs."""

    text: TextCond
    image: ImageCond = "none"
    timestep: TimestepChoice = "t"
    noise: NoiseChoice = "shared"


@dataclass(frozen=True)
class LossParams:
    """Scalars a residual may use (from the request: guidance_scale, options)."""

    guidance_scale: float = 7.5
    cv_guidance_scale: float = 100.0


Residual = Callable[[Sequence[Tensor], Tensor, Tensor | None, LossParams], Tensor]
"""(predictions in evaluation order, shared noise ε, independent noise ε' or None, params) → r."""


@dataclass(frozen=True)
class LossSpec:
    name: str
    evaluations: tuple[Evaluation, ...]
    residual: Residual
    uses_image_prompt: bool

    @property
    def needs_independent_noise(self) -> bool:
        return any(e.noise == "independent" for e in self.evaluations)

    @property
    def needs_t_delta(self) -> bool:
        return any(e.timestep == "t_delta" for e in self.evaluations)


def cfg(eps_cond: Tensor, eps_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ε_u + s·(ε_c − ε_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


_COND = Evaluation("cond", "none")
_UNCOND = Evaluation("uncond", "none")
_IP_COND = Evaluation("cond", "ref")
_IP_UNCOND = Evaluation("uncond", "null")  # IP pipelines use a zero image embedding for uncond


def _sds(p: Sequence[Tensor], noise: Tensor, _n2: Tensor | None, k: LossParams) -> Tensor:
    return cfg(p[0], p[1], k.guidance_scale) - noise


def _isd_vanilla(p: Sequence[Tensor], _n: Tensor, _n2: Tensor | None, k: LossParams) -> Tensor:
    return cfg(p[0], p[1], k.guidance_scale) - cfg(p[2], p[3], k.guidance_scale)


def _isd_ip_null(p: Sequence[Tensor], _n: Tensor, _n2: Tensor | None, k: LossParams) -> Tensor:
    return k.guidance_scale * (p[0] - p[1])


def _cv_cfg100(p: Sequence[Tensor], _n: Tensor, _n2: Tensor | None, k: LossParams) -> Tensor:
    return cfg(p[0], p[1], k.guidance_scale) - cfg(p[2], p[3], k.cv_guidance_scale)


def _cv_same_t(p: Sequence[Tensor], noise: Tensor, noise2: Tensor | None, k: LossParams) -> Tensor:
    if noise2 is None:
        raise ValueError("cv_same_t needs an independent noise draw")
    return (cfg(p[0], p[1], k.guidance_scale) - noise) - (cfg(p[2], p[3], k.guidance_scale) - noise2)


def loss_spec(name: str, sd_branch: str = "vanilla") -> LossSpec:
    """The :class:`LossSpec` called ``name``; ``sd_branch`` picks the reading of ε_SD."""
    if sd_branch not in SD_BRANCHES:
        raise ValueError(f"unknown isd.sd_branch {sd_branch!r}; expected one of {SD_BRANCHES}")
    if name in ("sds", "sds_mvd"):
        return LossSpec(name, (_COND, _UNCOND), _sds, uses_image_prompt=False)
    if name in ("ip_sds", "cv_random"):
        return LossSpec(name, (_IP_COND, _IP_UNCOND), _sds, uses_image_prompt=True)
    if name == "isd" and sd_branch == "vanilla":
        return LossSpec(name, (_IP_COND, _IP_UNCOND, _COND, _UNCOND), _isd_vanilla, True)
    if name == "isd":
        return LossSpec(name, (_IP_COND, Evaluation("cond", "null")), _isd_ip_null, True)
    if name == "cv_cfg100":
        return LossSpec(name, (_IP_COND, _IP_UNCOND, _COND, _UNCOND), _cv_cfg100, True)
    if name == "cv_t_delta":
        shifted = (Evaluation("cond", "ref", "t_delta"), Evaluation("uncond", "null", "t_delta"))
        return LossSpec(name, (_IP_COND, _IP_UNCOND, *shifted), _isd_vanilla, True)
    if name == "cv_same_t":
        independent = (
            Evaluation("cond", "none", noise="independent"),
            Evaluation("uncond", "none", noise="independent"),
        )
        return LossSpec(name, (_IP_COND, _IP_UNCOND, *independent), _cv_same_t, True)
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSS_NAMES}")


LOSS_NAMES = ("isd", "sds", "ip_sds", "sds_mvd", "cv_random", "cv_cfg100", "cv_t_delta", "cv_same_t")


def sds_weight(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """w(t) = 1 − ᾱ_t (threestudio's "sds" weighting), shape (B,)."""
    return 1.0 - alphas_cumprod.to(timesteps.device)[timesteps]


def add_noise(x0: Tensor, noise: Tensor, alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε with one t per sample."""
    a = alphas_cumprod.to(x0.device, torch.float32)[timesteps].view(-1, *([1] * (x0.ndim - 1)))
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def shifted_timesteps(timesteps: Tensor, delta_t: int, num_train_timesteps: int = 1000) -> Tensor:
    """t + δt clamped into the valid range (for ``cv_t_delta``)."""
    return (timesteps + int(delta_t)).clamp(0, num_train_timesteps - 1)


def latent_gradient(
    spec: LossSpec,
    predictions: Sequence[Tensor],
    noise: Tensor,
    weight: Tensor,
    params: LossParams,
    independent_noise: Tensor | None = None,
) -> Tensor:
    """w(t)·r for one request: ``predictions`` in ``spec.evaluations`` order, each (B, C, h, w)."""
    if len(predictions) != len(spec.evaluations):
        raise ValueError(
            f"loss {spec.name!r} needs {len(spec.evaluations)} predictions, got {len(predictions)}"
        )
    residual = spec.residual(predictions, noise, independent_noise, params)
    return weight.view(-1, *([1] * (residual.ndim - 1))).to(residual) * residual


def surrogate_loss(grad_latent: Tensor) -> Tensor:
    """0.5·||w·r||² / B: the usual SDS logging value (its gradient is not used)."""
    return 0.5 * grad_latent.float().pow(2).sum() / max(1, grad_latent.shape[0])
