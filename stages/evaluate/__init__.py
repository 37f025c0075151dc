"""Evaluation of generated assets: CLIP text alignment, a quality head, diversity across variants."""

from stages.evaluate.config import EvaluateConfig
from stages.evaluate.scores import clip_alignment, pairwise_diversity, quality_score

__all__ = ["EvaluateConfig", "clip_alignment", "pairwise_diversity", "quality_score"]
