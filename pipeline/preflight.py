"""Cheap checks before any work: will the models load, can the output be written, is Ray there?

Run when the config loads (so ``--dry-run`` runs them too); none loads a weight.

- Models: every ``models.*`` key the method uses resolves to a source (``tiny``, ``toyworld``,
  hub id, directory, file; for ``toyworld`` the world file ``models.toyworld`` must load); a local directory holds what its loader reads first; with
  ``HF_HUB_OFFLINE`` set, a hub id is in the local cache. ``models.dtype`` and the device
  keys parse. Checks are per source kind in :data:`SOURCE_CHECKS` (a new kind is one entry;
  a kind without an entry is only resolved). Paths and the hub cache are looked up on the
  machine that loads the config: on a cluster that must see the same model paths as the
  workers (shared storage). Online, a hub id is not looked up (that would download): the run
  builds the model actors before it starts any asset and stops with one message if one fails.
- Output: ``output`` / ``work_dir`` (local) are directories, or can be created, and are writable.
- Ray: :func:`wait_for_ray` bounds the wait for a cluster address (``ray.init`` alone waits
  many minutes for an address nobody answers on).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from stages.config_loading import ConfigError
from stages.models.config import ModelsConfig
from stages.models.factory import TOYWORLD
from stages.models.sources import ModelSource, ModelSourceError, hub_offline, resolve_source

if TYPE_CHECKING:  # pipeline.config runs the preflight while it validates
    from pipeline.config import PipelineConfig

SUPPORTED_DEVICE_TYPES = ("cpu", "cuda", "mps")
MARKER_FILE = "mvdream.json"
"""What ``python -m stages.models.mvdream_convert`` writes (``stages.models.mvdream.MARKER_FILE``;
not imported from there: that module pulls in diffusers, seconds at every config load)."""


class PreflightError(ConfigError):
    """A check before any work failed; the message names the config key."""


def _sub(*parts: str | None) -> str:
    return "/".join(p.strip("/") for p in parts if p)


@dataclass(frozen=True)
class ModelKey:
    """One ``models.*`` key: which actor loads it, the file a hub repo must hold for it, the
    files (any of) a local directory must hold, and when it is used at all."""

    key: str
    actor: str
    hub_file: Callable[[ModelSource, ModelsConfig], str]
    directory_files: Callable[[ModelSource, ModelsConfig], tuple[str, ...]]
    used: Callable[[ModelsConfig], bool] = lambda models: True


def _pipeline_file(src: ModelSource, models: ModelsConfig) -> str:
    return _sub(src.subfolder, src.filename) if src.filename else "model_index.json"


def _mvdream_file(src: ModelSource, models: ModelsConfig) -> str:
    return _sub(src.subfolder, src.filename) if src.filename else _sub(src.subfolder, MARKER_FILE)


def _adapter_file(src: ModelSource, models: ModelsConfig) -> str:
    if src.filename:
        return _sub(src.subfolder, src.filename)
    return _sub(src.subfolder or models.ip_adapter_subfolder, models.ip_adapter_weight_name)


def _mvdream_needs_text(models: ModelsConfig) -> bool:
    """The original MVDream checkpoint holds no tokenizer; ``tiny`` and converted directories do."""
    try:
        src = resolve_source(models.mvdream, "models.mvdream")
    except ModelSourceError:
        return False  # reported for models.mvdream itself
    return src.kind == "file" or (src.kind == "hub" and src.filename is not None)


MODEL_KEYS: tuple[ModelKey, ...] = (
    ModelKey("models.reference", "reference", _pipeline_file, lambda s, m: ("model_index.json",)),
    ModelKey("models.sd", "ip", _pipeline_file, lambda s, m: ("model_index.json",)),
    ModelKey("models.ip_adapter", "ip", _adapter_file, lambda s, m: (_sub(m.ip_adapter_subfolder, m.ip_adapter_weight_name), m.ip_adapter_weight_name)),
    ModelKey("models.image_encoder", "ip", lambda s, m: _sub(s.subfolder, s.filename, "config.json"), lambda s, m: ("config.json",)),
    ModelKey("models.mvdream", "mvd", _mvdream_file, lambda s, m: (MARKER_FILE,)),
    ModelKey("models.mvdream_text", "mvd", lambda s, m: _sub(s.subfolder, "tokenizer/vocab.json"), lambda s, m: ("tokenizer/vocab.json", "vocab.json"), _mvdream_needs_text),
)
"""Every ``models.*`` source key, keyed to the actor (``components.models_needed``) that loads it."""


def _check_hub(src: ModelSource, need: ModelKey, models: ModelsConfig) -> str | None:
    if not hub_offline():
        return None  # looking it up would reach the hub; the actor build is awaited first
    from huggingface_hub import try_to_load_from_cache

    filename = need.hub_file(src, models)
    if isinstance(try_to_load_from_cache(src.location, filename), str):
        return None
    return (
        f"{src.key}: {src.describe()!r} is not in the local Hugging Face cache ({filename} missing) and "
        f"HF_HUB_OFFLINE is set. Download it where the hub is reachable (`huggingface-cli download {src.location}`), "
        f"or set {src.key} to a local diffusers directory or checkpoint file"
    )


def _check_directory(src: ModelSource, need: ModelKey, models: ModelsConfig) -> str | None:
    wanted = need.directory_files(src, models)
    if any((src.path / name).is_file() for name in wanted):
        return None
    return f"{src.key}: {src.location!r} is a directory without {' or '.join(wanted)}: not the model this key loads"


def _nothing(src: ModelSource, need: ModelKey, models: ModelsConfig) -> str | None:
    return None


def _check_toyworld(src: ModelSource, need: ModelKey, models: ModelsConfig) -> str | None:
    """The world file loads (it is cached: every toy-world key reads it once)."""
    from stages.toyworld.world import WORLD_KEY, WorldError, load_world

    try:
        load_world(src.location)
    except WorldError as error:
        return f"'{WORLD_KEY}' (the world of {src.key}=toyworld): {str(error).removeprefix(WORLD_KEY + ': ')}"
    return None


def resolve_model_source(value: str, key: str, models: ModelsConfig) -> ModelSource:
    """:func:`~stages.models.sources.resolve_source`, plus the ``toyworld`` kind: the exact toy
    world of ``models.toyworld`` (built by :mod:`stages.models.factory`, no weights)."""
    if value == TOYWORLD:
        return ModelSource(key, TOYWORLD, models.toyworld)  # type: ignore[arg-type]
    return resolve_source(value, key)


SOURCE_CHECKS: dict[str, Callable[[ModelSource, ModelKey, ModelsConfig], str | None]] = {
    "tiny": _nothing,
    "hub": _check_hub,
    "directory": _check_directory,
    "file": _nothing,  # resolve_source checked that it exists and has a checkpoint suffix
    TOYWORLD: _check_toyworld,
}
"""Source kind -> its cheap check (None: fine; else the message)."""


def check_device(value: str, key: str) -> None:
    """``auto`` or a torch device string of a supported type (``cpu``, ``cuda``, ``cuda:1``, ``mps``).
    Whether CUDA is present is the workers' business, not this machine's."""
    import torch

    if value == "auto":
        return
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in SUPPORTED_DEVICE_TYPES:
        raise PreflightError(f"config key '{key}': unknown device {value!r}; expected auto, cpu, cuda, cuda:N or mps")


def check_models(models: ModelsConfig, actors: Sequence[str], method_device: str = "auto") -> None:
    """Resolve every model key the ``actors`` (``reference``/``ip``/``mvd``) load, and dtype/device."""
    from stages.models.device import resolve_dtype

    try:
        resolve_dtype(models.dtype)
    except ValueError as error:
        raise PreflightError(f"config key {error}") from None
    check_device(models.device, "models.device")
    check_device(method_device, "method.device")
    for need in MODEL_KEYS:
        if need.actor not in actors or not need.used(models):
            continue
        value = getattr(models, need.key.removeprefix("models."))
        try:
            src = resolve_model_source(value, need.key, models)
        except ModelSourceError as error:
            raise PreflightError(f"config key {error}") from None
        check = SOURCE_CHECKS.get(src.kind, _nothing)
        problem = check(src, need, models)
        if problem:
            raise PreflightError(f"config key {problem}")


# --------------------------------------------------------------------------- output


def check_writable_dir(path: str, key: str) -> None:
    """``path`` is a writable directory, or can be created: its nearest existing parent is a
    writable directory."""
    target = Path(path).expanduser().resolve()
    if target.exists():
        if not target.is_dir():
            raise PreflightError(f"config key '{key}': {target} exists and is not a directory")
        if not os.access(target, os.W_OK | os.X_OK):
            raise PreflightError(f"config key '{key}': {target} is not writable")
        return
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PreflightError(f"config key '{key}': cannot create {target}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PreflightError(f"config key '{key}': cannot create {target}: {parent} is not writable")


def local_path(uri: str) -> str | None:
    """The local path of ``uri`` (a plain path or ``file://``), else None (an object store)."""
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    return None if "://" in uri else uri


def check_outputs(output: str, work_dir: str | None, tracking_uri: str | None) -> None:
    """Every local place the run writes: ``output``, ``work_dir``, a ``sqlite:///`` tracking store."""
    for key, value in (("output", output), ("work_dir", work_dir)):
        path = local_path(value) if value else None
        if path:
            check_writable_dir(path, key)
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri.removeprefix("sqlite:///"))
        if database.is_dir():
            raise PreflightError(f"config key 'tracking.tracking_uri': {database} is a directory, not an sqlite file")
        check_writable_dir(str(database.parent), "tracking.tracking_uri")


# --------------------------------------------------------------------------- Ray


def ray_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) to reach for a Ray address; None for ``auto`` / ``local`` (nothing to reach)."""
    if address in ("auto", "local"):
        return None
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return None  # let Ray explain a form it knows and we do not
    return host.strip("[]"), int(port)


def wait_for_ray(address: str, where: str, timeout_s: float) -> None:
    """Wait at most ``timeout_s`` for ``address`` to accept a TCP connection; raise
    :class:`PreflightError` naming ``where`` (``ray_address`` or ``RAY_ADDRESS``) if it never does."""
    target = ray_host_port(address)
    if target is None:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(target, timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return
        except OSError as error:
            if time.monotonic() + 1.0 >= deadline:
                raise PreflightError(
                    f"{where}: cannot reach the Ray cluster at {address} within {timeout_s:g} s ({error}). "
                    "Is its head running (`ray status` there)? Unset it to start a local Ray; "
                    "ray_connect_timeout_s sets this wait"
                ) from None
            time.sleep(1.0)


def preflight(config: PipelineConfig, actors: Sequence[str]) -> None:
    """The checks of a loaded config that need no cluster: models, dtype, devices, outputs."""
    check_models(config.models, actors, str(config.method.device))
    tracking_uri = config.tracking.tracking_uri if config.tracking.enabled else None
    check_outputs(config.output, config.work_dir, tracking_uri)
