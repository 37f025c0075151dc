"""Score shards: ``<dataset>/scores/part-*.parquet``, one row per evaluated asset.

Scores live in their own shards, not in the manifest: a manifest row means "this asset was
produced", ordered by ``finished_at``; a score row means "this asset was scored", ordered by
``evaluated_at``. Shards are never rewritten; the latest score row of an asset wins
(:func:`latest_scores`), as in the manifest.
"""

from __future__ import annotations

from typing import Any, Sequence

import pyarrow as pa

from pipeline.shards import read_shards, write_shard
from pipeline.writer import DatasetWriter
from stages.asset_layout import SCORES_DIR

TOY_COLUMNS = (
    "toy_identity", "toy_reference", "toy_identity_correct", "toy_psnr_reference", "toy_psnr_identity",
    "toy_consistency", "toy_iou",
)
"""Toy-world fidelity scores (:meth:`stages.toyworld.fidelity.Fidelity.metrics`); null otherwise."""

SCORES_SCHEMA = pa.schema(
    [
        ("asset_id", pa.string()),
        ("prompt", pa.string()),
        ("prompt_index", pa.int64()),
        ("variant", pa.int64()),
        ("config_digest", pa.string()),
        ("asset_finished_at", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("alignment", pa.float64()),
        ("quality", pa.float64()),
        ("num_views", pa.int64()),
        ("view_source", pa.string()),
        ("eval_digest", pa.string()),
        ("clip", pa.string()),
        ("aesthetic_head", pa.string()),
        ("image_features", pa.list_(pa.list_(pa.float32()))),
        ("evaluated_at", pa.string()),
        *((name, pa.float64()) for name in TOY_COLUMNS),
    ]
)
SCORE_COLUMNS = tuple(SCORES_SCHEMA.names)


def write_scores(writer: DatasetWriter, rows: Sequence[dict[str, Any]]) -> str | None:
    """Write rows as one new ``scores/part-*.parquet``; returns its path (None: no rows)."""
    if not rows:
        return None
    table = pa.Table.from_pylist([{c: row.get(c) for c in SCORE_COLUMNS} for row in rows], schema=SCORES_SCHEMA)
    return write_shard(writer.fs, writer.path(SCORES_DIR), table, writer.is_local)


def read_scores(writer: DatasetWriter) -> list[dict[str, Any]]:
    """Every score row of every shard, oldest first by ``evaluated_at``."""
    rows: list[dict[str, Any]] = []
    for _, table in read_shards(writer.fs, writer.path(SCORES_DIR)):
        rows.extend(table.to_pylist())
    rows.sort(key=lambda row: row["evaluated_at"] or "")
    return rows


def latest_scores(writer: DatasetWriter) -> dict[str, dict[str, Any]]:
    """asset_id → its latest score row (later rows supersede earlier ones)."""
    return {row["asset_id"]: row for row in read_scores(writer)}
