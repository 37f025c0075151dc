"""Gaussian splats <-> PLY in the INRIA 3DGS layout (what SuperSplat and other splat viewers open).

One ``vertex`` element, binary little endian, every property float32, in this order::

    x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 f_rest_0 .. f_rest_{3(K-1)-1} opacity scale_0 scale_1 scale_2
    rot_0 rot_1 rot_2 rot_3

with colour as SH coefficients (f_dc = (rgb - 0.5) / 0.28209479177387814; f_rest channel-major:
all red coefficients, then green, then blue), opacity as a logit, scales as natural logs and
rot as a unit quaternion w x y z. Normals are zero, as the reference implementation writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from stages.atomic import atomic_write


def ply_property_names(num_rest: int) -> list[str]:
    """Property names in file order for ``num_rest`` f_rest coefficients (3·((d+1)²-1))."""
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(num_rest)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


def export_splats_ply(scene: Any, path: str | Path, pad_sh_degree: Optional[int] = 3) -> Path:
    """Write ``scene.to_ply_dict()`` (a :class:`~stages.scene.splats.SplatScene`) to ``path``.

    ``pad_sh_degree``: write zero f_rest coefficients up to this SH degree when the scene has
    fewer (3 -> 45 f_rest, what INRIA-derived loaders assert); ``None`` writes only the scene's.
    The file is written to a temporary name in the same folder and renamed into place.
    Raises ``ValueError`` for an empty scene or non-finite values.
    """
    data = scene.to_ply_dict()
    n = int(data["means"].shape[0])
    if n == 0:
        raise ValueError(f"cannot export {path}: the scene has no Gaussians")
    f_rest = data["f_rest"].reshape(n, 3, data["f_rest"].shape[1] // 3)
    if pad_sh_degree is not None:
        want = (pad_sh_degree + 1) ** 2 - 1
        if f_rest.shape[-1] < want:
            f_rest = torch.cat([f_rest, f_rest.new_zeros(n, 3, want - f_rest.shape[-1])], dim=-1)
    columns: list[Tensor] = [
        data["means"],
        torch.zeros(n, 3),
        data["f_dc"],
        f_rest.reshape(n, -1),
        data["opacities"].reshape(n, 1),
        data["scales"],
        data["quats"],
    ]
    values = torch.cat([c.detach().float().cpu().reshape(n, -1) for c in columns], dim=1).numpy()
    names = ply_property_names(f_rest.shape[1] * f_rest.shape[2])
    bad = ~np.isfinite(values).all(axis=0)
    if bad.any():
        raise ValueError(f"cannot export {path}: non-finite values in {[names[i] for i in np.flatnonzero(bad)]}")
    records = np.empty(n, dtype=[(name, "<f4") for name in names])
    for i, name in enumerate(names):
        records[name] = values[:, i]
    return _write_atomic(Path(path), records)


def _write_atomic(path: Path, records: np.ndarray) -> Path:
    from plyfile import PlyData, PlyElement

    with atomic_write(path) as tmp, open(tmp, "wb") as handle:
        PlyData([PlyElement.describe(records, "vertex")], text=False, byte_order="<").write(handle)
    return path


def load_splats_ply(path: str | Path) -> dict[str, Any]:
    """Read a 3DGS-layout PLY back: ``means`` (N,3), ``f_dc`` (N,3), ``f_rest`` (N, 3(K-1)),
    ``opacities`` (N,) logit, ``scales`` (N,3) log, ``quats`` (N,4) wxyz, ``sh_degree`` (int).
    Raises ``ValueError`` naming the file and the missing property."""
    from plyfile import PlyData

    path = Path(path)
    try:
        ply = PlyData.read(str(path))
    except Exception as err:
        raise ValueError(f"cannot read splat PLY {path}: {type(err).__name__}: {err}") from None
    if "vertex" not in ply:
        raise ValueError(f"splat PLY {path} has no 'vertex' element")
    vertex = ply["vertex"].data
    names = set(vertex.dtype.names or ())
    num_rest = sum(1 for name in names if name.startswith("f_rest_"))
    required = [n for n in ply_property_names(num_rest) if n not in ("nx", "ny", "nz")]
    missing = [n for n in required if n not in names]
    if missing:
        raise ValueError(f"splat PLY {path} lacks properties {missing}")
    if num_rest % 3 or round(((num_rest // 3) + 1) ** 0.5) ** 2 != num_rest // 3 + 1:
        raise ValueError(f"splat PLY {path}: {num_rest} f_rest properties is not 3·((d+1)²-1)")

    def stack(keys: list[str]) -> Tensor:
        if not keys:
            return torch.zeros(len(vertex), 0)
        return torch.from_numpy(np.stack([np.asarray(vertex[k], dtype=np.float32) for k in keys], axis=-1))

    return {
        "means": stack(["x", "y", "z"]),
        "f_dc": stack([f"f_dc_{i}" for i in range(3)]),
        "f_rest": stack([f"f_rest_{i}" for i in range(num_rest)]),
        "opacities": stack(["opacity"])[:, 0],
        "scales": stack([f"scale_{i}" for i in range(3)]),
        "quats": stack([f"rot_{i}" for i in range(4)]),
        "sh_degree": round(((num_rest // 3) + 1) ** 0.5) - 1,
    }
