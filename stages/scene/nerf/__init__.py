"""threestudio-style NeRF: hash-grid implicit volume, background, shading, volume renderer."""

from .config import (
    BackgroundConfig,
    HashGridConfig,
    MLPConfig,
    NeRFConfig,
    RendererConfig,
    ShadingConfig,
)
from .scene import DEFAULT_LR, REGULARIZER_NAMES, NeRFScene, grid_points

__all__ = [
    "BackgroundConfig",
    "DEFAULT_LR",
    "HashGridConfig",
    "MLPConfig",
    "NeRFConfig",
    "NeRFScene",
    "REGULARIZER_NAMES",
    "RendererConfig",
    "ShadingConfig",
    "grid_points",
]
