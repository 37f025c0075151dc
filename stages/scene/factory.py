"""Build the scene a method config asks for (NeRF or Gaussian splats)."""

from __future__ import annotations

from typing import Any

from torch import nn


def build_scene(config: Any, seed: int) -> nn.Module:
    """``NeRFScene(config.nerf, seed)`` or ``SplatScene(config.splats, seed)`` by
    ``config.representation`` (an :class:`stages.optimize.config.OptimizeConfig`)."""
    if config.representation == "nerf":
        from stages.scene.nerf import NeRFScene

        return NeRFScene(config.nerf, seed)
    if config.representation == "splats":
        from stages.scene.splats import SplatScene

        return SplatScene(config.splats, seed)
    raise ValueError(f"method.representation must be 'nerf' or 'splats', got {config.representation!r}")
