"""The gallery's view of a dataset: the latest manifest row of each asset and the files it has,
by role (:data:`stages.asset_layout.ASSET_FILES`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import pyarrow.fs as pafs

from pipeline.writer import DatasetWriter, dataset_filesystem
from stages.asset_layout import MANIFEST_DIR, asset_dir, names_of

GALLERY_ROLES = ("reference", "preview", "turntable", "mesh", "mesh_obj", "mesh_mtl", "splats")
"""The asset files the page shows or offers for download."""
# Manifest columns with a field of their own in AssetRecord; the rest go to AssetRecord.details.
RECORD_COLUMNS = frozenset({"asset_id", "prompt", "status", "prompt_index", "variant", "error", "asset_dir", "files", "metrics"})


@dataclass(frozen=True)
class AssetRecord:
    """One asset as the gallery sees it: the latest manifest row for its asset_id."""

    asset_id: str
    prompt: str
    status: str
    prompt_index: int | None = None
    variant: int | None = None
    error: str | None = None
    asset_dir: str | None = None  # relative to the dataset root (POSIX)
    files: dict[str, str] = field(default_factory=dict)  # name -> relative path
    metrics: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # other manifest columns, shown as-is
    scores: dict[str, Any] = field(default_factory=dict)  # latest evaluation scores (scores/ shards)


class GalleryDataset:
    """Read access to a dataset root on any pyarrow filesystem (local path or URI such as s3://)."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.uri = os.fspath(output_dir)
        self.fs, self.root, _ = dataset_filesystem(self.uri)

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative.lstrip('/')}"

    def is_file(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type == pafs.FileType.File

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_file(self.path(relative)) as handle:
            return handle.read()


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def read_manifest(output_dir: str | os.PathLike) -> list[AssetRecord]:
    """Latest manifest row per asset_id, as :meth:`pipeline.writer.DatasetWriter.latest_rows`
    orders them (``finished_at``, ties by shard name and row order).

    Raises FileNotFoundError when ``<output>/manifest`` is missing and ValueError
    (:class:`~pipeline.shards.DamagedPartError`) naming the shard when one does not read, lacks
    a required column, or holds a ``files`` / ``metrics`` value that does not parse.
    """
    dataset = GalleryDataset(output_dir)
    if dataset.fs.get_file_info(dataset.path(MANIFEST_DIR)).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no manifest directory at {dataset.uri}/{MANIFEST_DIR} (is this a dataset output dir?)")
    rows = DatasetWriter(dataset.uri).latest_rows(strict=True)
    return [
        AssetRecord(
            asset_id=str(row["asset_id"]),
            prompt=str(row["prompt"]),
            status=str(row["status"]),
            prompt_index=_optional_int(row.get("prompt_index")),
            variant=_optional_int(row.get("variant")),
            error=row.get("error"),
            asset_dir=row.get("asset_dir"),
            files={str(k): str(v) for k, v in (row.get("files") or {}).items()},
            metrics=row.get("metrics") or {},
            details={k: v for k, v in row.items() if k not in RECORD_COLUMNS},
        )
        for row in rows.values()
    ]


def record_dir(record: AssetRecord) -> str:
    """The asset's directory relative to the dataset root."""
    return (record.asset_dir or asset_dir(record.asset_id)).rstrip("/")


def find_role_files(dataset: GalleryDataset, record: AssetRecord) -> dict[str, str]:
    """Relative paths of the asset's files of :data:`GALLERY_ROLES` that exist."""
    folder = record_dir(record)
    candidates: list[str] = []
    for value in record.files.values():  # the manifest's paths may be relative to the root or the asset dir
        candidates += [value, f"{folder}/{value}"]
    # Only paths inside the dataset: no absolute paths, no "..".
    candidates = [c for c in candidates if not PurePosixPath(c).is_absolute() and ".." not in PurePosixPath(c).parts]
    found: dict[str, str] = {}
    for role in GALLERY_ROLES:
        for name in names_of(role):
            options = [c for c in candidates if PurePosixPath(c).name == name] + [f"{folder}/{name}"]
            hit = next((c for c in options if dataset.is_file(c)), None)
            if hit is not None:
                found[role] = hit
                break
    return found
