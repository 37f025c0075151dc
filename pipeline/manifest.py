"""The manifest row: one finished asset (succeeded or failed), its Arrow schema, and its forms.

A row is built by :meth:`ManifestRow.for_job` (the optimiser task, the driver's failed rows) or
:meth:`ManifestRow.from_mapping` (any dict: an ``asset.json``, a row read back), and stored in
``manifest/part-*.parquet`` with :data:`MANIFEST_SCHEMA`: ``files`` and ``metrics`` are Arrow
maps, ``started_at`` / ``finished_at`` UTC timestamps, so pandas, DuckDB or Polars read them as
such. In Python (rows read back, ``asset.json``) a row is its :meth:`ManifestRow.to_dict`
form: ``files`` and ``metrics`` dicts, timestamps ISO-8601 strings (they sort in time order).

Datasets written before these columns were typed (``files`` / ``metrics`` JSON strings,
timestamps ISO strings) read the same: :func:`rows_of_table` accepts both forms, shard by shard.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

import pyarrow as pa

from pipeline.shards import DamagedPartError
from stages.asset_layout import asset_dir, asset_path

STATUSES = ("succeeded", "failed")
REQUIRED_COLUMNS = ("asset_id", "prompt", "status")
TIMESTAMP = pa.timestamp("us", tz="UTC")

MANIFEST_SCHEMA = pa.schema(
    [
        ("asset_id", pa.string()),
        ("prompt", pa.string()),
        ("prompt_index", pa.int64()),
        ("variant", pa.int64()),
        ("reference_seed", pa.int64()),
        ("seed", pa.int64()),
        ("method", pa.string()),
        ("representation", pa.string()),
        ("config_digest", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("asset_dir", pa.string()),
        ("files", pa.map_(pa.string(), pa.string())),
        ("metrics", pa.map_(pa.string(), pa.float64())),
        ("iterations", pa.int64()),
        ("duration_s", pa.float64()),
        ("started_at", TIMESTAMP),
        ("finished_at", TIMESTAMP),
        ("mlflow_run_id", pa.string()),
    ]
)
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)
MAP_COLUMNS = ("files", "metrics")
TIME_COLUMNS = ("started_at", "finished_at")


def utc_now() -> str:
    """ISO-8601 UTC timestamp with microseconds (sorts lexically in time order)."""
    return iso(datetime.now(timezone.utc))


def iso(moment: datetime) -> str:
    """``moment`` as the manifest's ISO form (UTC, microseconds); naive times are taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def parse_time(value: Any, column: str) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            raise ValueError(f"column {column!r} is not an ISO-8601 time: {value!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def parse_map(value: Any, column: str) -> dict[str, Any]:
    """A ``files`` / ``metrics`` value in any stored form (dict, Arrow map pairs, JSON string)."""
    if value is None or value == "":
        return {}
    if isinstance(value, list):  # Arrow map read without maps_as_pydicts
        value = dict(value)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"column {column!r} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"column {column!r} must be a JSON object, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class ManifestRow:
    """One row of ``manifest/``: what was made for (prompt, variant), how, and where it lies.
    Paths in ``asset_dir`` and ``files`` are relative to the dataset root."""

    asset_id: str
    prompt: str
    status: str
    """``succeeded`` | ``failed``."""
    prompt_index: int | None = None
    variant: int | None = None
    reference_seed: int | None = None
    seed: int | None = None
    method: str | None = None
    """The loss (``isd``, ``sds``, ...)."""
    representation: str | None = None
    config_digest: str | None = None
    """The asset's identity digest (:func:`stages.optimize.identity.identity_digest`)."""
    error: str | None = None
    asset_dir: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    """role (:data:`stages.asset_layout.ASSET_FILES`) → path."""
    metrics: dict[str, float] = field(default_factory=dict)
    iterations: int | None = 0
    duration_s: float | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    mlflow_run_id: str | None = None

    def __post_init__(self) -> None:
        """Values in any stored form (JSON strings, ISO strings) are normalised; a bad one
        raises ``ValueError`` naming its column."""
        if not self.asset_id or self.status not in STATUSES:
            raise ValueError(f"manifest row needs asset_id and status {'|'.join(STATUSES)}, got {self.asset_id!r}, {self.status!r}")
        files = parse_map(self.files, "files")
        metrics = parse_map(self.metrics, "metrics")
        try:
            metrics = {str(k): float(v) for k, v in metrics.items()}
        except (TypeError, ValueError):
            raise ValueError(f"asset {self.asset_id!r}: column 'metrics' holds a value that is not a number: {metrics}") from None
        object.__setattr__(self, "files", {str(k): str(v) for k, v in files.items()})
        object.__setattr__(self, "metrics", metrics)
        for column in TIME_COLUMNS:
            object.__setattr__(self, column, parse_time(getattr(self, column), column))

    @classmethod
    def for_job(cls, job: Any, method: Any, **values: Any) -> ManifestRow:
        """The row of a :class:`~pipeline.jobs.Job` made with ``method`` (an ``OptimizeConfig``);
        ``values`` gives the rest (status, files as role → name in the asset dir, metrics, ...)."""
        files = {role: asset_path(job.asset_id, name) for role, name in sorted(dict(values.pop("files", None) or {}).items())}
        base = {
            "asset_id": job.asset_id,
            "prompt": job.prompt,
            "prompt_index": job.prompt_index,
            "variant": job.variant,
            "reference_seed": job.reference_seed,
            "seed": job.seed,
            "method": method.loss,
            "representation": method.representation,
            "config_digest": job.config_digest,
            "asset_dir": asset_dir(job.asset_id),
            "mlflow_run_id": job.mlflow_run_id,
        }
        return cls.from_mapping({**base, **values, "files": files})

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> ManifestRow:
        """A row from any dict of its columns (extra keys dropped), in the typed or the earlier
        (JSON strings, ISO strings) form; a bad value raises ``ValueError`` naming its column."""
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``asset.json``, rows in Python): timestamps as ISO strings."""
        out = asdict(self)
        for column in TIME_COLUMNS:
            out[column] = None if out[column] is None else iso(out[column])
        return out


def manifest_table(rows: Iterable[ManifestRow | Mapping[str, Any]]) -> pa.Table:
    """Rows (ManifestRow or any mapping :meth:`ManifestRow.from_mapping` takes) as one Arrow
    table of :data:`MANIFEST_SCHEMA`."""
    typed = [row if isinstance(row, ManifestRow) else ManifestRow.from_mapping(row) for row in rows]
    return pa.Table.from_pylist([asdict(row) for row in typed], schema=MANIFEST_SCHEMA)


def decode_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored row (or ``asset.json``) in the :meth:`ManifestRow.to_dict` form: ``files`` /
    ``metrics`` dicts, timestamps ISO strings. Other keys (checksums, export digest, columns
    this version does not know) are kept; values are not validated (see :meth:`ManifestRow.from_mapping`)."""
    out = dict(row)
    for column in MAP_COLUMNS:
        if column in out:
            out[column] = parse_map(out[column], column)
    for column in TIME_COLUMNS:
        if column in out:
            moment = parse_time(out[column], column)
            out[column] = None if moment is None else iso(moment)
    return out


def rows_of_table(table: pa.Table, part: str) -> list[dict[str, Any]]:
    """The rows of one manifest shard in the :meth:`ManifestRow.to_dict` form, whichever form
    it was written in; :class:`~pipeline.shards.DamagedPartError` naming the shard when a
    required column is missing or a value does not parse."""
    missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
    if missing:
        raise DamagedPartError(part, f"missing column(s) {missing}")
    rows = []
    for index, row in enumerate(table.to_pylist(maps_as_pydicts="strict")):
        try:
            rows.append(decode_row(row))
        except ValueError as error:
            raise DamagedPartError(part, f"row {index}: {error}") from None
    return rows
