"""3D Gaussian splats: ``SplatConfig``, ``SplatScene`` and their rasterisers (gsplat on CUDA,
a pure-PyTorch fallback with the same conventions elsewhere)."""

from .cameras import intrinsics_from_fovy, viewmats_from_c2w
from .config import DensifyConfig, SplatConfig, SplatLearningRates
from .rasterize_gsplat import gsplat_available, gsplat_cuda_ready, rasterize_gsplat
from .rasterize_torch import rasterize_torch
from .scene import SplatScene, select_rasterizer

__all__ = [
    "DensifyConfig",
    "SplatConfig",
    "SplatLearningRates",
    "SplatScene",
    "gsplat_available",
    "gsplat_cuda_ready",
    "intrinsics_from_fovy",
    "rasterize_gsplat",
    "rasterize_torch",
    "select_rasterizer",
    "viewmats_from_c2w",
]
