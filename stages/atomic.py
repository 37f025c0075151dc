"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

Every file the project writes in place (asset files, manifest and score shards, checkpoints,
reports, gallery pages) goes through :func:`atomic_write`: the content is written to a temporary
sibling, flushed to disk (``fsync``) and ``os.replace``d onto the final name, an atomic rename on
POSIX and Windows. Temporary siblings are named ``.<name>.<random>.tmp<suffix>``: the leading
dot makes ``pyarrow.dataset`` skip them (it ignores ``.``/``_`` files) and :func:`is_temporary`
lets the checksums of an asset skip them; the suffix is the final one, so writers that pick a
format by extension (ffmpeg) still do.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMP_PREFIX = "."
"""Temporary siblings start with this; dataset readers skip such names."""


def temp_sibling(path: Path) -> Path:
    """A fresh temporary name next to ``path`` (same directory, so the rename stays atomic)."""
    return path.with_name(f"{TEMP_PREFIX}{path.name}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")


def is_temporary(name: str) -> bool:
    """Whether a file name is a temporary sibling (or another hidden file), not a dataset file."""
    return name.startswith(TEMP_PREFIX)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike[str], keep_previous: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (with any library); when the block ends
    without an error, fsync it and ``os.replace`` it onto ``path``; on an error, delete it and
    leave ``path`` as it was.

    ``keep_previous``: move the file being replaced there first (a checkpoint's ``.prev``), so
    the old file survives until the new one is complete.

        with atomic_write(out / "asset.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        _fsync(tmp)
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
