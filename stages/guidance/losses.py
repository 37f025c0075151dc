"""Score-distillation losses as data: which noise predictions each needs, and how to combine them.

A loss is a :class:`LossSpec`: the UNet evaluations it needs (text cond/uncond, image
prompt ref/null/none, timestep t or t+δt, shared or independent noise) and a ``residual``
that turns those predictions into the noise residual r. The latent-space gradient is
``w(t) * r``; a guidance model back-propagates it through its VAE encoder to get grad_rgb.

Keeping the evaluations as data lets one guidance object put every evaluation of every
request of a batch into ONE UNet forward (per-sample IP scale), and lets the analytic
teacher (``stages.teacher``) evaluate exactly the same losses in closed form.

Names (README "Losses"; the paper's Table 3 rows are marked T3):

==================== ===========================================================================
sds                  ε_SD^cfg − ε                          (plain SDS, no image prompt)
ip_sds               ε_IP^cfg − ε                          (IP-Adapter SDS)
isd                  ε_IP^cfg − ε_SD^cfg                   (ModeDreamer Eq. 7; T3 "UNet (same t)")
sds_mvd              ε_MVD^cfg − ε                         (MVDream SDS, Eq. 8; CFG 50)
cv_random            ε_IP^cfg − ε                          (T3 "Rand. noise (CFG 7.5)"; = ip_sds)
cv_random_cfg100     ε_IP^cfg100 − ε                       (T3 "Rand. noise (CFG 100)": the IP
                                                            prediction at CFG ``cv_guidance_scale``)
cv_t_delta_sd        ε_IP^cfg(x_t, t) − ε_SD^cfg(x_{t+δt}, t+δt)   (T3 "UNet (t+δt)": the control
                                                            variate ε_SD taken at a nearby timestep)
cv_t_delta_ip        ε_IP^cfg(x_t, t) − ε_IP^cfg(x_{t+δt}, t+δt)   (extra: the IP UNet itself at t+δt)
cv_sd_cfg100         ε_IP^cfg − ε_SD^cfg100                (extra: the SD control variate at CFG
                                                            ``cv_guidance_scale``)
cv_independent_noise (ε_IP^cfg(x_t) − ε) − (ε_SD^cfg(x'_t) − ε')   (extra: the SD control variate at
                                                            the same t on an independently noised
                                                            x'_t, so no correlation gain)
==================== ===========================================================================

Renamed losses are refused with the new names (:data:`RENAMED_LOSSES`): ``cv_cfg100`` was
ε_IP^cfg − ε_SD^cfg100 (now ``cv_sd_cfg100``; the paper's CFG-100 row is ``cv_random_cfg100``),
``cv_t_delta`` was the IP UNet at t+δt (now ``cv_t_delta_ip``; the paper's reading is
``cv_t_delta_sd``), ``cv_same_t`` was the independently noised control variate (now
``cv_independent_noise``; the paper's "UNet (same t)" row is ``isd`` itself).

ε_SD in every control variate follows ``sd_branch`` (``vanilla``: IP scale 0; ``ip_null``: the
adapter with the null image embedding).

``isd`` has two readings of ε_SD (docs/ARCHITECTURE.md "The method"): ``sd_branch="vanilla"`` (IP scale 0: four
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


def _cv_random_cfg100(p: Sequence[Tensor], noise: Tensor, _n2: Tensor | None, k: LossParams) -> Tensor:
    return cfg(p[0], p[1], k.cv_guidance_scale) - noise


def _cv_sd_cfg100(p: Sequence[Tensor], _n: Tensor, _n2: Tensor | None, k: LossParams) -> Tensor:
    return cfg(p[0], p[1], k.guidance_scale) - cfg(p[2], p[3], k.cv_guidance_scale)


def _cv_independent_noise(p: Sequence[Tensor], noise: Tensor, noise2: Tensor | None, k: LossParams) -> Tensor:
    if noise2 is None:
        raise ValueError("cv_independent_noise needs an independent noise draw")
    return (cfg(p[0], p[1], k.guidance_scale) - noise) - (cfg(p[2], p[3], k.guidance_scale) - noise2)


def _sd_evaluations(sd_branch: str, timestep: TimestepChoice = "t", noise: NoiseChoice = "shared") -> tuple[Evaluation, Evaluation]:
    """ε_SD's (cond, uncond) evaluations in the ``sd_branch`` reading."""
    image: ImageCond = "none" if sd_branch == "vanilla" else "null"
    return Evaluation("cond", image, timestep, noise), Evaluation("uncond", image, timestep, noise)


RENAMED_LOSSES = {
    "cv_cfg100": (
        "'cv_cfg100' (ε_IP^7.5 − ε_SD^100) is now 'cv_sd_cfg100'; the paper's Table 3 row "
        "\"Rand. noise (CFG 100)\" (ε_IP^100 − ε) is 'cv_random_cfg100'"
    ),
    "cv_t_delta": (
        "'cv_t_delta' (the IP UNet at t+δt) is now 'cv_t_delta_ip'; the paper's Table 3 row "
        "\"UNet (t+δt)\" (the control variate ε_SD at t+δt) is 'cv_t_delta_sd'"
    ),
    "cv_same_t": (
        "'cv_same_t' (an SD control variate on independently noised x'_t) is now 'cv_independent_noise'; "
        "the paper's Table 3 row \"UNet (same t)\" is 'isd' itself"
    ),
}
"""Former loss names and what replaced them (refused with this message)."""


def check_loss_name(name: str, names: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` for an unknown loss; a renamed one is refused naming its successors."""
    known = LOSS_NAMES if names is None else tuple(names)
    if name in known:
        return
    if name in RENAMED_LOSSES:
        raise ValueError(f"loss {name!r} was renamed: {RENAMED_LOSSES[name]}")
    raise ValueError(f"unknown loss {name!r}; expected one of {known}")


def loss_spec(name: str, sd_branch: str = "vanilla") -> LossSpec:
    """The :class:`LossSpec` called ``name``; ``sd_branch`` picks the reading of ε_SD."""
    if sd_branch not in SD_BRANCHES:
        raise ValueError(f"unknown isd.sd_branch {sd_branch!r}; expected one of {SD_BRANCHES}")
    check_loss_name(name)
    ip = (_IP_COND, _IP_UNCOND)
    if name in ("sds", "sds_mvd"):
        return LossSpec(name, (_COND, _UNCOND), _sds, uses_image_prompt=False)
    if name in ("ip_sds", "cv_random"):
        return LossSpec(name, ip, _sds, uses_image_prompt=True)
    if name == "cv_random_cfg100":
        return LossSpec(name, ip, _cv_random_cfg100, uses_image_prompt=True)
    if name == "isd" and sd_branch == "vanilla":
        return LossSpec(name, (*ip, _COND, _UNCOND), _isd_vanilla, True)
    if name == "isd":
        return LossSpec(name, (_IP_COND, Evaluation("cond", "null")), _isd_ip_null, True)
    if name == "cv_sd_cfg100":
        return LossSpec(name, (*ip, *_sd_evaluations(sd_branch)), _cv_sd_cfg100, True)
    if name == "cv_t_delta_sd":
        return LossSpec(name, (*ip, *_sd_evaluations(sd_branch, "t_delta")), _isd_vanilla, True)
    if name == "cv_t_delta_ip":
        shifted = (Evaluation("cond", "ref", "t_delta"), Evaluation("uncond", "null", "t_delta"))
        return LossSpec(name, (*ip, *shifted), _isd_vanilla, True)
    # cv_independent_noise
    return LossSpec(name, (*ip, *_sd_evaluations(sd_branch, noise="independent")), _cv_independent_noise, True)


LOSS_NAMES = (
    "isd", "sds", "ip_sds", "sds_mvd", "cv_random", "cv_random_cfg100", "cv_t_delta_sd", "cv_t_delta_ip",
    "cv_sd_cfg100", "cv_independent_noise",
)
TABLE3_ROWS = {
    "cv_random": "Rand. noise (CFG 7.5)",
    "cv_random_cfg100": "Rand. noise (CFG 100)",
    "cv_t_delta_sd": "UNet (t+δt)",
    "isd": "UNet (same t)",
}
"""The paper's Table 3 (control-variate ablation) rows and the loss that computes each."""


def sds_weight(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """w(t) = 1 − ᾱ_t (threestudio's "sds" weighting), shape (B,)."""
    return 1.0 - alphas_cumprod.to(timesteps.device)[timesteps]


def add_noise(x0: Tensor, noise: Tensor, alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε with one t per sample."""
    a = alphas_cumprod.to(x0.device, torch.float32)[timesteps].view(-1, *([1] * (x0.ndim - 1)))
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def shifted_timesteps(timesteps: Tensor, delta_t: int, num_train_timesteps: int = 1000) -> Tensor:
    """t + δt clamped into the valid range (for ``cv_t_delta_sd`` / ``cv_t_delta_ip``)."""
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


def recon_latent_gradient(
    latents: Tensor,
    noisy: Tensor,
    alphas: Tensor,
    eps_cond: Tensor,
    eps_uncond: Tensor,
    guidance_scale: float,
    std_rescale: float,
    num_frames: int,
) -> Tensor:
    """latents − x̂0 (MVDream-threestudio ``recon_loss``), all (B, C, h, w), B = groups·num_frames.

    ``alphas`` is ᾱ_t per sample (B,). x̂0 = (x_t − √(1−ᾱ)·ε_cfg)/√ᾱ; with ``std_rescale`` > 0
    it is scaled per group by std(x̂0_nocfg)/std(x̂0) and blended:
    x̂0 ← s·(x̂0·factor) + (1 − s)·x̂0.
    """
    a = alphas.view(-1, 1, 1, 1).float()
    x_t = noisy.float()

    def x0_from(eps: Tensor) -> Tensor:
        return (x_t - (1 - a).sqrt() * eps.float()) / a.sqrt()

    x0 = x0_from(cfg(eps_cond.float(), eps_uncond.float(), guidance_scale))
    if std_rescale > 0:
        x0_nocfg = x0_from(eps_cond)
        grouped = (num_frames, *x0.shape[1:])
        std_nocfg = x0_nocfg.reshape(-1, *grouped).std(dim=(1, 2, 3, 4), keepdim=True)
        std_cfg = x0.reshape(-1, *grouped).std(dim=(1, 2, 3, 4), keepdim=True)
        factor = ((std_nocfg + 1e-8) / (std_cfg + 1e-8)).repeat_interleave(num_frames, dim=0).squeeze(1)
        x0 = std_rescale * (x0 * factor) + (1 - std_rescale) * x0
    return latents.float() - x0
