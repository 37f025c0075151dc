"""The :class:`~stages.guidance.protocol.Guidance` protocol over a Ray actor handle.

An optimiser task holds one :class:`ActorGuidance` per model. It remembers what it registered
(prompt, reference, settings), so when the actor was restarted by Ray (``max_restarts``) and lost
its registry, the client registers the asset again and repeats the request (the one place that
re-registers: an in-process guidance never forgets an asset); when the actor is down while restarting
it waits and retries; when it is dead for good it raises :class:`~pipeline.faults.ModelGoneError`
at once (the driver stops the run). The optimiser sees an ordinary in-process guidance.

Both guidance terms of an iteration read the same render: the two clients of one asset share a
:class:`RenderShare`, which moves the render to the host and puts it in the object store ONCE;
both requests carry the same ``ObjectRef`` in place of ``rgb``, and the actor side
(:func:`fetch_renders`) resolves it (Ray does not resolve refs nested in arguments).
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from typing import Any, Callable, Sequence

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from torch.profiler import record_function

from pipeline.faults import ModelGoneError, actor_is_dead
from stages.guidance.protocol import (
    GuidanceRequest,
    GuidanceResponse,
    GuidanceSettings,
    UnknownAssetError,
    validate_request,
)

_ACTOR_DOWN = (RayActorError, ActorUnavailableError)


class RenderShare:
    """One render in the object store for all clients of an asset: :meth:`ref` of the same
    tensor object returns the same ``ObjectRef``; a new tensor replaces the previous one.

    ``wire_dtype``: the dtype renders travel in (None: their own). ``float16`` halves the bytes
    and is exact for fp16 guidance models, which cast renders to fp16 before anything else
    (``stages.guidance.vae_bridge.encode_renders``); their ``grad_rgb`` then comes back in fp16.
    """

    def __init__(self, wire_dtype: torch.dtype | None = None) -> None:
        self.wire_dtype = wire_dtype
        self._lock = threading.Lock()
        self._tensor: torch.Tensor | None = None
        self._ref: Any = None
        self.puts = 0
        """Renders put in the object store so far."""

    def ref(self, rgb: torch.Tensor) -> Any:
        with self._lock:  # the IP and MVDream requests are sent from two threads at once
            if self._tensor is not rgb:
                with record_function("d2h::render"):  # the one device-to-host copy of the render
                    host = rgb.detach().to("cpu", self.wire_dtype or rgb.dtype)
                self._ref, self._tensor = ray.put(host), rgb
                self.puts += 1
            return self._ref


def _with_render_ref(request: GuidanceRequest, share: RenderShare) -> GuidanceRequest:
    sent = copy.copy(request)  # shallow: no __post_init__, so an ObjectRef may stand for rgb
    sent.rgb = share.ref(request.rgb)
    return sent


def resolve_request_refs(requests: Sequence[GuidanceRequest], get: Callable[[Any], Any] | None = None) -> list[GuidanceRequest]:
    """Requests with their render refs replaced by the renders (``get``: ``ray.get`` by
    default), validated again. Requests carrying tensors are returned as they are."""
    get = get or ray.get
    out = []
    for request in requests:
        if not isinstance(request.rgb, torch.Tensor):
            request = copy.copy(request)
            request.rgb = get(request.rgb)
            validate_request(request)
        out.append(request)
    return out


async def fetch_renders(requests: Sequence[GuidanceRequest]) -> list[GuidanceRequest]:
    """The async actor's :func:`resolve_request_refs`: awaits the refs instead of blocking."""
    pending = [r.rgb for r in requests if not isinstance(r.rgb, torch.Tensor)]
    if not pending:
        return list(requests)
    values = iter(await asyncio.gather(*pending))
    return resolve_request_refs(requests, get=lambda _: next(values))


class ActorGuidance:
    """A guidance actor (``IPGuidanceActor`` / ``MVDreamGuidanceActor``) seen as a ``Guidance``.

    ``retries``: how many times a call is repeated after the actor died or forgot the asset;
    ``backoff_s``: first wait before a retry (doubles each time, capped at 5 s); ``renders``:
    the :class:`RenderShare` of the asset's clients (a private one by default).
    """

    concurrent_calls = True
    """Calls are remote and thread-safe: the optimiser asks the IP and MVDream actors at once."""

    def __init__(
        self, handle: ray.actor.ActorHandle, retries: int = 8, backoff_s: float = 0.2, renders: RenderShare | None = None
    ) -> None:
        self.handle = handle
        self.retries = retries
        self.backoff_s = backoff_s
        self.renders = renders if renders is not None else RenderShare()
        self._registrations: dict[str, tuple[str, Any, GuidanceSettings | None]] = {}
        self.reregistrations = 0
        """How many times this client re-registered an asset (after an actor restart)."""

    def register(
        self, asset_id: str, prompt: str, reference: Any | None = None, settings: GuidanceSettings | None = None
    ) -> None:
        self._registrations[asset_id] = (prompt, reference, settings)
        self._call(lambda: self.handle.register.remote(asset_id, prompt, reference, settings))

    def release(self, asset_id: str) -> None:
        self._registrations.pop(asset_id, None)
        try:
            ray.get(self.handle.release.remote(asset_id))
        except _ACTOR_DOWN:
            pass  # a dead actor holds nothing to release

    def grad(self, requests: Sequence[GuidanceRequest]) -> list[GuidanceResponse]:
        sent = [_with_render_ref(r, self.renders) for r in requests]
        return self._call(lambda: self.handle.grad.remote(sent), asset_ids={r.asset_id for r in sent})

    def _reregister(self, asset_ids: set[str]) -> None:
        for asset_id in asset_ids:
            if asset_id in self._registrations:
                prompt, reference, settings = self._registrations[asset_id]
                ray.get(self.handle.register.remote(asset_id, prompt, reference, settings))
                self.reregistrations += 1

    def _call(self, submit: Any, asset_ids: set[str] | None = None) -> Any:
        wait = self.backoff_s
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                return ray.get(submit())
            except UnknownAssetError:
                # The actor restarted (fresh registry): register again, then repeat.
                if last or not asset_ids or not asset_ids <= set(self._registrations):
                    raise
                try:
                    self._reregister(asset_ids)
                except _ACTOR_DOWN:
                    pass  # it went down again: the next attempt waits below
            except _ACTOR_DOWN as error:
                # In-flight calls fail when the actor dies even if Ray restarts it
                # (ActorUnavailableError); one dead for good fails every call at once.
                if isinstance(error, ActorDiedError) and actor_is_dead(self.handle):
                    raise ModelGoneError(f"model actor dead for good: {str(error).splitlines()[0]}") from None
                if last:
                    raise
                time.sleep(wait)
                wait = min(wait * 2, 5.0)
        raise AssertionError("unreachable")
