"""Atomic training checkpoints: scene + optimiser + RNG state + iteration.

A checkpoint is written with :func:`stages.atomic.atomic_write` (a temporary sibling, flushed to
disk and ``os.replace``d over the previous one), so a reader sees either the old or the new file,
never a partial one. The previous checkpoint is kept as ``<name>.prev.pt`` until the next write, and
:func:`load_checkpoint` falls back to it when the newest file cannot be read. Files are read
with ``torch.load(weights_only=True)``: only tensors and plain containers.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stages.asset_layout import WORK_CHECKPOINT as CHECKPOINT_NAME
from stages.asset_layout import WORK_PREVIOUS_CHECKPOINT as PREVIOUS_NAME
from stages.atomic import atomic_write

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint exists but does not belong to this run (other config, seed or asset)."""


def atomic_torch_save(obj: Any, path: Path, keep_previous: Path | None = None) -> None:
    """``torch.save`` through :func:`~stages.atomic.atomic_write` (``keep_previous``: where the
    file it replaces goes)."""
    with atomic_write(path, keep_previous=keep_previous) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def save_checkpoint(checkpoint_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` as the newest checkpoint of ``checkpoint_dir``; returns its path.

    ``state`` must hold only tensors, numbers, strings and lists/dicts of them. The new file is
    complete on disk before the old one is renamed to ``.prev``; a failure while writing leaves
    the old checkpoint untouched.
    """
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / CHECKPOINT_NAME
    atomic_torch_save({"format_version": FORMAT_VERSION, **state}, path, keep_previous=checkpoint_dir / PREVIOUS_NAME)
    return path


def _read(path: Path) -> dict[str, Any] | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is skipped with a warning
        warnings.warn(f"ignoring unreadable checkpoint {path}: {type(error).__name__}: {error}", stacklevel=3)
        return None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or "iteration" not in state:
        warnings.warn(f"ignoring checkpoint {path}: not an optimiser checkpoint of format {FORMAT_VERSION}", stacklevel=3)
        return None
    return state


def load_checkpoint(checkpoint_dir: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint of ``checkpoint_dir`` (or its predecessor), else ``None``."""
    checkpoint_dir = Path(checkpoint_dir)
    candidates = [checkpoint_dir / CHECKPOINT_NAME, checkpoint_dir / PREVIOUS_NAME]
    states = [s for s in (_read(p) for p in candidates if p.exists()) if s is not None]
    if not states:
        return None
    return max(states, key=lambda s: int(s["iteration"]))


def to_cpu(obj: Any) -> Any:
    """Tensors (also inside dicts / lists, e.g. a module's extra state) detached onto the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_scene_state(scene: torch.nn.Module, path: Path) -> None:
    """The final scene parameters as plain tensors (``checkpoint.pt`` of an asset), atomically."""
    atomic_torch_save(to_cpu(scene.state_dict()), Path(path))


def load_scene_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_scene_state` (``weights_only=True``)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)
