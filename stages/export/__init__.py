"""Write the files a user opens for one asset (names and roles: :mod:`stages.asset_layout`).

:func:`export_asset` renders the preview grid and the turntable, saves the reference image and
the final scene state, and calls the representation's exporters: a 3DGS PLY for splat scenes
(:mod:`stages.export.ply`) and a marching-cubes mesh of any scene with a density field — NeRF, or
splats read as a sum of Gaussians (:mod:`stages.export.mesh`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stages.asset_layout import CHECKPOINT_FILE, MESH_STEM, METHOD_FILE, PREVIEW_FILE, REFERENCE_FILE, SPLATS_FILE, TURNTABLE_STEM
from stages.export.preview import as_rgb_image, image_grid, save_png
from stages.export.video import write_video
from stages.scene.cameras import CameraConfig, preview_cameras, turntable_cameras

EMPTY_OPACITY = 1e-3
"""A scene whose largest rendered opacity over the preview views stays below this is empty."""


class EmptySceneError(ValueError):
    """The scene renders nothing from the preview views: there is nothing to export."""


def _render(scene: torch.nn.Module, cameras: Any, resolution: int, chunk: int) -> dict[str, torch.Tensor]:
    from stages.scene.views import render_views

    return render_views(scene, cameras, resolution, chunk=chunk)


def export_asset(scene: torch.nn.Module, out_dir: Path | str, config: Any, reference: Any | None = None) -> dict[str, str]:
    """Write ``preview.png``, ``turntable.mp4`` (or ``.gif``), ``reference.png`` (when given),
    ``checkpoint.pt``, ``method.yaml`` (the config that rebuilds the scene) and ``mesh.glb`` (+ ``mesh.obj``/``mesh.mtl``) or ``splats.ply`` into
    ``out_dir``; returns {kind: file name}.

    ``config`` is an :class:`~stages.optimize.config.OptimizeConfig` (its ``export`` and
    ``cameras`` sections are used). ``reference`` is a PIL image, a path or an array; a bad
    one raises ``ValueError`` naming it. An empty scene raises :class:`EmptySceneError`
    before any file is written.
    """
    from stages.optimize.checkpoint import save_scene_state
    from stages.optimize.config import save_method_config

    ex = config.export
    cameras: CameraConfig = config.cameras
    out_dir = Path(out_dir)
    reference_image = None if reference is None else as_rgb_image(reference)
    views = _render(scene, preview_cameras(cameras), ex.preview_resolution, ex.render_chunk)
    max_opacity = float(views["opacity"].max()) if views["opacity"].numel() else 0.0
    if not max_opacity >= EMPTY_OPACITY:
        raise EmptySceneError(
            f"scene {type(scene).__name__} is empty (largest opacity over the preview views is "
            f"{max_opacity:.3g} < {EMPTY_OPACITY}); nothing to export to {out_dir}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    files["preview"] = save_png(image_grid(views["rgb"], columns=4), out_dir / PREVIEW_FILE).name
    frames = _render(scene, turntable_cameras(cameras, ex.turntable_frames), ex.turntable_resolution, ex.render_chunk)["rgb"]
    files["turntable"] = write_video(frames, out_dir, TURNTABLE_STEM, fps=ex.turntable_fps, video_format=ex.video_format).name
    if reference_image is not None:
        files["reference"] = save_png(reference_image, out_dir / REFERENCE_FILE).name
    save_scene_state(scene, out_dir / CHECKPOINT_FILE)
    files["checkpoint"] = CHECKPOINT_FILE
    files["method"] = save_method_config(config, out_dir / METHOD_FILE).name
    files.update(_export_geometry(scene, out_dir, config))
    return files


def _mesh_threshold(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"method.export.mesh_threshold must be 'auto' or a number, got {value!r}") from None


def _export_geometry(scene: torch.nn.Module, out_dir: Path, config: Any) -> dict[str, str]:
    """``splats.ply`` for splat scenes; ``mesh.glb``/``mesh.obj``/``mesh.mtl`` for scenes with a
    density field (NeRF, and splats read as a sum of Gaussians)."""
    ex = config.export
    files: dict[str, str] = {}
    if hasattr(scene, "to_ply_dict"):
        from stages.export.ply import export_splats_ply

        files["splats"] = Path(export_splats_ply(scene, out_dir / SPLATS_FILE)).name
    if ex.mesh and hasattr(scene, "density_grid"):
        from stages.export.mesh import export_mesh

        written = export_mesh(
            scene, out_dir, resolution=ex.mesh_resolution, threshold=_mesh_threshold(str(ex.mesh_threshold)),
            target_faces=ex.mesh_target_faces or None, name=MESH_STEM,
        )
        names = {"glb": "mesh", "obj": "mesh_obj", "mtl": "mesh_mtl"}
        files.update({names.get(kind, kind): Path(path).name for kind, path in written.items()})
    return files
