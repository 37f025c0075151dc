"""Real spherical harmonics up to degree 3 (the 3DGS / gsplat basis and sign convention)."""

from __future__ import annotations

import torch
from torch import Tensor

SH_C0 = 0.28209479177387814
"""Degree-0 basis value: colour = 0.5 + SH_C0 * f_dc (the 3DGS PLY ``f_dc`` convention)."""
_C1 = 0.4886025119029199
_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


def num_sh_bases(degree: int) -> int:
    return (degree + 1) ** 2


def rgb_to_sh(rgb: Tensor) -> Tensor:
    """Colour in [0, 1] -> degree-0 coefficient (inverse of ``sh_to_rgb``)."""
    return (rgb - 0.5) / SH_C0


def sh_to_rgb(sh: Tensor) -> Tensor:
    return sh * SH_C0 + 0.5


def eval_sh(degree: int, coeffs: Tensor, dirs: Tensor) -> Tensor:
    """Evaluate SH of ``degree`` with ``coeffs`` (..., K, 3) along ``dirs`` (..., 3) -> (..., 3).

    ``dirs`` need not be normalised. The result excludes the +0.5 offset that gsplat adds.
    """
    result = _C0_term(coeffs)
    if degree == 0:
        return result
    d = torch.nn.functional.normalize(dirs, dim=-1)
    x, y, z = (d[..., i : i + 1] for i in range(3))
    result = result - _C1 * y * coeffs[..., 1, :] + _C1 * z * coeffs[..., 2, :] - _C1 * x * coeffs[..., 3, :]
    if degree == 1:
        return result
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    result = (
        result
        + _C2[0] * xy * coeffs[..., 4, :]
        + _C2[1] * yz * coeffs[..., 5, :]
        + _C2[2] * (2.0 * zz - xx - yy) * coeffs[..., 6, :]
        + _C2[3] * xz * coeffs[..., 7, :]
        + _C2[4] * (xx - yy) * coeffs[..., 8, :]
    )
    if degree == 2:
        return result
    return (
        result
        + _C3[0] * y * (3.0 * xx - yy) * coeffs[..., 9, :]
        + _C3[1] * xy * z * coeffs[..., 10, :]
        + _C3[2] * y * (4.0 * zz - xx - yy) * coeffs[..., 11, :]
        + _C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy) * coeffs[..., 12, :]
        + _C3[4] * x * (4.0 * zz - xx - yy) * coeffs[..., 13, :]
        + _C3[5] * z * (xx - yy) * coeffs[..., 14, :]
        + _C3[6] * x * (xx - 3.0 * yy) * coeffs[..., 15, :]
    )


def _C0_term(coeffs: Tensor) -> Tensor:
    return SH_C0 * coeffs[..., 0, :]
