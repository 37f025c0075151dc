"""The analytic teacher: a text- and image-conditioned Gaussian-mixture "diffusion model".

The model (exact; every prediction is the closed-form posterior-mean ε of a mixture):

- **Text.** A prompt y selects a mixture p(x0 | y) = Σ_k π_k N(μ_k, σ² I) in data space
  R^D (:func:`prompt_mixture`: K means drawn in [−r, r]^D from a seed hashed from the
  prompt, weights π_k ∝ ρ^k, so component 0 is the prompt's dominant mode). The empty
  prompt (the unconditional branch, or the negative prompt) is one broad Gaussian
  N(0, σ_u² I).
- **Image prompt** at IP scale s, on a mixture with weights π (IP-Adapter adds
  s·attention(image tokens) to the text conditioning; here that becomes a change of the
  component weights, leaving means and variances alone):

  ====== ====================================================================
  none   π_k                                         (vanilla UNet, IP scale 0)
  null   π_k^(1 − ν s)                               (zero image embedding: a tilt-free,
                                                      slightly flattened variant)
  ref    π_k^(1 − ν s) · exp(s τ [k = k_ref])        (tilted toward the reference)
  ====== ====================================================================

  (normalised), with τ = ``tilt`` and ν = ``null_flatten``. ``k_ref`` is the component of
  that mixture which the reference point is most likely to come from (clean
  responsibilities); a one-component mixture is unchanged by either.
- **Images.** For (B, C, H, W) inputs every pixel's C-vector is an independent draw from the
  mixture (D = C), so the ε-prediction is per pixel.

With ``sd_branch="vanilla"`` ISD is g·(ε(y,ref) − ε(y,none)) + (1−g)·(ε(∅,null) − ε(∅,none))
and with ``ip_null`` g·(ε(y,ref) − ε(y,null)): they differ by the null flattening.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from stages.guidance import losses
from stages.guidance.losses import Evaluation, LossParams, LossSpec
from stages.guidance.protocol import IPSettings
from stages.teacher.mixture import GaussianMixture, alphas_cumprod


@dataclass
class TeacherConfig:
    """Knobs of the analytic teacher (documented defaults; all validated)."""

    dim: int = 3
    """Data dimension D (3 = one RGB colour in [−1, 1] per pixel)."""
    num_components: int = 4
    """Components K of a prompt's mixture."""
    component_std: float = 0.12
    """σ of every component of a prompt's mixture."""
    mean_range: float = 0.7
    """Component means are drawn uniformly in [−mean_range, mean_range]^D."""
    weight_ratio: float = 0.6
    """π_k ∝ weight_ratio^k: component 0 dominates (the text-only mode SDS collapses to)."""
    uncond_std: float = 0.6
    """σ_u of the broad unconditional Gaussian N(0, σ_u² I)."""
    tilt: float = 4.0
    """τ: log-weight added to the reference's component per unit IP scale."""
    null_flatten: float = 0.3
    """ν: the null image at IP scale s raises the weights to the power 1 − ν·s."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the invalid field."""
        if int(self.dim) < 1:
            raise ValueError(f"TeacherConfig.dim must be >= 1, got {self.dim}")
        if int(self.num_components) < 1:
            raise ValueError(f"TeacherConfig.num_components must be >= 1, got {self.num_components}")
        for name in ("component_std", "mean_range", "uncond_std"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"TeacherConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < float(self.weight_ratio) <= 1:
            raise ValueError(f"TeacherConfig.weight_ratio must be in (0, 1], got {self.weight_ratio!r}")
        if not float(self.tilt) >= 0:
            raise ValueError(f"TeacherConfig.tilt must be >= 0, got {self.tilt!r}")
        if not 0 <= float(self.null_flatten) < 1:
            raise ValueError(f"TeacherConfig.null_flatten must be in [0, 1), got {self.null_flatten!r}")


def _prompt_seed(prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little") >> 1


def unconditional_mixture(config: TeacherConfig) -> GaussianMixture:
    """The broad unconditional "data distribution": N(0, σ_u² I) in R^D."""
    return GaussianMixture.from_weights(
        torch.zeros(1, config.dim), config.uncond_std, torch.ones(1)
    )


def prompt_mixture(prompt: str, config: TeacherConfig) -> GaussianMixture:
    """The mixture a prompt selects; deterministic in (prompt, config). Empty → unconditional.

    Means are redrawn (same seeded generator, up to 64 tries) until every pair is at least
    4σ apart, so components are distinct modes.
    """
    if not prompt.strip():
        return unconditional_mixture(config)
    generator = torch.Generator().manual_seed(_prompt_seed(prompt))
    k, d, r = config.num_components, config.dim, config.mean_range
    best, best_gap = None, -1.0
    for _ in range(64):
        means = (torch.rand((k, d), generator=generator, dtype=torch.float64) * 2 - 1) * r
        gap = float(torch.pdist(means).min()) if k > 1 else math.inf
        if gap > best_gap:
            best, best_gap = means, gap
        if gap >= 4 * config.component_std:
            break
    weights = torch.tensor([config.weight_ratio**i for i in range(k)], dtype=torch.float64)
    return GaussianMixture.from_weights(best, config.component_std, weights)


def reference_component(mixture: GaussianMixture, reference: Tensor) -> int:
    """The component a reference comes from: argmax of clean responsibilities.

    ``reference`` is one point (D,) or many points (N, D) (e.g. every pixel of a reference
    image), in which case the component most points belong to wins (ties: lowest index).
    """
    points = torch.as_tensor(reference, dtype=torch.float64)
    if points.ndim == 1:
        points = points.unsqueeze(0)
    if points.ndim != 2 or points.shape[1] != mixture.dim:
        raise ValueError(
            f"reference must be ({mixture.dim},) or (N, {mixture.dim}) points, got {tuple(points.shape)}"
        )
    votes = mixture.responsibilities(points).argmax(dim=1)
    return int(torch.bincount(votes, minlength=mixture.num_components).argmax())


def branch_log_weights(
    log_weights: Tensor,
    image: str,
    ip_scale: float,
    reference_index: int | None,
    tilt: float,
    null_flatten: float,
) -> Tensor:
    """Log-weights (K,) of a mixture under image branch ``image`` at IP scale s (module table).

    ``none``: unchanged; ``null``: normalised, raised to the power 1 − ν·s; ``ref``: as ``null``
    plus s·τ on ``reference_index``. Shared by the analytic teacher and the toy world.
    """
    if image == "none":
        return log_weights
    if image not in ("ref", "null"):
        raise ValueError(f"unknown image branch {image!r}; expected 'ref', 'null' or 'none'")
    if ip_scale < 0:
        raise ValueError(f"ip_scale must be >= 0, got {ip_scale}")
    log_w = (1.0 - null_flatten * ip_scale) * (log_weights - log_weights.logsumexp(0))
    if image == "ref":
        if reference_index is None:
            raise ValueError("image branch 'ref' needs a reference component")
        log_w = log_w.clone()
        log_w[reference_index] += ip_scale * tilt
    return log_w


class AnalyticTeacher:
    """Closed-form ε-predictions for every :class:`~stages.guidance.losses.Evaluation`.

    ``cond`` / ``uncond``: the mixtures of the prompt and of the unconditional (negative)
    prompt; ``reference``: a point (D,) (or points (N, D)) in data space, or None (then only
    image branch ``none`` / ``null`` can be evaluated).
    """

    def __init__(
        self,
        cond: GaussianMixture,
        uncond: GaussianMixture,
        reference: Tensor | None = None,
        tilt: float = 4.0,
        null_flatten: float = 0.3,
        num_train_timesteps: int = 1000,
    ) -> None:
        if cond.dim != uncond.dim:
            raise ValueError(f"cond (D={cond.dim}) and uncond (D={uncond.dim}) dimensions differ")
        self.cond = cond
        self.uncond = uncond
        self.tilt = float(tilt)
        self.null_flatten = float(null_flatten)
        self.alphas_cumprod = alphas_cumprod(num_train_timesteps)
        self.reference = None if reference is None else torch.as_tensor(reference, dtype=torch.float64)
        self._ref_index = {}
        if self.reference is not None:
            self._ref_index = {
                "cond": reference_component(cond, self.reference),
                "uncond": reference_component(uncond, self.reference),
            }

    @property
    def dim(self) -> int:
        return self.cond.dim

    @property
    def reference_index(self) -> int | None:
        """Index of the reference's component in the prompt mixture (None without reference)."""
        return self._ref_index.get("cond")

    def mixture(self, text: str, image: str, ip_scale: float) -> GaussianMixture:
        """The data distribution of one branch (text ∈ cond/uncond, image ∈ ref/null/none)."""
        base = {"cond": self.cond, "uncond": self.uncond}.get(text)
        if base is None:
            raise ValueError(f"unknown text branch {text!r}; expected 'cond' or 'uncond'")
        if image == "none":
            return base
        if image == "ref" and self.reference is None:
            raise ValueError("image branch 'ref' needs a reference; this teacher has none")
        log_w = branch_log_weights(
            base.log_weights, image, ip_scale, self._ref_index.get(text), self.tilt, self.null_flatten
        )
        return base.with_log_weights(log_w)

    def eps(
        self, x_t: Tensor, timesteps: Tensor, text: str = "cond", image: str = "none", ip_scale: float = 0.0
    ) -> Tensor:
        """ε̂ for x_t of shape (B, D) or (B, D, *spatial) with one t per sample, timesteps (B,)."""
        if x_t.ndim < 2 or x_t.shape[1] != self.dim:
            raise ValueError(f"x_t must be (B, {self.dim}, ...), got {tuple(x_t.shape)}")
        if tuple(timesteps.shape) != (x_t.shape[0],):
            raise ValueError(f"timesteps must have shape ({x_t.shape[0]},), got {tuple(timesteps.shape)}")
        num = self.alphas_cumprod.shape[0]
        if x_t.shape[0] and (int(timesteps.min()) < 0 or int(timesteps.max()) >= num):
            raise ValueError(f"timesteps out of range [0, {num}): {timesteps.tolist()}")
        mixture = self.mixture(text, image, ip_scale)
        points = x_t.movedim(1, -1)  # (B, *spatial, D)
        per_sample = int(math.prod(points.shape[1:-1]))
        a = self.alphas_cumprod[timesteps.long().cpu()].repeat_interleave(per_sample)
        eps = mixture.eps(points.reshape(-1, self.dim), a.to(x_t.device))
        return eps.reshape(points.shape).movedim(-1, 1)

    def predictions(
        self,
        spec: LossSpec,
        x0: Tensor,
        timesteps: Tensor,
        noise: Tensor,
        ip_scale: float,
        independent_noise: Tensor | None = None,
        delta_t: int = IPSettings.delta_t,
    ) -> list[Tensor]:
        """ε̂ of each of ``spec.evaluations`` for clean x0 (B, D, ...) and shared ``noise``."""
        shifted = losses.shifted_timesteps(timesteps, delta_t, self.alphas_cumprod.shape[0])
        out = []
        for evaluation in spec.evaluations:
            out.append(self.evaluate(evaluation, x0, timesteps, noise, ip_scale, independent_noise, shifted))
        return out

    def evaluate(
        self,
        evaluation: Evaluation,
        x0: Tensor,
        timesteps: Tensor,
        noise: Tensor,
        ip_scale: float,
        independent_noise: Tensor | None,
        shifted_timesteps: Tensor,
    ) -> Tensor:
        """One evaluation: noise x0 with its noise at its timestep, then predict ε."""
        t = timesteps if evaluation.timestep == "t" else shifted_timesteps
        eps = noise
        if evaluation.noise == "independent":
            if independent_noise is None:
                raise ValueError(f"evaluation {evaluation} needs an independent noise draw")
            eps = independent_noise
        x_t = losses.add_noise(x0, eps, self.alphas_cumprod, t)
        return self.eps(x_t, t, evaluation.text, evaluation.image, ip_scale)

    def latent_gradient(
        self,
        spec: LossSpec,
        x0: Tensor,
        timesteps: Tensor,
        noise: Tensor,
        params: LossParams = LossParams(),
        ip_scale: float = 0.5,
        independent_noise: Tensor | None = None,
        delta_t: int = IPSettings.delta_t,
    ) -> Tensor:
        """w(t)·r of ``spec`` at x0 (B, D, ...), exactly as a UNet guidance would compute it."""
        preds = self.predictions(spec, x0, timesteps, noise, ip_scale, independent_noise, delta_t)
        weight = losses.sds_weight(self.alphas_cumprod, timesteps.long())
        return losses.latent_gradient(spec, preds, noise, weight, params, independent_noise)
