"""Score assets: CLIP text alignment and quality per asset, diversity per prompt across variants."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image
from torch import Tensor

from stages.evaluate.aesthetic import load_aesthetic_head
from stages.evaluate.clip import ClipFeatures, load_clip
from stages.evaluate.config import EvaluateConfig
from stages.evaluate.render import AssetViews, asset_views
from stages.evaluate.scores import clip_alignment, pairwise_diversity, quality_score


@dataclass
class AssetScores:
    """Scores of one asset; ``image_features`` (V, D) unit-norm, kept for diversity."""

    alignment: float
    quality: float
    """NaN when no quality head is configured."""
    image_features: Tensor
    view_source: str
    num_views: int


class Evaluator:
    """CLIP (+ optional aesthetic head) with a per-prompt text-feature cache."""

    def __init__(
        self, config: EvaluateConfig, clip: ClipFeatures | None, head: torch.nn.Module | None, device: torch.device | None = None
    ) -> None:
        self.config = config
        self.clip = clip
        """None: ``evaluate.clip: none`` (no CLIP scores; the toy world's scores need none)."""
        self._device = device or (clip.device if clip is not None else torch.device("cpu"))
        self.head = head
        self._text: dict[str, Tensor] = {}
        self._scenes: dict[str, torch.nn.Module] = {}
        """One scene per method digest, reloaded per asset (building a NeRF costs more than loading)."""

    @classmethod
    def from_config(cls, config: EvaluateConfig) -> "Evaluator":
        """Load ``config.clip`` and ``config.aesthetic_head`` on ``config.device``."""
        from stages.models.device import resolve_device

        config.validate()
        device = resolve_device(config.device)
        if config.clip == "none":
            return cls(config, None, None, device)
        clip = load_clip(config.clip, device, seed=config.seed)
        dim = int(clip.model.config.projection_dim)
        head = load_aesthetic_head(config.aesthetic_head, dim, seed=config.seed)
        if head is not None:
            head = head.to(device)
        return cls(config, clip, head, device)

    @property
    def device(self) -> torch.device:
        return self._device

    def text_feature(self, prompt: str) -> Tensor:
        """(D,) unit-norm CLIP text feature of ``prompt`` (cached)."""
        if prompt not in self._text:
            self._text[prompt] = self.clip.texts([prompt])[0]
        return self._text[prompt]

    def score_images(self, prompt: str, images: Sequence[Image.Image], view_source: str = "images") -> AssetScores:
        """Alignment and quality of the views ``images`` of one asset made for ``prompt``."""
        if self.clip is None:
            return AssetScores(math.nan, math.nan, torch.zeros(len(images), 0), view_source, len(images))
        features = self.clip.images(list(images))  # (V, D)
        alignment = clip_alignment(features, self.text_feature(prompt))
        quality = math.nan if self.head is None else quality_score(self.head, features.to(self.device))
        return AssetScores(alignment, quality, features, view_source, len(images))

    def score_asset(self, asset_dir: Path, prompt: str, method: Any | None = None, views: str = "auto") -> AssetScores:
        """Render (or cut from the preview) the asset's evaluation views and score them."""
        if self.clip is None:  # nothing to score the views with: do not render them
            return AssetScores(math.nan, math.nan, torch.zeros(0, 0), "none", 0)
        scene = None
        if method is not None and views != "preview":
            key = method.resume_digest()  # the scene depends on no runtime key
            if key not in self._scenes:
                from stages.scene.factory import build_scene

                self._scenes[key] = build_scene(method, seed=0).to(self.device)
            scene = self._scenes[key]
        rendered: AssetViews = asset_views(Path(asset_dir), self.config, method, views, self.device, scene)
        return self.score_images(prompt, rendered.images, rendered.source)


@dataclass
class PromptDiversity:
    prompt: str
    method: str
    """Assets sharing a prompt are variants only under the same method (its ``config_digest``)."""
    variants: int
    diversity: float
    """Mean pairwise cosine distance of the variants' same-view CLIP features (NaN: < 2 variants
    or variants scored from different view sets)."""


def diversity_by_prompt(items: Iterable[tuple[str, str, Tensor]]) -> list[PromptDiversity]:
    """``(prompt, method, (V, D) features)`` per asset → diversity per (prompt, method), sorted."""
    grouped: dict[tuple[str, str], list[Tensor]] = defaultdict(list)
    for prompt, method, features in items:
        grouped[(prompt, method)].append(features)
    out = []
    for (prompt, method), features in sorted(grouped.items()):
        shapes = {tuple(f.shape) for f in features}
        scored = all(f.ndim == 2 and f.shape[1] > 0 for f in features)  # no CLIP features: no CLIP diversity
        value = pairwise_diversity(features) if len(shapes) == 1 and scored else math.nan
        out.append(PromptDiversity(prompt, method, len(features), value))
    return out
