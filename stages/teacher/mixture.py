"""Isotropic Gaussian mixtures and their exact DDPM ε-prediction.

For data x0 ~ Σ_k π_k N(μ_k, σ_k² I) in R^D and x_t = √ᾱ x0 + √(1−ᾱ) ε, the noised marginal
is again a mixture, p_t = Σ_k π_k N(√ᾱ μ_k, s_k² I) with s_k² = ᾱ σ_k² + 1 − ᾱ, and the
posterior-mean noise prediction (what an ε-trained UNet converges to) is

    ε̂(x_t) = E[ε | x_t] = −√(1−ᾱ) ∇ log p_t(x_t) = √(1−ᾱ) Σ_k γ_k(x_t) (x_t − √ᾱ μ_k) / s_k²

with γ_k the responsibilities of the noised components. ``alphas_cumprod`` gives SD1.5's
schedule (scaled_linear β 0.00085→0.012, 1000 steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from stages.guidance.protocol import NUM_TRAIN_TIMESTEPS


def _softmax(logits: Tensor, dim: int) -> Tensor:
    # exp(x − logsumexp x): same result as torch.softmax, which is ~10× slower on small
    # float64 CPU tensors.
    return (logits - logits.logsumexp(dim, keepdim=True)).exp()


def alphas_cumprod(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> Tensor:
    """ᾱ_t, shape (num_train_timesteps,), float64: SD's "scaled_linear" β schedule."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """Σ_k softmax(log_weights)_k N(means_k, stds_k² I).

    Shapes: ``means`` (K, D), ``stds`` (K,), ``log_weights`` (K,) (any normalisation; the
    weights are ``softmax(log_weights)``).
    """

    means: Tensor
    stds: Tensor
    log_weights: Tensor

    def __post_init__(self) -> None:
        if self.means.ndim != 2:
            raise ValueError(f"GaussianMixture.means must be (K, D), got {tuple(self.means.shape)}")
        k = self.means.shape[0]
        if k == 0:
            raise ValueError("GaussianMixture needs at least one component")
        for name in ("stds", "log_weights"):
            value = getattr(self, name)
            if tuple(value.shape) != (k,):
                raise ValueError(f"GaussianMixture.{name} must have shape ({k},), got {tuple(value.shape)}")
        if bool((self.stds <= 0).any()):
            raise ValueError("GaussianMixture.stds must be > 0")

    @staticmethod
    def from_weights(means: Tensor, stds: Tensor | float, weights: Tensor) -> "GaussianMixture":
        """Build from (K, D) means, (K,) or scalar stds and (K,) positive weights."""
        means = torch.as_tensor(means, dtype=torch.float64)
        stds_t = torch.as_tensor(stds, dtype=torch.float64)
        if stds_t.ndim == 0:
            stds_t = stds_t.expand(means.shape[0]).clone()
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if bool((weights <= 0).any()):
            raise ValueError("GaussianMixture weights must be > 0")
        return GaussianMixture(means, stds_t, weights.log())

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def weights(self) -> Tensor:
        """(K,) normalised weights."""
        return _softmax(self.log_weights, 0)

    def with_log_weights(self, log_weights: Tensor) -> "GaussianMixture":
        return GaussianMixture(self.means, self.stds, log_weights)

    def _noised_terms(self, x: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For x (N, D), ᾱ (N,): diff (N, K, D) = x − √ᾱ μ, s² (N, K), logits (N, K)."""
        a = alpha_bar.to(x.dtype).view(-1, 1)
        means = self.means.to(x)
        s2 = a * self.stds.to(x).pow(2).view(1, -1) + (1.0 - a)
        diff = x.unsqueeze(1) - a.sqrt().unsqueeze(-1) * means.unsqueeze(0)
        logits = (
            self.log_weights.to(x).view(1, -1)
            - 0.5 * self.dim * s2.log()
            - 0.5 * diff.pow(2).sum(-1) / s2
        )
        return diff, s2, logits

    def log_prob(self, x: Tensor, alpha_bar: Tensor | float = 1.0) -> Tensor:
        """log p_t(x) of the mixture noised to ᾱ (1 = clean data), x (N, D) → (N,)."""
        alpha_bar = torch.as_tensor(alpha_bar, dtype=x.dtype).expand(x.shape[0])
        logits = self._noised_terms(x, alpha_bar)[2]
        log_norm = -0.5 * self.dim * math.log(2 * math.pi)
        return torch.logsumexp(logits - self.log_weights.to(x).logsumexp(0), dim=1) + log_norm

    def responsibilities(self, x: Tensor, alpha_bar: Tensor | float = 1.0) -> Tensor:
        """γ_k(x) under the noised mixture, x (N, D) → (N, K)."""
        alpha_bar = torch.as_tensor(alpha_bar, dtype=x.dtype).expand(x.shape[0])
        return _softmax(self._noised_terms(x, alpha_bar)[2], 1)

    def eps(self, x_t: Tensor, alpha_bar: Tensor) -> Tensor:
        """Exact ε̂(x_t) for x_t (N, D) and per-row ᾱ (N,), computed in float64 → (N, D)."""
        x = x_t.to(torch.float64)
        a = alpha_bar.to(torch.float64)
        diff, s2, logits = self._noised_terms(x, a)
        gamma = _softmax(logits, 1)
        score_term = (gamma / s2).unsqueeze(-1) * diff
        return ((1.0 - a).sqrt().view(-1, 1) * score_term.sum(1)).to(x_t.dtype)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """(n, D) float64 draws from the clean mixture."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, self.dim), generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k].unsqueeze(-1) * z
