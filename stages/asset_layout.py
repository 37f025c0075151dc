"""The dataset layout: every directory of a dataset and every file of an asset, with its role.

This module is the one place these names are spelled. The library writes an asset's files
(:func:`stages.export.export_asset`, :mod:`stages.optimize`), the pipeline commits them and
indexes them (``pipeline/writer.py``, ``pipeline/manifest.py``); readers (evaluation, the
gallery, re-export, tracking) find them here by role.

    <output>/assets/<asset_id>/      one committed asset: the files of ASSET_FILES
    <output>/manifest/part-*.parquet one row per finished asset (pipeline/manifest.py)
    <output>/scores/part-*.parquet   one row per evaluated asset (pipeline/evaluate/)
    <output>/evaluation/<run>/       evaluation reports
    <output>/.work/<asset_id>/       unfinished assets: checkpoints, reference, MLflow run id
    <output>/.tmp/                   assets being staged before their commit (rename)
    <output>/damaged/                shards and assets set aside by the integrity checks
    <output>/gallery/                the static gallery (derived; delete at will)

A file name starting with ``.`` is never part of the dataset (temporary siblings of
:func:`stages.atomic.atomic_write`, staging and work dirs).
"""

from __future__ import annotations

from dataclasses import dataclass

# ------------------------------------------------------------------ dataset directories
ASSETS_DIR = "assets"
MANIFEST_DIR = "manifest"
SCORES_DIR = "scores"
REPORTS_DIR = "evaluation"
WORK_DIR = ".work"
STAGING_DIR = ".tmp"
DAMAGED_DIR = "damaged"
GALLERY_DIR = "gallery"
SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"

# ------------------------------------------------------------------ files of an asset
ASSET_RECORD = "asset.json"
"""The asset's manifest row plus the checksums of its files; written last, it marks the commit."""
METRICS_FILE = "metrics.json"
METHOD_FILE = "method.yaml"
"""The asset's ``OptimizeConfig`` (OmegaConf YAML): rebuilds the scene ``checkpoint.pt`` holds."""
CHECKPOINT_FILE = "checkpoint.pt"
REFERENCE_FILE = "reference.png"
PREVIEW_FILE = "preview.png"
TURNTABLE_STEM = "turntable"
VIDEO_FORMATS = ("mp4", "gif")
MESH_STEM = "mesh"
SPLATS_FILE = "splats.ply"

# ------------------------------------------------------------------ files of an unfinished asset (.work/<asset_id>/)
WORK_CHECKPOINT = "optimize.pt"
WORK_PREVIOUS_CHECKPOINT = "optimize.prev.pt"
WORK_TRACKING = "tracking.json"
"""The asset's MLflow run id while it is unfinished."""


@dataclass(frozen=True)
class AssetFile:
    """One file of an asset directory: its role (the key in the manifest's ``files``), the names
    it may have, and what it holds."""

    role: str
    names: tuple[str, ...]
    holds: str


ASSET_FILES: tuple[AssetFile, ...] = (
    AssetFile("reference", (REFERENCE_FILE,), "the reference image the IP side was conditioned on"),
    AssetFile("preview", (PREVIEW_FILE,), "a grid of the evaluation views"),
    AssetFile("turntable", tuple(f"{TURNTABLE_STEM}.{ext}" for ext in VIDEO_FORMATS), "a turntable video (GIF without ffmpeg)"),
    AssetFile("mesh", (f"{MESH_STEM}.glb",), "marching-cubes mesh with vertex colours, y-up glTF"),
    AssetFile("mesh_obj", (f"{MESH_STEM}.obj",), "the same mesh as OBJ"),
    AssetFile("mesh_mtl", (f"{MESH_STEM}.mtl",), "the OBJ's material"),
    AssetFile("splats", (SPLATS_FILE,), "3D Gaussian splats in the 3DGS PLY layout"),
    AssetFile("checkpoint", (CHECKPOINT_FILE,), "the final scene parameters (plain tensors, read with weights_only=True)"),
    AssetFile("method", (METHOD_FILE,), "the method config that rebuilds the scene"),
    AssetFile("metrics", (METRICS_FILE,), "final training metrics"),
    AssetFile("record", (ASSET_RECORD,), "the manifest row and file checksums (written last)"),
)
ROLES: dict[str, AssetFile] = {file.role: file for file in ASSET_FILES}


def names_of(role: str) -> tuple[str, ...]:
    """The file names an asset file of ``role`` may have (``KeyError`` for an unknown role)."""
    return ROLES[role].names


def turntable_name(video_format: str) -> str:
    return f"{TURNTABLE_STEM}.{video_format}"


def asset_dir(asset_id: str) -> str:
    """An asset's directory relative to the dataset root (POSIX; rows store paths this way)."""
    return f"{ASSETS_DIR}/{asset_id}"


def asset_path(asset_id: str, name: str) -> str:
    """A file of an asset relative to the dataset root (the form of the manifest's ``files``)."""
    return f"{asset_dir(asset_id)}/{name}"


def is_shard(name: str) -> bool:
    """Whether a file name is a Parquet shard of ``manifest/`` or ``scores/``."""
    return name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX)
