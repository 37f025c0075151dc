"""Initial Gaussian centres and colours: random points in a ball, or a point-cloud file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def random_ball_points(n: int, radius: float, generator: torch.Generator) -> Tensor:
    """``n`` points uniform in the ball of ``radius`` (N, 3) (threestudio-3dgs' init)."""
    direction = torch.nn.functional.normalize(torch.randn(n, 3, generator=generator), dim=-1)
    r = radius * torch.rand(n, 1, generator=generator).pow(1.0 / 3.0)
    return direction * r


def mean_neighbour_distance(points: Tensor, k: int = 3, chunk: int = 2048) -> Tensor:
    """Root-mean-square distance of each point (N, 3) to its ``k`` nearest neighbours (N,)."""
    n = points.shape[0]
    if n < 2:
        return torch.full((n,), 0.01)
    k = min(k, n - 1)
    out = []
    for start in range(0, n, chunk):
        d2 = torch.cdist(points[start : start + chunk], points).pow(2)
        nearest = d2.topk(k + 1, dim=1, largest=False).values[:, 1:]  # drop the point itself
        out.append(nearest.mean(dim=1))
    return torch.cat(out).clamp_min(1e-14).sqrt()


def load_point_cloud(path: str | Path) -> tuple[Tensor, Tensor | None]:
    """Read xyz (N, 3) and optional rgb (N, 3) in [0, 1] from ``.ply`` or ``.npz``.

    PLY: a ``vertex`` element with ``x y z`` and optionally ``red green blue`` (uint8 or float
    in [0, 1]) or 3DGS ``f_dc_0..2``. NPZ: array ``xyz`` (N, 3), optional ``rgb`` (N, 3).
    Raises ``ValueError`` naming the file (and ``splats.init_ply``) when it is unusable.
    """
    path = Path(path)
    where = f"splats.init_ply={str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{where}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".ply":
            xyz, rgb = _read_ply(path)
        elif suffix == ".npz":
            xyz, rgb = _read_npz(path)
        else:
            raise ValueError("unsupported extension (expected .ply or .npz)")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    except Exception as err:  # corrupt file: plyfile / numpy raise many kinds
        raise ValueError(f"{where}: cannot read point cloud ({type(err).__name__}: {err})") from None
    if xyz.ndim != 2 or xyz.shape[1] != 3 or xyz.shape[0] == 0:
        raise ValueError(f"{where}: expected N >= 1 points of shape (N, 3), got {xyz.shape}")
    if not np.isfinite(xyz).all():
        raise ValueError(f"{where}: positions contain NaN or inf")
    if rgb is not None:
        if rgb.shape != xyz.shape:
            raise ValueError(f"{where}: rgb shape {rgb.shape} does not match xyz {xyz.shape}")
        if rgb.dtype == np.uint8:
            rgb = rgb.astype(np.float32) / 255.0
        rgb = np.clip(rgb.astype(np.float32), 0.0, 1.0)
    return torch.from_numpy(xyz.astype(np.float32)), None if rgb is None else torch.from_numpy(rgb)


def _read_ply(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    from plyfile import PlyData

    ply = PlyData.read(str(path))
    if "vertex" not in ply:
        raise ValueError("PLY has no 'vertex' element")
    vertex = ply["vertex"].data
    names = vertex.dtype.names or ()
    missing = [n for n in ("x", "y", "z") if n not in names]
    if missing:
        raise ValueError(f"PLY vertex element lacks {missing}")
    xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=-1)
    rgb = None
    if all(n in names for n in ("red", "green", "blue")):
        rgb = np.stack([vertex["red"], vertex["green"], vertex["blue"]], axis=-1)
        if rgb.dtype != np.uint8:
            rgb = rgb.astype(np.float32)
    elif all(f"f_dc_{i}" in names for i in range(3)):
        from .sh import SH_C0

        rgb = np.stack([vertex[f"f_dc_{i}"] for i in range(3)], axis=-1).astype(np.float32) * SH_C0 + 0.5
    return xyz, rgb


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(path, allow_pickle=False) as data:
        if "xyz" not in data:
            raise ValueError(f"NPZ lacks array 'xyz' (has {sorted(data.files)})")
        xyz = np.asarray(data["xyz"])
        rgb = np.asarray(data["rgb"]) if "rgb" in data else None
    return xyz, rgb
