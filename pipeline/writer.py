"""The dataset on disk: atomic asset commits and Parquet manifest shards.

Layout (:mod:`stages.asset_layout`): ``<output>/assets/<asset_id>/`` holds one finished asset;
``<output>/manifest/part-<timestamp>-<uuid>.parquet`` one row per finished asset (later rows
for an asset_id supersede earlier ones; :meth:`DatasetWriter.compact_manifest` drops the
superseded ones). Rows are :class:`~pipeline.manifest.ManifestRow`; shards are read and written
by :mod:`pipeline.shards`. Shards that do not read are set aside in ``<output>/damaged/manifest/``.
An asset is staged in ``<output>/.tmp/`` and renamed into place, so it is either complete or
absent. Its ``asset.json`` (written last) repeats its manifest row, so a committed asset whose row was never written (driver died between the two)
gets its row back on the next run (:meth:`DatasetWriter.reconcile`).

``output`` is a local path or a pyarrow filesystem URI. On object stores a directory rename
does not exist: files are uploaded with ``asset.json`` last, and only assets with an
``asset.json`` count as committed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow.fs as pafs

from pipeline.manifest import MANIFEST_COLUMNS, MANIFEST_SCHEMA, ManifestRow, decode_row, manifest_table, rows_of_table, utc_now
from pipeline.shards import DamagedPartError, read_shard, read_shards, shard_paths, write_shard
from stages.asset_layout import ASSET_RECORD, ASSETS_DIR, DAMAGED_DIR, MANIFEST_DIR, STAGING_DIR
from stages.atomic import atomic_write

__all__ = [
    "ASSET_RECORD", "MANIFEST_COLUMNS", "MANIFEST_SCHEMA", "DamagedPartError", "DatasetWriter", "dataset_filesystem", "utc_now",
]

def dataset_filesystem(output: str) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, root path inside it, is_local)."""
    if "://" in output:
        fs, root = pafs.FileSystem.from_uri(output)
        return fs, root.rstrip("/"), isinstance(fs, pafs.LocalFileSystem)
    root = str(Path(output).expanduser().resolve())
    return pafs.LocalFileSystem(), root, True


class DatasetWriter:
    """Reads and writes one dataset. Safe to construct on any worker that can reach ``output``."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.fs, self.root, self.is_local = dataset_filesystem(output)
        self.damaged_parts: dict[str, str] = {}
        """Shards the last :meth:`manifest_rows` could not read: path -> why."""
        self.unreadable_records: list[str] = []
        """Committed assets whose ``asset.json`` the last :meth:`reconcile` could not read."""

    # ---------------------------------------------------------------- paths
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def local_root(self) -> Path | None:
        """The dataset root as a local Path (local outputs), else None."""
        return Path(self.root) if self.is_local else None

    # ---------------------------------------------------------------- assets
    def staging_dir(self, asset_id: str) -> Path:
        """A fresh local directory to write an asset into before :meth:`commit`."""
        if self.is_local:
            tmp = Path(self.root) / STAGING_DIR
            tmp.mkdir(parents=True, exist_ok=True)
            path = tmp / f"{asset_id}-{uuid.uuid4().hex[:8]}"
            path.mkdir()
            return path
        return Path(tempfile.mkdtemp(prefix=f"{asset_id}-"))

    def is_committed(self, asset_id: str) -> bool:
        info = self.fs.get_file_info(self.path(ASSETS_DIR, asset_id, ASSET_RECORD))
        return info.type == pafs.FileType.File

    def commit(self, asset_id: str, staged: Path) -> bool:
        """Move a staged asset (which must hold ``asset.json``) to ``assets/<asset_id>/``.

        Returns False, and deletes ``staged``, when the asset was already committed (a retried
        task finishing twice); the first commit wins, so an asset is never written twice.
        """
        staged = Path(staged)
        if not (staged / ASSET_RECORD).is_file():
            raise ValueError(f"staged asset {staged} has no {ASSET_RECORD}")
        final = self.path(ASSETS_DIR, asset_id)
        try:
            if self.is_committed(asset_id):
                return False
            if self.is_local:
                Path(final).parent.mkdir(parents=True, exist_ok=True)
                try:
                    # rename(2) of a directory is atomic and fails on a non-empty target.
                    Path(staged).rename(final)
                except OSError:
                    if self.is_committed(asset_id):
                        return False
                    shutil.rmtree(final, ignore_errors=True)  # an empty leftover: retry once
                    Path(staged).rename(final)
                return True
            self._upload(staged, final)
            return True
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)

    def _upload(self, staged: Path, final: str) -> None:
        files = sorted(p for p in staged.rglob("*") if p.is_file() and p.name != ASSET_RECORD)
        for file in [*files, staged / ASSET_RECORD]:  # the record last: it marks the commit
            target = f"{final}/{file.relative_to(staged).as_posix()}"
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with open(file, "rb") as src, self.fs.open_output_stream(target) as dst:
                shutil.copyfileobj(src, dst)

    def committed_ids(self) -> set[str]:
        selector = pafs.FileSelector(self.path(ASSETS_DIR), allow_not_found=True)
        ids = set()
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.Directory:
                asset_id = info.base_name
                if self.is_committed(asset_id):
                    ids.add(asset_id)
        return ids

    def read_record(self, asset_id: str) -> dict[str, Any]:
        """A committed asset's ``asset.json``: its manifest row (:meth:`ManifestRow.to_dict` form,
        also for records written before the columns were typed) plus its checksums."""
        with self.fs.open_input_stream(self.path(ASSETS_DIR, asset_id, ASSET_RECORD)) as stream:
            return decode_row(json.loads(stream.read().decode("utf-8")))

    def rewrite_record(self, asset_id: str, record: dict[str, Any]) -> None:
        """Replace a committed asset's ``asset.json`` (atomically where the store can rename):
        its MLflow run re-created, its files re-exported."""
        data = json.dumps(record, indent=2).encode()
        path = self.path(ASSETS_DIR, asset_id, ASSET_RECORD)
        if self.is_local:
            with atomic_write(path) as tmp:
                tmp.write_bytes(data)
        else:
            with self.fs.open_output_stream(path) as stream:
                stream.write(data)

    def clean_staging(self) -> None:
        """Delete leftovers of staged assets whose writer died before the rename."""
        if self.is_local:
            shutil.rmtree(Path(self.root) / STAGING_DIR, ignore_errors=True)

    # ---------------------------------------------------------------- manifest
    def write_manifest(self, rows: Iterable[ManifestRow | Mapping[str, Any]]) -> str | None:
        """Write rows (:class:`ManifestRow` or its dict forms) as one new shard; returns its path or None."""
        rows = list(rows)
        if not rows:
            return None
        return write_shard(self.fs, self.path(MANIFEST_DIR), manifest_table(rows), self.is_local)

    def manifest_parts(self) -> list[str]:
        """Paths of the manifest shards (temp files ignored), in name (= time) order."""
        return shard_paths(self.fs, self.path(MANIFEST_DIR))

    def read_part(self, part: str) -> list[dict[str, Any]]:
        """The rows of one shard; raises :class:`DamagedPartError` naming it when it does not read."""
        return rows_of_table(read_shard(self.fs, part), part)

    def manifest_rows(self, strict: bool = False) -> list[dict[str, Any]]:
        """Every row of every readable shard (:meth:`ManifestRow.to_dict` form), oldest first by
        finished_at (ties: shard, then row order). Shards that do not read raise
        :class:`DamagedPartError` (``strict``) or are skipped and listed in :attr:`damaged_parts`
        (:meth:`set_aside_damaged_parts`)."""
        rows: list[dict[str, Any]] = []
        self.damaged_parts = {}

        def damaged(error: DamagedPartError) -> None:
            self.damaged_parts[error.part] = error.reason

        for part, table in read_shards(self.fs, self.path(MANIFEST_DIR), None if strict else damaged):
            try:
                rows.extend(rows_of_table(table, part))
            except DamagedPartError as error:
                if strict:
                    raise
                damaged(error)
        rows.sort(key=lambda row: row.get("finished_at") or "")
        return rows

    def set_aside_damaged_parts(self) -> list[tuple[str, str, str]]:
        """Move every shard that does not read to ``<output>/damaged/manifest/`` (never deleted);
        returns (shard, where it went, why). :meth:`reconcile` then rebuilds the rows of committed
        assets from their ``asset.json``; a failed row lost this way only means a rerun retries it."""
        self.manifest_rows()
        moved = []
        for part, reason in self.damaged_parts.items():
            directory = self.path(DAMAGED_DIR, MANIFEST_DIR)
            self.fs.create_dir(directory, recursive=True)
            target = f"{directory}/{part.rsplit('/', 1)[-1]}"
            self.fs.move(part, target)
            moved.append((part, target, reason))
        self.damaged_parts = {}
        return moved

    def compact_manifest(self) -> int:
        """One row per asset_id: rewrite the shards holding superseded rows (an asset redone after
        its directory was deleted, a failed asset retried) as one shard of the rows that still
        count, then delete them. Returns how many superseded rows went. The new shard is written
        before the old ones go, so a crash in between leaves duplicates, never a lost row."""
        by_part = {part: self.read_part(part) for part in self.manifest_parts()}
        order = sorted(
            ((row["finished_at"] or "", part, index) for part, rows in by_part.items() for index, row in enumerate(rows)),
        )
        latest: dict[str, tuple[str, int]] = {}
        for _, part, index in order:
            latest[by_part[part][index]["asset_id"]] = (part, index)
        kept = set(latest.values())
        dirty = [part for part, rows in by_part.items() if any((part, i) not in kept for i in range(len(rows)))]
        if not dirty:
            return 0
        survivors = [by_part[part][i] for part in dirty for i in range(len(by_part[part])) if (part, i) in kept]
        self.write_manifest(survivors)
        for part in dirty:
            self.fs.delete_file(part)
        return sum(len(by_part[part]) for part in dirty) - len(survivors)

    def latest_rows(self, strict: bool = False) -> dict[str, dict[str, Any]]:
        """asset_id → its latest row (later rows supersede earlier ones)."""
        latest: dict[str, dict[str, Any]] = {}
        for row in self.manifest_rows(strict):
            latest[row["asset_id"]] = row
        return latest

    def reconcile(self) -> list[dict[str, Any]]:
        """Give every committed asset a succeeded manifest row; returns the rows written. Assets
        whose ``asset.json`` does not read are skipped and listed in :attr:`unreadable_records`."""
        latest = self.latest_rows()
        missing = []
        self.unreadable_records: list[str] = []
        for asset_id in sorted(self.committed_ids()):
            row = latest.get(asset_id)
            if row is None or row["status"] != "succeeded":
                try:
                    record = self.read_record(asset_id)
                except (OSError, ValueError):
                    self.unreadable_records.append(asset_id)
                    continue
                missing.append({**record, "mlflow_run_id": record.get("mlflow_run_id")})
        self.write_manifest(missing)
        return missing
