"""Is the dataset on disk what the run wrote? Checksums of committed files, and manifest repair.

- Every committed asset's ``asset.json`` records ``checksums``: the SHA-256 of each file it
  committed (:func:`file_checksums`). :func:`verify_assets` checks them (``--verify``) and
  :func:`set_aside_assets` moves a damaged asset to ``<output>/damaged/assets/`` so the run
  makes it again.
- :func:`repair_manifest` sets aside manifest shards that do not read, gives every committed
  asset its row back from its ``asset.json``, and keeps one row per asset_id. It says what it
  did in one line each; nothing is ever deleted but superseded rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.writer import DatasetWriter
from stages.asset_layout import ASSET_RECORD, ASSETS_DIR, DAMAGED_DIR, MANIFEST_DIR
from stages.atomic import is_temporary

CHECKSUM = "sha256"
_CHUNK = 1 << 20


def _sha256(stream: Any) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def file_checksums(directory: Path) -> dict[str, str]:
    """``{relative POSIX path: "sha256:<hex>"}`` of every file under ``directory`` but ``asset.json``
    and temporary siblings."""
    directory = Path(directory)
    out = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != ASSET_RECORD and not is_temporary(p.name)):
        with open(path, "rb") as stream:
            out[path.relative_to(directory).as_posix()] = f"{CHECKSUM}:{_sha256(stream)}"
    return out


@dataclass
class VerifyReport:
    """What :func:`verify_assets` found."""

    checked: int = 0
    unverifiable: list[str] = field(default_factory=list)
    """Committed before checksums were recorded: nothing to check them against."""
    damaged: dict[str, list[str]] = field(default_factory=dict)
    """asset_id -> what is wrong (file missing, checksum differs, asset.json unreadable)."""

    def lines(self) -> list[str]:
        lines = [
            f"verify: {self.checked} committed assets checked, {len(self.damaged)} damaged"
            + (f", {len(self.unverifiable)} without checksums (committed before they were recorded)" if self.unverifiable else "")
        ]
        lines += [f"  damaged {asset_id}: {'; '.join(problems)}" for asset_id, problems in sorted(self.damaged.items())]
        return lines


def verify_asset(writer: DatasetWriter, asset_id: str) -> list[str] | None:
    """What is wrong with one committed asset ([] when nothing), None when it has no checksums."""
    try:
        record = writer.read_record(asset_id)
    except (OSError, ValueError) as error:  # unreadable or not JSON
        return [f"{ASSET_RECORD} unreadable ({type(error).__name__})"]
    checksums = record.get("checksums")
    if not isinstance(checksums, dict):
        return None
    problems = []
    for name, expected in sorted(checksums.items()):
        path = writer.path(ASSETS_DIR, asset_id, name)
        try:
            with writer.fs.open_input_stream(path) as stream:
                actual = f"{CHECKSUM}:{_sha256(stream)}"
        except FileNotFoundError:
            problems.append(f"{name} missing")
            continue
        if actual != expected:
            problems.append(f"{name} checksum differs")
    return problems


def verify_assets(writer: DatasetWriter) -> VerifyReport:
    """Check every committed asset's files against the checksums in its ``asset.json``."""
    report = VerifyReport()
    for asset_id in sorted(writer.committed_ids()):
        report.checked += 1
        problems = verify_asset(writer, asset_id)
        if problems is None:
            report.unverifiable.append(asset_id)
        elif problems:
            report.damaged[asset_id] = problems
    return report


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")


def set_aside_assets(writer: DatasetWriter, asset_ids: list[str]) -> list[str]:
    """Move damaged assets to ``<output>/damaged/assets/<asset_id>-<time>/`` (kept for a look,
    out of the dataset), so the next plan sees them as not done. Returns where they went."""
    moved = []
    for asset_id in asset_ids:
        source = writer.path(ASSETS_DIR, asset_id)
        target = writer.path(DAMAGED_DIR, ASSETS_DIR, f"{asset_id}-{_stamp()}")
        writer.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if writer.is_local:
            Path(source).rename(target)
        else:  # object stores have no directory rename: copy, then delete
            pafs.copy_files(source, target, source_filesystem=writer.fs, destination_filesystem=writer.fs)
            writer.fs.delete_dir(source)
        moved.append(target)
    return moved


def requeue_damaged(writer: DatasetWriter) -> list[str]:
    """``--verify``: check every committed asset and set the damaged ones aside, so the run
    makes them again; returns the lines that say so."""
    report = verify_assets(writer)
    moved = set_aside_assets(writer, sorted(report.damaged))
    lines = report.lines()
    if moved:
        lines.append(f"verify: {len(moved)} damaged assets moved to {writer.path(DAMAGED_DIR, ASSETS_DIR)}; this run makes them again")
    return lines


@dataclass
class Repair:
    """What :func:`repair_manifest` did."""

    set_aside: list[tuple[str, str, str]] = field(default_factory=list)
    reconciled: int = 0
    superseded: int = 0
    unreadable: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lines = [
            f"manifest shard {part} is damaged ({reason}): moved to {target}; "
            "the rows of its committed assets are rebuilt from their asset.json"
            for part, target, reason in self.set_aside
        ]
        lines += [
            f"assets/{asset_id}/{ASSET_RECORD} does not read: the asset is left as it is (--verify sets it aside and redoes it)"
            for asset_id in self.unreadable
        ]
        if self.superseded:
            lines.append(f"manifest: {self.superseded} superseded rows dropped (one row per asset_id, the newest)")
        return lines


def repair_manifest(writer: DatasetWriter, compact: bool = True) -> Repair:
    """Set aside damaged shards, give committed assets their rows back, and (``compact``) keep
    one row per asset_id."""
    repair = Repair(set_aside=writer.set_aside_damaged_parts())
    repair.reconciled = len(writer.reconcile())
    repair.unreadable = sorted(writer.unreadable_records)
    if compact:
        repair.superseded = writer.compact_manifest()
    return repair


def damaged_parts_note(writer: DatasetWriter) -> list[str]:
    """Lines for a reader that must not write (``--dry-run``): shards the last read skipped."""
    return [
        f"manifest shard {part} is damaged ({reason}); a run moves it to {writer.path(DAMAGED_DIR, MANIFEST_DIR)} "
        "and rebuilds the rows of its committed assets from their asset.json"
        for part, reason in writer.damaged_parts.items()
    ]

