"""The evaluation views of a committed asset.

Two sources, best first:

- ``render``: rebuild the scene from the asset's ``checkpoint.pt`` (final scene state written by
  :func:`stages.export.export_asset`) and render ``EvaluateConfig.num_views`` views evenly
  spaced in azimuth at ``EvaluateConfig.elevation``, with the distance / field of view of the
  method's evaluation cameras (``method.cameras.eval_distance`` / ``eval_fovy``). Rebuilding
  needs the method config (:class:`~stages.optimize.config.OptimizeConfig`) the asset was made
  with: read from ``<asset_dir>/method.yaml`` when present, else the caller passes it (from
  the dataset's pipeline YAML; its ``config_digest`` is checked against the asset's).
- ``preview``: the four T3Bench-like views (azimuth 0/90/180/270 at ``cameras.eval_elevation``)
  cut from the first row of ``preview.png``. Needs no config; fixed at four views.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from stages.config_loading import Choice
from stages.evaluate.clip import to_pil
from stages.evaluate.config import EvaluateConfig
from stages.asset_layout import CHECKPOINT_FILE, METHOD_FILE, PREVIEW_FILE
from stages.scene.base import Cameras
from stages.scene.cameras import CameraConfig, orbit_cameras

class ViewSource(Choice):
    """Where an asset's evaluation views come from: rendered from its checkpoint, cut from its
    ``preview.png``, or ``auto`` (render when the method config is known, else preview)."""

    auto = "auto"
    render = "render"
    preview = "preview"


VIEW_SOURCES = ViewSource.values()
PREVIEW_COLUMNS = 4
"""``preview.png`` is a grid with 4 views per row; its first row is the T3Bench views."""


class AssetViewsError(ValueError):
    """An asset's evaluation views cannot be produced; the message names the file or key."""


@dataclass
class AssetViews:
    """Views of one asset, the same camera positions for every asset of a run."""

    images: list[Image.Image]
    source: str
    """``render`` | ``preview``."""
    azimuths: list[float] = field(default_factory=list)
    elevation: float = 0.0


def evaluation_cameras(config: EvaluateConfig, cameras: CameraConfig) -> Cameras:
    """``config.num_views`` cameras, azimuth 0, 360/V, ... at ``config.elevation`` (degrees)."""
    return orbit_cameras(config.num_views, config.elevation, cameras.eval_distance, cameras.eval_fovy)


def read_method_config(asset_dir: Path) -> Any | None:
    """The asset's ``OptimizeConfig`` from ``<asset_dir>/method.yaml``, or None when absent."""
    path = Path(asset_dir) / METHOD_FILE
    if not path.is_file():
        return None
    from stages.optimize.config import load_optimize_config

    try:
        return load_optimize_config(path)
    except ValueError as error:
        raise AssetViewsError(f"{path}: {error}") from None


def load_asset_scene(asset_dir: Path, method: Any, device: torch.device, scene: nn.Module | None = None) -> nn.Module:
    """The final scene of an asset: ``build_scene(method)`` + ``checkpoint.pt``, eval mode.

    ``scene``: a scene built from the same ``method`` to load into (saves the build).
    """
    from stages.optimize.checkpoint import load_scene_state
    from stages.scene.factory import build_scene

    path = Path(asset_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise AssetViewsError(f"{path}: no scene checkpoint in the asset dir")
    try:
        state = load_scene_state(path)
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported by name
        raise AssetViewsError(f"{path}: cannot read the scene checkpoint ({type(error).__name__}: {error})") from None
    if scene is None:
        scene = build_scene(method, seed=0)  # every parameter is overwritten by the checkpoint
    try:
        scene.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as error:
        first = " ".join(str(error).split())[:400]  # the lines after the first name the keys
        raise AssetViewsError(
            f"{path}: does not fit a method.representation={method.representation!r} scene of the given "
            f"method config (was the asset made with another config?): {first}"
        ) from None
    return scene.to(device).eval()


def render_asset_views(
    asset_dir: Path, config: EvaluateConfig, method: Any, device: torch.device, scene: nn.Module | None = None
) -> AssetViews:
    """Render the evaluation views of the asset's final scene at ``config.resolution``."""
    from stages.scene.views import render_views

    scene = load_asset_scene(asset_dir, method, device, scene)
    cameras = evaluation_cameras(config, method.cameras)
    rgb = render_views(scene, cameras, config.resolution, chunk=method.export.render_chunk)["rgb"]  # (V,3,R,R)
    return AssetViews(
        images=[to_pil(view) for view in rgb],
        source="render",
        azimuths=[float(a) for a in cameras.azimuth],
        elevation=float(config.elevation),
    )


def preview_views(asset_dir: Path, elevation: float = 15.0) -> AssetViews:
    """The four T3Bench views from the first row of ``preview.png`` (``elevation``: the
    method's ``cameras.eval_elevation``, recorded only)."""
    path = Path(asset_dir) / PREVIEW_FILE
    if not path.is_file():
        raise AssetViewsError(f"{path}: no preview image in the asset dir")
    with Image.open(path) as opened:
        grid = opened.convert("RGB")
    tile = grid.width // PREVIEW_COLUMNS
    if tile < 1 or grid.height < tile:
        raise AssetViewsError(f"{path}: {grid.width}x{grid.height} is not a grid of {PREVIEW_COLUMNS} square views per row")
    images = [grid.crop((c * tile, 0, (c + 1) * tile, tile)) for c in range(PREVIEW_COLUMNS)]
    return AssetViews(images=images, source="preview", azimuths=[0.0, 90.0, 180.0, 270.0], elevation=elevation)


def asset_views(
    asset_dir: Path,
    config: EvaluateConfig,
    method: Any | None = None,
    views: str = "auto",
    device: torch.device | None = None,
    scene: nn.Module | None = None,
) -> AssetViews:
    """Evaluation views of one asset.

    ``views``: ``render`` (needs ``method`` or ``method.yaml``; errors otherwise), ``preview``,
    or ``auto`` (render when a method config is known, else the preview views). A
    ``method.yaml`` in the asset dir wins over ``method``. ``scene``: a scene built from
    ``method`` to reuse (its state is replaced by the asset's).
    """
    if views not in VIEW_SOURCES:
        raise AssetViewsError(f"views must be one of {VIEW_SOURCES}, got {views!r}")
    asset_dir = Path(asset_dir)
    if views == "preview":
        return preview_views(asset_dir, method.cameras.eval_elevation if method is not None else 15.0)
    own = read_method_config(asset_dir)
    if own is not None:
        method, scene = own, None
    if method is None:
        if views == "render":
            raise AssetViewsError(
                f"{asset_dir}: views=render needs the asset's method config ({METHOD_FILE} in the asset dir "
                "or the dataset's pipeline YAML as dataset_config)"
            )
        return preview_views(asset_dir)
    return render_asset_views(asset_dir, config, method, device or torch.device("cpu"), scene)
