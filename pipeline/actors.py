"""Ray actors that hold the models: guidance (IP-Adapter/SD, MVDream) and the reference sampler.

Each actor is async: every concurrent call (from many optimiser tasks) is queued into a
:class:`~pipeline.batching.MicroBatcher`, which answers up to ``max_batch`` requests (and, for
guidance, up to ``max_views`` renders) with ONE model call on a single worker thread. The model itself is built in ``__init__`` from a
factory (e.g. ``functools.partial(IPGuidance, models_config)``), so an actor restarted by Ray
rebuilds it; its registrations are lost, which is why :meth:`GuidanceServer.grad` answers an
unknown asset with :class:`UnknownAssetError` and clients re-register.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import ray

from pipeline.batching import MicroBatcher
from pipeline.clients import fetch_renders
from stages.guidance.protocol import Guidance, GuidanceRequest, GuidanceResponse, GuidanceSettings, UnknownAssetError


class GuidanceServer:
    """Serves one :class:`Guidance` to many assets with dynamic batching (Ray actor body)."""

    def __init__(
        self, factory: Callable[[], Guidance], max_batch: int = 8, max_wait_ms: float = 10.0, max_views: int = 0
    ) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        # Build the model on the model thread: torch state stays on the thread that uses it.
        self.guidance = self._executor.submit(factory).result()
        self.registered: set[str] = set()
        self.batcher: MicroBatcher[GuidanceRequest, GuidanceResponse] = MicroBatcher(
            self.guidance.grad,
            self._executor,
            max_batch,
            max_wait_ms,
            callers=lambda: len(self.registered),
            max_size=max_views,
            size=request_views,
        )

    async def register(
        self, asset_id: str, prompt: str, reference: Any | None = None, settings: GuidanceSettings | None = None
    ) -> None:
        """Encode the asset's prompt (and reference) once and keep its settings; idempotent."""
        await _run(self._executor, self.guidance.register, asset_id, prompt, reference, settings)
        self.registered.add(asset_id)

    async def release(self, asset_id: str) -> None:
        await _run(self._executor, self.guidance.release, asset_id)
        self.registered.discard(asset_id)

    async def grad(self, requests: Sequence[GuidanceRequest]) -> list[GuidanceResponse]:
        """Answer requests; they share model forwards with other callers' concurrent requests."""
        for request in requests:
            if request.asset_id not in self.registered:
                raise UnknownAssetError(request.asset_id)
        return await self.batcher.submit_many(await fetch_renders(requests))

    def stats(self) -> dict[str, float]:
        """Batches answered, requests, mean and max batch size."""
        return self.batcher.stats()

    def pid(self) -> int:
        return os.getpid()


class ReferenceServer:
    """Serves a reference sampler (text → PIL image) with dynamic batching (Ray actor body).

    ``factory()`` returns an object with ``sample_many(prompts, seeds) -> list[PIL.Image]``.
    """

    def __init__(self, factory: Callable[[], Any], max_batch: int = 4, max_wait_ms: float = 10.0) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.sampler = self._executor.submit(factory).result()
        self.batcher: MicroBatcher[tuple[str, int], Any] = MicroBatcher(
            self._sample_batch, self._executor, max_batch, max_wait_ms
        )

    def _sample_batch(self, items: list[tuple[str, int]]) -> list[Any]:
        return list(self.sampler.sample_many([prompt for prompt, _ in items], [seed for _, seed in items]))

    async def sample(self, prompt: str, seed: int) -> Any:
        """The reference image of one asset (PIL RGB); batched with concurrent calls."""
        return await self.batcher.submit((prompt, int(seed)))

    def stats(self) -> dict[str, float]:
        return self.batcher.stats()

    def pid(self) -> int:
        return os.getpid()


def request_views(request: GuidanceRequest) -> int:
    """A request's share of a batch bounded by views (``resources.<ip|mvd>.max_batch_views``)."""
    return int(request.rgb.shape[0])


async def _run(executor: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    import asyncio
    import functools

    return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args, **kwargs))


# Ray actor classes: separate names so the dashboard shows which model each actor holds.
@ray.remote
class IPGuidanceActor(GuidanceServer):
    """SD1.5 + IP-Adapter guidance (ISD, SDS, IP-SDS, ablations)."""


@ray.remote
class MVDreamGuidanceActor(GuidanceServer):
    """MVDream multi-view SDS guidance."""


@ray.remote
class ReferenceActor(ReferenceServer):
    """Reference-image sampler (text-to-image)."""
