"""Parquet shards of a dataset directory (``manifest/``, ``scores/``): each written once under a
fresh name, never rewritten, read through ``pyarrow.dataset``.

A shard is ``part-<UTC time>-<8 hex>.parquet``, so name order is write order. Locally it is
written through :func:`stages.atomic.atomic_write` (readers never see a half-written footer);
object stores publish a file when it is closed. ``pyarrow.dataset`` finds the shards and skips
``.``/``_`` names (temporary siblings). Shards are read one by one, so a shard that does not read
(truncated, not Parquet) is named in a :class:`DamagedPartError` and the others still count.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from stages.asset_layout import SHARD_PREFIX, SHARD_SUFFIX, is_shard
from stages.atomic import atomic_write


class DamagedPartError(ValueError):
    """A shard that does not read (truncated, not Parquet, not in the expected form)."""

    def __init__(self, part: str, reason: str) -> None:
        super().__init__(f"shard {part} is damaged ({reason})")
        self.part = part
        self.reason = reason


def shard_name() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    return f"{SHARD_PREFIX}{stamp}-{uuid.uuid4().hex[:8]}{SHARD_SUFFIX}"


def write_shard(fs: pafs.FileSystem, directory: str, table: pa.Table, local: bool) -> str:
    """Write ``table`` as a new shard of ``directory``; returns its path."""
    fs.create_dir(directory, recursive=True)
    final = f"{directory}/{shard_name()}"
    if local:
        with atomic_write(final) as tmp:
            pq.write_table(table, tmp)
    else:
        pq.write_table(table, final, filesystem=fs)
    return final


def _fragments(fs: pafs.FileSystem, directory: str) -> list[ds.ParquetFileFragment]:
    try:
        # an explicit (empty) schema: discovery opens no file, so a damaged one is met per shard
        dataset = ds.dataset(directory, filesystem=fs, format="parquet", schema=pa.schema([]))
    except FileNotFoundError:
        return []
    fragments = [f for f in dataset.get_fragments() if is_shard(PurePosixPath(f.path).name)]
    return sorted(fragments, key=lambda f: f.path)


def shard_paths(fs: pafs.FileSystem, directory: str) -> list[str]:
    """The shards of ``directory`` in name (= write) order; [] when it does not exist."""
    return [fragment.path for fragment in _fragments(fs, directory)]


def _damage(part: str, error: BaseException) -> DamagedPartError:
    first = str(error).splitlines()[0] if str(error) else ""
    return DamagedPartError(part, f"{type(error).__name__}: {first}")


def read_fragment(fragment: ds.ParquetFileFragment) -> pa.Table:
    """One shard as written (its own schema); :class:`DamagedPartError` when it does not read.
    An I/O error of the file system itself is raised as it is."""
    try:
        return fragment.to_table(schema=fragment.physical_schema)
    except (pa.ArrowException, OSError) as error:
        if isinstance(error, OSError) and not isinstance(error, pa.ArrowException) and error.errno is not None:
            raise
        raise _damage(fragment.path, error) from None


def read_shard(fs: pafs.FileSystem, path: str) -> pa.Table:
    """The shard at ``path`` (see :func:`read_fragment`)."""
    return read_fragment(ds.ParquetFileFormat().make_fragment(path, filesystem=fs))


def read_shards(
    fs: pafs.FileSystem, directory: str, on_damaged: Callable[[DamagedPartError], None] | None = None
) -> Iterator[tuple[str, pa.Table]]:
    """(path, table) of every shard of ``directory`` in name order. A damaged shard goes to
    ``on_damaged`` and is skipped; without it, its :class:`DamagedPartError` is raised."""
    for fragment in _fragments(fs, directory):
        try:
            yield fragment.path, read_fragment(fragment)
        except DamagedPartError as error:
            if on_damaged is None:
                raise
            on_damaged(error)
