"""Faults of the run, as opposed to faults of one asset.

An asset's own failure (NaN loss, a prompt the model rejects) is recorded as a ``failed``
manifest row and the run goes on. A fault of the run — a model actor gone for good (its build
failed, or its restarts are used up), or the disk full — is no asset's fault: the run stops
starting assets, records nothing for the assets it hit (a plain rerun resumes them from their
checkpoints), and ends with ONE message naming the cause and the config key to look at.

- :class:`ModelGoneError`: raised in an optimiser task when a guidance actor it talks to is
  dead for good (told apart from one Ray is restarting by :func:`actor_is_dead`).
- :class:`RunFaultError`: raised in an optimiser task for a run-level fault (disk full); the
  driver stops the run on it.
- :class:`ModelWatch`: the driver's view of the model actors: waits for them to build, and
  notices one that died for good.
- :class:`RunStopped`: what ``run_dataset`` raises after it finished up (summary, gallery,
  tracking status, actors shut down) when a run fault stopped it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TextIO

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE_BYTES = 64 * 2**20
"""Below this much free space, a write error without an errno (torch's C++ writer) is read as disk full."""
_TORCH_WRITE_FAILED = re.compile(r"inline_container\.cc|PytorchStreamWriter|unexpected pos|file write failed")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class ModelActorKind:
    """One kind of model actor: what to call it and which config keys decide it."""

    label: str
    model_keys: tuple[str, ...]
    resources_key: str


MODEL_ACTORS = {
    "reference": ModelActorKind("reference sampler", ("models.reference",), "resources.reference"),
    "ip": ModelActorKind("IP guidance (SD1.5 + IP-Adapter)", ("models.sd", "models.ip_adapter", "models.image_encoder"), "resources.ip"),
    "mvd": ModelActorKind("MVDream guidance", ("models.mvdream", "models.mvdream_text"), "resources.mvd"),
}
"""Keyed like ``components.models_needed``; one entry per model actor kind."""


class ModelGoneError(RuntimeError):
    """A model actor this task needs is dead for good; the asset is left unfinished, not failed."""


class RunFaultError(RuntimeError):
    """A fault of the run (disk full) met inside a task; the asset is left unfinished, not failed."""


class RunStopped(RuntimeError):
    """The run stopped on a run fault after finishing up; ``summary`` says what it did."""

    def __init__(self, reason: str, summary: Any = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.summary = summary


# --------------------------------------------------------------------------- disk full


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full_cause(error: BaseException, paths: Iterable[str | Path] = ()) -> str | None:
    """"No space left on device ..." when ``error`` (or an error it chains to) is a full disk
    or quota, else None. torch's writer reports a full disk without an errno ("[enforce fail at
    inline_container.cc] ... unexpected pos"); it counts as disk full when one of ``paths`` has
    less than :data:`LOW_SPACE_BYTES` free."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            where = f" writing {current.filename}" if current.filename else ""
            return f"{os.strerror(current.errno)}{where} ({type(current).__name__}: {_first_line(current)})"
        if _TORCH_WRITE_FAILED.search(str(current)):
            for path in paths:
                free = free_bytes(path)
                if free is not None and free < LOW_SPACE_BYTES:
                    return (
                        f"No space left on device: {free / 2**20:.1f} MiB free on the file system of {path} "
                        f"(torch's writer: {_first_line(current)})"
                    )
        current = current.__cause__ or current.__context__
    return None


def disk_full_message(cause: str) -> str:
    return (
        f"{cause}. The run stopped: free space (or raise the quota) and run the same command again; "
        "committed assets are kept and unfinished ones resume from their checkpoints."
    )


# --------------------------------------------------------------------------- model actors


def _first_line(error: BaseException | str) -> str:
    text = _ANSI.sub("", str(error)).strip() or (type(error).__name__ if isinstance(error, BaseException) else "")
    return text.splitlines()[0] if text else ""


def creation_error(error: RayActorError) -> str:
    """The exception an actor's constructor raised ("ModelSourceError: models.sd: ..."), from the
    creation task's traceback that Ray puts in the error text; else the error's first line."""
    text = _ANSI.sub("", str(error))
    if getattr(error, "actor_init_failed", False):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        for line in reversed(lines):
            if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*:", line):
                return re.sub(r"^(?:\w+\.)+(?=\w+:)", "", line)  # "pkg.mod.SomeError: ..." -> "SomeError: ..."
    return _first_line(text)


def _ping(handle: Any) -> ray.ObjectRef:
    """An actor's ``pid()``, never retried (Ray would log a dead actor's error per retry)."""
    return handle.pid.options(max_task_retries=0).remote()


def actor_is_dead(handle: Any, timeout_s: float = 30.0) -> bool:
    """True when the actor is dead for good. A call to a dead actor fails at once with
    :class:`ActorDiedError`; a call to one Ray is restarting waits for the restart."""
    try:
        ray.get(_ping(handle), timeout=timeout_s)
    except ActorDiedError:
        return True
    except (ActorUnavailableError, GetTimeoutError):
        return False
    return False


def death_reason(kind: str, error: RayActorError, max_restarts: int) -> str:
    """One line naming the model, its config keys and why its actor is gone."""
    actor = MODEL_ACTORS[kind]
    keys = ", ".join(actor.model_keys)
    if getattr(error, "actor_init_failed", False):
        cause = creation_error(error)
        named = any(key in cause for key in actor.model_keys)  # loaders name their key: say it once
        return f"the {actor.label} model could not be built{'' if named else f' ({keys})'}: {cause}"
    return (
        f"the {actor.label} actor ({keys}) died and Ray will not restart it "
        f"({actor.resources_key}.max_restarts={max_restarts} restarts used up): {_first_line(error)}"
    )


class ModelWatch:
    """Pings every model actor now and then; reports the first that is dead for good."""

    def __init__(self, actors: dict[str, list[Any]], max_restarts: dict[str, int], every_s: float = 1.0) -> None:
        self.actors = [(kind, handle) for kind, handles in actors.items() for handle in handles]
        self.max_restarts = max_restarts
        self.every_s = every_s
        self._pings: dict[ray.ObjectRef, tuple[str, Any]] = {}
        self._last = 0.0

    @classmethod
    def of(cls, graph: Any, resources: Any) -> "ModelWatch":
        """The watch of a :class:`~pipeline.graph.Graph`'s actors with the run's ``resources``."""
        return cls(graph.model_actors(), {kind: getattr(resources, kind).max_restarts for kind in MODEL_ACTORS})

    def wait_ready(self, stream: TextIO, poll_s: float = 1.0) -> None:
        """Block until every model actor has built its model; raise :class:`RunStopped` naming
        the first that cannot (a missing model, a bad dtype, out of memory)."""
        pending = {_ping(handle): (kind, handle) for kind, handle in self.actors}
        if pending:
            kinds = sorted({kind for kind, _ in self.actors})
            print(f"[pipeline] building the models ({', '.join(MODEL_ACTORS[k].label for k in kinds)}) ...", file=stream, flush=True)
        began = time.monotonic()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=poll_s)
            for ref in ready:
                kind, handle = pending.pop(ref)
                try:
                    ray.get(ref)
                except ActorDiedError as error:
                    raise RunStopped(death_reason(kind, error, self.max_restarts.get(kind, 0))) from None
                except ActorUnavailableError:
                    pending[_ping(handle)] = (kind, handle)  # restarting: ask again
                    continue
                print(f"[pipeline] model ready: {MODEL_ACTORS[kind].label} ({time.monotonic() - began:.1f}s)", file=stream, flush=True)

    def find_dead(self, timeout_s: float = 10.0) -> str | None:
        """Ping every model actor now; the reason of the first dead for good, or None."""
        for kind, handle in self.actors:
            try:
                ray.get(_ping(handle), timeout=timeout_s)
            except ActorDiedError as error:
                return death_reason(kind, error, self.max_restarts.get(kind, 0))
            except (RayActorError, GetTimeoutError):
                continue
        return None

    def dead(self) -> str | None:
        """The reason of the first model actor found dead for good since the last call, or None.
        Cheap: at most one ping per actor in flight, sent every ``every_s``."""
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            waiting = {id(handle) for _, handle in self._pings.values()}
            for kind, handle in self.actors:
                if id(handle) not in waiting:
                    self._pings[_ping(handle)] = (kind, handle)
        if not self._pings:
            return None
        ready, _ = ray.wait(list(self._pings), num_returns=len(self._pings), timeout=0)
        for ref in ready:
            kind, handle = self._pings.pop(ref)
            try:
                ray.get(ref)
            except ActorDiedError as error:
                if actor_is_dead(handle):  # a second ping: a restarting actor would answer it
                    return death_reason(kind, error, self.max_restarts.get(kind, 0))
            except RayActorError:
                pass  # unavailable while Ray restarts it
        return None


# --------------------------------------------------------------------------- finishing up


def finish_quietly(steps: Sequence[tuple[str, Callable[[], Any]]], stream: TextIO) -> None:
    """Run every step; one that raises is reported in one line and the next still runs, so
    finishing up never hides the error that stopped the run."""
    for name, step in steps:
        try:
            step()
        except Exception as error:  # noqa: BLE001 - reported; the other steps must still run
            print(f"[pipeline] {name} failed: {type(error).__name__}: {_first_line(error)}", file=stream, flush=True)
