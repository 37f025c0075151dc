"""The :class:`~stages.guidance.protocol.Guidance` protocol over a Ray actor handle.

An optimiser task holds one :class:`ActorGuidance` per model. It remembers what it registered,
so when the actor was restarted by Ray (``max_restarts``) and lost its registry, the client
registers the asset again and repeats the request; when the actor is down while restarting
it waits and retries; when it is dead for good it raises :class:`~pipeline.faults.ModelGoneError`
at once (the driver stops the run). The optimiser sees an ordinary in-process guidance.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from pipeline.faults import ModelGoneError, actor_is_dead
from stages.guidance.protocol import GuidanceRequest, GuidanceResponse, UnknownAssetError

_ACTOR_DOWN = (RayActorError, ActorUnavailableError)


class ActorGuidance:
    """A guidance actor (``IPGuidanceActor`` / ``MVDreamGuidanceActor``) seen as a ``Guidance``.

    ``retries``: how many times a call is repeated after the actor died or forgot the asset;
    ``backoff_s``: first wait before a retry (doubles each time, capped at 5 s).
    """

    concurrent_calls = True
    """Calls are remote and thread-safe: the optimiser asks the IP and MVDream actors at once."""

    def __init__(self, handle: ray.actor.ActorHandle, retries: int = 8, backoff_s: float = 0.2) -> None:
        self.handle = handle
        self.retries = retries
        self.backoff_s = backoff_s
        self._registrations: dict[str, tuple[str, Any, str]] = {}
        self.reregistrations = 0
        """How many times this client re-registered an asset (after an actor restart)."""

    def register(self, asset_id: str, prompt: str, reference: Any | None = None, negative_prompt: str = "") -> None:
        self._registrations[asset_id] = (prompt, reference, negative_prompt)
        self._call(lambda: self.handle.register.remote(asset_id, prompt, reference, negative_prompt))

    def release(self, asset_id: str) -> None:
        self._registrations.pop(asset_id, None)
        try:
            ray.get(self.handle.release.remote(asset_id))
        except _ACTOR_DOWN:
            pass  # a dead actor holds nothing to release

    def grad(self, requests: Sequence[GuidanceRequest]) -> list[GuidanceResponse]:
        requests = list(requests)
        return self._call(lambda: self.handle.grad.remote(requests), asset_ids={r.asset_id for r in requests})

    def _reregister(self, asset_ids: set[str]) -> None:
        for asset_id in asset_ids:
            if asset_id in self._registrations:
                prompt, reference, negative = self._registrations[asset_id]
                ray.get(self.handle.register.remote(asset_id, prompt, reference, negative))
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
