"""T3Bench-style scores from CLIP features of an asset's rendered views.

- ``alignment``: text alignment, 100 · mean cosine(image view, prompt) (CLIP score).
- ``quality``: mean aesthetic-head score over the views (when a head is configured).
- ``diversity``: for the variants of one prompt, the mean over view positions of the mean
  pairwise cosine distance (1 − cos) between the variants' features of that same view —
  0 when all variants look alike, larger when the reference images pulled them apart.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
from torch import Tensor


def clip_alignment(image_features: Tensor, text_feature: Tensor) -> float:
    """100 · mean_v cos(image_v, text); inputs unit-norm, (V, D) and (D,) or (1, D)."""
    text = text_feature.reshape(-1)
    if image_features.ndim != 2 or image_features.shape[1] != text.shape[0]:
        raise ValueError(
            f"image features {tuple(image_features.shape)} and text feature {tuple(text_feature.shape)} disagree"
        )
    return float(100.0 * (image_features @ text).mean())


def pairwise_diversity(features_by_variant: Sequence[Tensor]) -> float:
    """Mean pairwise cosine distance between variants, view by view; NaN with < 2 variants.

    Each element is the (V, D) unit-norm features of one variant's V views, same views in the
    same order for every variant.
    """
    if len(features_by_variant) < 2:
        return math.nan
    shapes = {tuple(f.shape) for f in features_by_variant}
    if len(shapes) != 1:
        raise ValueError(f"variants have different view/feature shapes: {sorted(shapes)}")
    distances = [
        (1.0 - (a * b).sum(dim=-1)).mean()
        for a, b in itertools.combinations(features_by_variant, 2)
    ]
    return float(torch.stack(distances).mean())


def quality_score(head: torch.nn.Module, image_features: Tensor) -> float:
    """Mean aesthetic-head score of the views."""
    with torch.no_grad():
        return float(head(image_features.to(next(head.parameters()).dtype)).mean())
