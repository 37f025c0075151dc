"""gsplat's CUDA rasteriser behind the same call as :func:`rasterize_torch` (gsplat is optional)."""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, Optional

from torch import Tensor


def gsplat_available() -> bool:
    """True when the ``gsplat`` package can be imported (its CUDA kernels compile on first use)."""
    try:
        return importlib.util.find_spec("gsplat") is not None
    except (ImportError, ValueError):  # a broken install or a module masked in sys.modules
        return False


@functools.lru_cache(maxsize=1)
def gsplat_cuda_ready() -> bool:
    """True when gsplat's CUDA extension loads (prebuilt, or JIT-compiled now: minutes, once)."""
    if not gsplat_available():
        return False
    try:
        from gsplat.cuda._backend import _C
    except Exception:  # no CUDA toolkit / compiler errors: gsplat reports them itself
        return False
    return _C is not None


def rasterize_gsplat(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    sh_degree: Optional[int] = None,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    tile_size: int = 16,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``gsplat.rasterization`` with ``render_mode="RGB+ED"``, ``packed=False``, classic mode,
    no background; see :func:`stages.scene.splats.rasterize_torch.rasterize_torch` for shapes.
    ``tile_size`` is gsplat's tile size (16 is the tested value)."""
    from gsplat import rasterization

    return rasterization(
        means=means,
        quats=quats,
        scales=scales,
        opacities=opacities,
        colors=colors,
        viewmats=viewmats,
        Ks=Ks,
        width=width,
        height=height,
        near_plane=near_plane,
        far_plane=far_plane,
        eps2d=eps2d,
        sh_degree=sh_degree,
        packed=False,
        render_mode="RGB+ED",
        rasterize_mode="classic",
        tile_size=tile_size,
    )
