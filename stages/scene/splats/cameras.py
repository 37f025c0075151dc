"""Camera conversion from the project's OpenGL camera-to-world to gsplat's OpenCV world-to-camera."""

from __future__ import annotations

import torch
from torch import Tensor

# OpenGL camera axes (x right, y up, looks along -z) -> OpenCV (x right, y down, looks along +z).
_GL_TO_CV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))


def viewmats_from_c2w(c2w: Tensor) -> Tensor:
    """OpenGL camera-to-world (B, 4, 4) -> OpenCV world-to-camera ``viewmats`` (B, 4, 4)."""
    if c2w.ndim != 3 or c2w.shape[-2:] != (4, 4):
        raise ValueError(f"cameras.c2w must be (B, 4, 4), got {tuple(c2w.shape)}")
    c2w_cv = c2w @ _GL_TO_CV.to(c2w)
    return torch.linalg.inv(c2w_cv)


def intrinsics_from_fovy(fovy: Tensor, height: int, width: int) -> Tensor:
    """Pinhole intrinsics ``Ks`` (B, 3, 3) for vertical field of view ``fovy`` (B,) radians.

    Square pixels (fx = fy) and the principal point at the image centre, in gsplat's pixel
    convention (pixel (i, j) has its centre at (j + 0.5, i + 0.5)).
    """
    focal = 0.5 * height / torch.tan(0.5 * fovy)
    Ks = torch.zeros(fovy.shape[0], 3, 3, dtype=fovy.dtype, device=fovy.device)
    Ks[:, 0, 0] = focal
    Ks[:, 1, 1] = focal
    Ks[:, 0, 2] = 0.5 * width
    Ks[:, 1, 2] = 0.5 * height
    Ks[:, 2, 2] = 1.0
    return Ks
