"""Evaluation settings: which CLIP and which quality head score the rendered views."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvaluateConfig:
    clip: str = "openai/clip-vit-large-patch14"
    """CLIP for text alignment, diversity and the aesthetic head's features: ``tiny``, a hub id or a
    local directory (``CLIPModel`` layout); ``none`` skips the CLIP scores (e.g. a toy-world
    dataset, scored against its known objects instead)."""
    aesthetic_head: str = "none"
    """Quality head on L2-normalised CLIP image features: ``none`` (quality not scored),
    ``tiny`` (random head, tests), or a ``.safetensors``/``.pth`` file of the LAION improved
    aesthetic predictor (``sac+logos+ava1-l14-linearMSE.pth``, for ``clip`` = ViT-L/14)."""
    num_views: int = 8
    """Views rendered around each asset (azimuths evenly spaced) for the scores."""
    elevation: float = 15.0
    """Elevation of the evaluation views, degrees (T3Bench renders slightly from above)."""
    resolution: int = 224
    """Render size of the evaluation views (CLIP's input size)."""
    device: str = "auto"
    seed: int = 0
    """Seed of the random weights of ``tiny`` models."""

    def validate(self) -> None:
        if self.num_views < 1:
            raise ValueError(f"evaluate.num_views must be >= 1, got {self.num_views}")
        if self.resolution < 8:
            raise ValueError(f"evaluate.resolution must be >= 8, got {self.resolution}")
        if self.clip == "none" and self.aesthetic_head != "none":
            raise ValueError(f"evaluate.aesthetic_head={self.aesthetic_head!r} scores CLIP features, but evaluate.clip is 'none'")
