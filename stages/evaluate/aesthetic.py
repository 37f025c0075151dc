"""The LAION "improved aesthetic predictor": an MLP on unit-norm CLIP ViT-L/14 image features.

Layout of its published weights (``sac+logos+ava1-l14-linearMSE.pth``): ``layers.0`` Linear(768,
1024), ``layers.2`` Linear(1024, 128), ``layers.4`` Linear(128, 64), ``layers.6`` Linear(64, 16),
``layers.7`` Linear(16, 1), dropouts in between (identity at evaluation).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stages.models.sources import ModelSourceError, load_checkpoint, resolve_source


class AestheticHead(nn.Module):
    def __init__(self, feature_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(feature_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        """(N, D) unit-norm CLIP image features → (N,) scores (about 1–10 for the real head)."""
        return self.layers(features).squeeze(-1)


def load_aesthetic_head(
    source: str, feature_dim: int, seed: int = 0, key: str = "evaluate.aesthetic_head"
) -> AestheticHead | None:
    """``none`` → None; ``tiny`` → random head of ``feature_dim``; else a weight file."""
    if source == "none":
        return None
    resolved = resolve_source(source, key)
    if resolved.kind == "tiny":
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        head = AestheticHead(feature_dim)
        torch.random.set_rng_state(state)
        return head.eval()
    if resolved.kind != "file":
        raise ModelSourceError(f"{key}: expects a .safetensors/.pth weight file or 'tiny'/'none', got {source!r}")
    weights = load_checkpoint(resolved.path, key)
    first = weights.get("layers.0.weight")
    if first is None:
        raise ModelSourceError(f"{key}: {source!r} is not an aesthetic-predictor state dict (no 'layers.0.weight')")
    if first.shape[1] != feature_dim:
        raise ModelSourceError(
            f"{key}: head expects {first.shape[1]}-d CLIP features but evaluate.clip gives {feature_dim}-d "
            "(the LAION head needs CLIP ViT-L/14)"
        )
    head = AestheticHead(feature_dim)
    head.load_state_dict(weights)
    return head.eval()
