"""The posterior-mean ε of a Gaussian mixture over whole renders (one component per object).

Component k of the image seen by camera c is N(μ_k(c), σ² I) in latent space (latent = 2·rgb − 1,
D = 3·H·W). For x_t = √ᾱ x0 + √(1−ᾱ) ε every component gives p(x_t | k) = N(√ᾱ μ_k, s² I) with
s² = ᾱσ² + 1 − ᾱ, and

    E[x0 | x_t, k] = μ_k + √ᾱ σ² (x_t − √ᾱ μ_k) / s²
    ε̂(x_t)         = (x_t − √ᾱ Σ_k r_k E[x0 | x_t, k]) / √(1−ᾱ)

with responsibilities r_k ∝ w_k · p(x_t | k)^(d/D). The exponent is the likelihood temperature:
``evidence_dims`` d effective dimensions per view instead of the image's D (docs/TOYWORLD.md
says why); ``None`` is the exact mixture. Views of one group (MVDream's 4 views) share one set
of responsibilities: their log-likelihoods are summed, which is what ties them to one object.
"""

from __future__ import annotations

import torch
from torch import Tensor


def log_likelihoods(x_t: Tensor, alpha_bar: Tensor, means: Tensor, std: float, evidence_dims: float | None) -> Tensor:
    """(B, K) log p(x_t | k) up to a constant shared by all k, tempered to ``evidence_dims``.

    ``x_t`` (B, D), ``alpha_bar`` (B,), ``means`` (B, K, D) (float64 inside).
    """
    x = x_t.double()
    a = alpha_bar.double().view(-1, 1)
    s2 = a * std**2 + (1.0 - a)  # (B, 1)
    distance = (x[:, None, :] - a.sqrt()[..., None] * means.double()).pow(2).sum(-1)  # (B, K)
    scale = 1.0 if evidence_dims is None else float(evidence_dims) / x.shape[1]
    return -0.5 * scale * distance / s2


def responsibilities(log_weights: Tensor, log_lik: Tensor, group: int = 1) -> Tensor:
    """(B, K) r_k: softmax over k of log w_k + the summed log-likelihoods of each group of
    ``group`` consecutive rows (every row of a group gets its group's r)."""
    batch, k = log_lik.shape
    if batch % group:
        raise ValueError(f"batch {batch} is not a multiple of the view group {group}")
    summed = log_lik.reshape(-1, group, k).sum(1)  # (G, K)
    logits = log_weights.double().view(1, -1) + summed
    r = (logits - logits.logsumexp(1, keepdim=True)).exp()
    return r.repeat_interleave(group, dim=0)


def posterior_eps(
    x_t: Tensor,
    alpha_bar: Tensor,
    means: Tensor,
    log_weights: Tensor,
    std: float,
    evidence_dims: float | None = None,
    group: int = 1,
) -> tuple[Tensor, Tensor]:
    """(ε̂ (B, D) in ``x_t``'s dtype, responsibilities (B, K)) for x_t (B, D), per-row ᾱ (B,),
    per-row component means (B, K, D) and log-weights (K,)."""
    r = responsibilities(log_weights, log_likelihoods(x_t, alpha_bar, means, std, evidence_dims), group)
    x = x_t.double()
    a = alpha_bar.double().view(-1, 1)
    s2 = a * std**2 + (1.0 - a)
    mean_mu = torch.einsum("bk,bkd->bd", r, means.double())
    x0_hat = mean_mu + a.sqrt() * std**2 * (x - a.sqrt() * mean_mu) / s2
    eps = (x - a.sqrt() * x0_hat) / (1.0 - a).sqrt()
    return eps.to(x_t.dtype), r
