"""Where a model comes from: ``tiny``, a hub id, a local diffusers directory, or one checkpoint file.

Every field of :class:`~stages.models.config.ModelsConfig` is resolved by
:func:`resolve_source` into a :class:`ModelSource`; loaders (``sd.py``, ``ip_adapter.py``,
``reference.py``) then call diffusers/transformers ``from_pretrained`` / ``from_single_file``
with :func:`hub_kwargs` and inside :func:`hub_errors`, so a missing model is reported with
the config key, the id/path, and how to point the key at a local copy.

Accepted strings:

- ``tiny``: random seeded weights at toy size (no download).
- ``org/name`` or ``org/name:subfolder`` or ``org/name:subfolder/file.ext``: a hub id
  (loaded with ``local_files_only=True`` when ``HF_HUB_OFFLINE`` is set).
- an existing directory (a diffusers / transformers ``save_pretrained`` layout).
- an existing ``.safetensors`` / ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` file
  (``torch.load(weights_only=True)`` for the pickled ones).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
from huggingface_hub.errors import EntryNotFoundError
from torch import Tensor

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_HINT = (
    "A single checkpoint file needs the SD1.5 pipeline config, which diffusers takes from the hub "
    "cache; without hub access, convert the file to a diffusers directory and point the key there."
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelSourceError(ValueError):
    """A model source string cannot be resolved or loaded; the message names the config key."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model source.

    ``kind`` is ``tiny`` | ``hub`` | ``directory`` | ``file``; ``location`` the hub repo id or the
    local path; ``subfolder`` / ``filename`` come from the ``repo:subfolder/file`` form.
    """

    key: str
    kind: Literal["tiny", "hub", "directory", "file"]
    location: str
    subfolder: str | None = None
    filename: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.location)

    def describe(self) -> str:
        tail = "/".join(p for p in (self.subfolder, self.filename) if p)
        return f"{self.location}:{tail}" if self.kind == "hub" and tail else self.location


def resolve_source(value: str, key: str) -> ModelSource:
    """Classify ``value`` (the setting of config key ``key``, e.g. ``models.sd``).

    Raises :class:`ModelSourceError` naming ``key`` and ``value`` when it is none of the forms.
    """
    if not isinstance(value, str) or not value.strip():
        raise ModelSourceError(f"{key}: expected 'tiny', a hub id, a directory or a checkpoint file, got {value!r}")
    value = value.strip()
    if value == "tiny":
        return ModelSource(key, "tiny", "tiny")
    path = Path(value).expanduser()
    if path.is_dir():
        return ModelSource(key, "directory", str(path))
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise ModelSourceError(
                f"{key}: {value!r} is neither a diffusers directory nor a checkpoint file "
                f"(expected one of {', '.join(CHECKPOINT_SUFFIXES)})"
            )
        return ModelSource(key, "file", str(path))
    repo, _, tail = value.partition(":")
    looks_local = value.startswith(("/", ".", "~")) or os.sep + os.sep in value
    if not looks_local and _HUB_ID.match(repo) and not tail.startswith("/"):
        subfolder, filename = _split_tail(tail)
        return ModelSource(key, "hub", repo, subfolder, filename)
    raise ModelSourceError(
        f"{key}: {value!r} is neither a diffusers directory nor a checkpoint file "
        "(no such path), nor a hub id of the form 'org/name[:subfolder[/file]]'"
    )


def _split_tail(tail: str) -> tuple[str | None, str | None]:
    tail = tail.strip("/")
    if not tail:
        return None, None
    if tail.lower().endswith(CHECKPOINT_SUFFIXES):
        folder, _, name = tail.rpartition("/")
        return (folder or None), name
    return tail, None


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_kwargs() -> dict[str, bool]:
    """Extra ``from_pretrained`` kwargs: ``local_files_only=True`` when the hub is offline."""
    return {"local_files_only": True} if hub_offline() else {}


@contextlib.contextmanager
def hub_errors(source: ModelSource, what: str = "model", hint: str = "") -> Iterator[None]:
    """Turn hub / file-system errors of a load into a :class:`ModelSourceError` that says how
    to point ``source.key`` at a local path (``hint`` is appended for local sources)."""
    try:
        yield
    except ModelSourceError:
        raise
    except (OSError, EntryNotFoundError) as exc:
        if source.kind == "hub":
            mode = " (HF_HUB_OFFLINE is set, so only the local cache was searched)" if hub_offline() else ""
            raise ModelSourceError(
                f"{source.key}: cannot load {what} {source.describe()!r} from the Hugging Face hub{mode}: "
                f"{_first_line(exc)}. Without hub access, download it on a machine that has it "
                f"(e.g. `huggingface-cli download {source.location}`) and set {source.key} to the "
                "local diffusers directory or checkpoint file."
            ) from exc
        raise ModelSourceError(
            f"{source.key}: cannot load {what} from {source.location!r}: {_first_line(exc)}. {hint}".rstrip()
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].rstrip(".")


def load_checkpoint(path: str | Path, key: str) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a pickled ``.ckpt/.pt/.pth/.bin`` (``weights_only=True``).

    A ``{"state_dict": {...}}`` wrapper (Lightning checkpoints) is unwrapped one level.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"{key}: checkpoint file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ModelSourceError(
            f"{key}: {str(path)!r} is not a checkpoint file (expected one of {', '.join(CHECKPOINT_SUFFIXES)})"
        )
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with non-tensor objects, ...
        raise ModelSourceError(f"{key}: cannot read checkpoint {str(path)!r}: {_first_line(exc)}") from exc
    if not isinstance(state, dict):
        raise ModelSourceError(f"{key}: {str(path)!r} does not hold a state dict (got {type(state).__name__})")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def hub_file(source: ModelSource, filename: str | None = None, subfolder: str | None = None) -> Path:
    """Local path of one file of a hub source (downloaded or from the cache)."""
    from huggingface_hub import hf_hub_download

    name = filename or source.filename
    if name is None:
        raise ModelSourceError(f"{source.key}: {source.describe()!r} names no file")
    folder = subfolder if subfolder is not None else source.subfolder
    exact = ModelSource(source.key, "hub", source.location, folder, name)
    with hub_errors(exact, "file"):
        return Path(hf_hub_download(source.location, filename=name, subfolder=folder, **hub_kwargs()))
