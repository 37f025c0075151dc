"""MicroBatcher (the actors' dynamic batching) on a plain asyncio loop, no Ray."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.batching import MicroBatcher
from pipeline.progress import ProgressPrinter


def run(coro):
    return asyncio.run(coro)


def test_concurrent_items_share_batches_capped_at_max_batch():
    calls: list[list[int]] = []

    def handler(items):
        calls.append(list(items))
        return [x * 10 for x in items]

    async def main():
        batcher = MicroBatcher(handler, ThreadPoolExecutor(1), max_batch=4, max_wait_ms=200)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        return batcher, results

    batcher, results = run(main())
    assert results == [i * 10 for i in range(10)]  # each caller gets its own answer
    assert [len(c) for c in calls] == [4, 4, 2] and sorted(sum(calls, [])) == list(range(10))
    assert batcher.stats()["mean_batch"] == pytest.approx(10 / 3)


def test_lone_caller_does_not_wait_for_company():
    async def main():
        batcher = MicroBatcher(lambda xs: xs, ThreadPoolExecutor(1), max_batch=8, max_wait_ms=5000, callers=lambda: 1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await batcher.submit(1)
        return loop.time() - start

    assert run(main()) < 2.0  # far below max_wait_ms: one registered caller means a full batch


def test_a_failing_item_fails_only_its_own_caller():
    def handler(items):
        if any(x < 0 for x in items):
            raise ValueError(f"negative in {items}")
        return [x + 1 for x in items]

    async def main():
        batcher = MicroBatcher(handler, ThreadPoolExecutor(1), max_batch=8, max_wait_ms=100)
        return await asyncio.gather(*(batcher.submit(x) for x in (1, -1, 2)), return_exceptions=True)

    good1, bad, good2 = run(main())
    assert (good1, good2) == (2, 3)
    assert isinstance(bad, ValueError) and "[-1]" in str(bad)


def test_progress_line_rate_and_eta():
    printer = ProgressPrinter(total_assets=4, iterations_per_asset=100, done=1, failed=1, in_flight=2)
    printer.line(10, now=printer._start + 5.0)  # the first iteration seen sets the base (model loading is not speed)
    line = printer.line(110, now=printer._start + 15.0, export_seconds=[2.0], running={"a": 60, "b": 50})
    # 100 its in 10 s; left: 2 unfinished assets x 100 - 110 done by them = 90 its, then their exports
    assert "assets 2/4 (done 1, failed 1, in flight 2)" in line
    assert "10.0 it/s" in line and "ETA 0:00:13" in line  # 9 s + 2 exports x 2 s, one at a time


def test_batches_are_bounded_by_the_sum_of_item_sizes_in_arrival_order():
    """``max_size`` (a guidance actor's max_batch_views): a batch closes before the next item
    would pass the bound; that item opens the next batch; an item over the bound runs alone."""
    calls: list[list[int]] = []

    def handler(items):
        calls.append(list(items))
        return [x * 10 for x in items]

    async def main(sizes, max_size):
        batcher = MicroBatcher(handler, ThreadPoolExecutor(1), max_batch=8, max_wait_ms=50, max_size=max_size, size=lambda x: x)
        return await asyncio.gather(*(batcher.submit(s) for s in sizes))

    assert run(main([3, 3, 3, 3, 5, 1, 1], 6)) == [30, 30, 30, 30, 50, 10, 10]
    assert calls == [[3, 3], [3, 3], [5, 1], [1]]
    calls.clear()
    assert run(main([2, 10, 2], 4)) == [20, 100, 20]
    assert calls == [[2], [10], [2]]
    with pytest.raises(ValueError, match="max_size"):
        MicroBatcher(handler, ThreadPoolExecutor(1), max_size=-1)


def test_guidance_server_bounds_its_batches_by_views():
    """The actor body counts a request as its number of views against ``max_views``."""
    import torch

    from pipeline.actors import GuidanceServer
    from stages.guidance.protocol import GuidanceRequest, GuidanceResponse

    class Recorder:
        def __init__(self):
            self.batches: list[list[int]] = []

        def register(self, asset_id, prompt, reference=None, settings=None):
            pass

        def grad(self, requests):
            self.batches.append([int(r.rgb.shape[0]) for r in requests])
            return [GuidanceResponse(r.asset_id, torch.zeros_like(r.rgb), 0.0, 0.0, r.timesteps) for r in requests]

    def request(asset: str, views: int) -> GuidanceRequest:
        return GuidanceRequest(asset, torch.zeros(views, 3, 4, 4), torch.zeros(views, dtype=torch.long), seed=0)

    async def main():
        server = GuidanceServer(Recorder, max_batch=16, max_wait_ms=50, max_views=8)
        for k in range(5):
            await server.register(f"a{k}", "p")
        views = [4, 4, 8, 4, 4]
        await asyncio.gather(*(server.grad([request(f"a{k}", v)]) for k, v in enumerate(views)))
        return server.guidance.batches

    assert run(main()) == [[4, 4], [8], [4, 4]]
