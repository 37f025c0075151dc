"""NeRF → coloured triangle mesh: marching cubes on the density grid, vertex colours from the
albedo field, optional decimation, GLB + OBJ/MTL via trimesh (written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import trimesh
from skimage import measure
from torch import Tensor

from stages.atomic import atomic_write


class DensityScene(Protocol):
    """What the exporter needs from a scene (``NeRFScene`` provides it)."""

    config: object  # has ``radius``

    def density_grid(self, resolution: int) -> Tensor: ...

    def albedo_at(self, points: Tensor) -> Tensor: ...


def resolve_threshold(density: np.ndarray, threshold: float | str) -> float:
    """threestudio ``isosurface_threshold``: a density value, or ``auto`` = mean + 5·std of the
    grid (its coarse-stage rule)."""
    if isinstance(threshold, str):
        if threshold != "auto":
            raise ValueError(f"export.threshold must be a number or 'auto', got {threshold!r}")
        return float(density.mean() + 5.0 * density.std())
    return float(threshold)


def extract_mesh(
    scene: DensityScene, resolution: int = 128, threshold: float | str = "auto"
) -> tuple[np.ndarray, np.ndarray, float]:
    """Marching cubes of ``scene.density_grid(resolution)`` at ``threshold``.

    Returns world-space vertices (V, 3) float32 (z-up, inside [-r, r]³), faces (F, 3) int64 with
    outward winding, and the numeric threshold used. Raises ``ValueError`` when no density
    crosses the threshold.
    """
    if resolution < 2:
        raise ValueError(f"export.resolution must be >= 2, got {resolution}")
    radius = float(scene.config.radius)
    density = scene.density_grid(resolution).detach().float().cpu().numpy()
    level = resolve_threshold(density, threshold)
    if not np.isfinite(density).all():
        raise ValueError("density grid has NaN/inf values; the scene diverged, nothing to export")
    if not density.max() > level:
        raise ValueError(
            f"scene is empty: no density above threshold {level:.4g} (grid max {density.max():.4g}); "
            "lower export.threshold"
        )
    if not density.min() < level:
        raise ValueError(
            f"scene is full: density above threshold {level:.4g} everywhere (grid min {density.min():.4g}); "
            "raise export.threshold"
        )
    # Pad with 'outside' so a surface touching the box border is closed.
    padded = np.pad(density, 1, mode="constant", constant_values=min(float(density.min()), level - 1.0))
    spacing = 2.0 * radius / (resolution - 1)
    verts, faces, _, _ = measure.marching_cubes(padded, level=level, spacing=(spacing,) * 3)
    verts = np.clip(verts - radius - spacing, -radius, radius).astype(np.float32)
    # skimage winds triangles clockwise seen from the low-density side ('descent' gradient);
    # flip them so trimesh's normals point outward (towards lower density).
    faces = faces[:, ::-1].astype(np.int64)
    return verts, faces, level


def decimate(verts: np.ndarray, faces: np.ndarray, target_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation (``fast_simplification``) to about ``target_faces`` faces."""
    import fast_simplification

    if target_faces < 4:
        raise ValueError(f"export.target_faces must be >= 4, got {target_faces}")
    if len(faces) <= target_faces:
        return verts, faces
    reduction = 1.0 - target_faces / len(faces)
    new_verts, new_faces = fast_simplification.simplify(verts, faces, target_reduction=reduction)
    return new_verts.astype(np.float32), new_faces.astype(np.int64)


def vertex_colors(scene: DensityScene, verts: np.ndarray) -> np.ndarray:
    """RGBA uint8 (V, 4) from ``scene.albedo_at`` at the (world, z-up) vertices."""
    albedo = scene.albedo_at(torch.from_numpy(verts)).detach().float().cpu().numpy()
    rgb = np.clip(np.round(albedo * 255.0), 0, 255).astype(np.uint8)
    return np.concatenate([rgb, np.full((len(rgb), 1), 255, dtype=np.uint8)], axis=1)


Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]], dtype=np.float32)
"""(x, y, z) → (x, z, −y): the scene's z-up world to glTF's y-up (a proper rotation)."""

_MTL = (
    "# modedreamer-ray mesh material (colours are per vertex)\n"
    "newmtl material_0\nKa 1.0 1.0 1.0\nKd 1.0 1.0 1.0\nKs 0.0 0.0 0.0\nd 1.0\nillum 1\n"
)


def export_mesh(
    scene: DensityScene,
    out_dir: Path | str,
    resolution: int = 128,
    threshold: float | str = "auto",
    target_faces: int | None = None,
    y_up: bool = True,
    name: str = "mesh",
) -> dict[str, Path]:
    """Write ``<name>.glb``, ``<name>.obj`` and ``<name>.mtl`` into ``out_dir``.

    ``threshold``: density iso-level (threestudio ``isosurface_threshold``; ``auto`` = mean + 5 std);
    ``target_faces``: decimate to about this many faces (None: keep all); ``y_up``: rotate the
    z-up scene to y-up, the glTF/OBJ viewer convention. Files are written under temporary
    names and renamed only once all succeeded. Returns {"glb"|"obj"|"mtl": path}.
    """
    out_dir = Path(out_dir)
    verts, faces, _ = extract_mesh(scene, resolution, threshold)
    if target_faces is not None:
        verts, faces = decimate(verts, faces, int(target_faces))
    colors = vertex_colors(scene, verts)
    if y_up:
        verts = verts @ Z_UP_TO_Y_UP.T
    mesh = trimesh.Trimesh(vertices=verts, faces=faces, vertex_colors=colors, process=False)

    out_dir.mkdir(parents=True, exist_ok=True)
    final = {kind: out_dir / f"{name}.{kind}" for kind in ("glb", "obj", "mtl")}
    # nested: all three are written before any is renamed (the MTL first, the GLB last)
    with atomic_write(final["glb"]) as glb, atomic_write(final["obj"]) as obj, atomic_write(final["mtl"]) as mtl:
        glb.write_bytes(mesh.export(file_type="glb"))
        obj_text = trimesh.exchange.obj.export_obj(
            mesh, include_normals=False, include_color=True, include_texture=False
        )
        obj.write_text(f"mtllib {final['mtl'].name}\nusemtl material_0\n" + obj_text)
        mtl.write_text(_MTL)
    return final
