"""Dynamic batching inside an async Ray actor: concurrent calls → one model call.

Why not ``ray.serve.batch``: in Ray 2.60 its queue calls ``serve.get_replica_context()``
on creation (``ray/serve/batching.py``), which raises outside a Serve deployment; a Serve
deployment with ``@serve.batch`` around the same guidance measured worse (``python -m
benchmarks.batching``, benchmarks/RESULTS.md §5: about half the requests/s and a quarter of
the batch size at 16 callers); and Serve's request routing would send an asset's requests to
replicas that never saw its ``register``. This is the policy of docs/ARCHITECTURE.md "Guidance actor protocol": up to
``max_batch`` items or ``max_wait_ms`` after the first, whichever comes first; nothing padded;
the model call runs on one worker thread so the event loop keeps accepting requests while a
batch computes. With ``max_size``, a batch also stops before the sum of its items' ``size``
(a guidance request's number of views) would pass it: the item that does not fit opens the
next batch, and an item larger than the bound is answered alone.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Generic, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """``await submit(item)`` → ``handler([..., item, ...])[i]``.

    ``handler(items) -> results`` must return one result per item, in order. If a batched
    call raises, each item of that batch is retried alone, so one bad request fails only its
    own caller. ``callers()`` (optional) returns how many distinct callers exist; once a batch
    holds that many items nobody else can join it, so it runs without waiting. ``max_size``
    (0: none) bounds the sum of ``size(item)`` over a batch; items keep their arrival order.
    """

    def __init__(
        self,
        handler: Callable[[list[Item]], Sequence[Result]],
        executor: ThreadPoolExecutor,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        callers: Callable[[], int] | None = None,
        max_size: int = 0,
        size: Callable[[Item], int] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_size < 0:
            raise ValueError(f"max_size must be >= 0 (0: no bound), got {max_size}")
        self.handler = handler
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.callers = callers
        self.max_size = max_size
        self.size = size or (lambda item: 1)
        self.batch_sizes: list[int] = []
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future]] | None = None
        self._carry: tuple[Item, asyncio.Future] | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run())
        future: asyncio.Future = loop.create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def submit_many(self, items: Sequence[Item]) -> list[Result]:
        """Queue several items at once (they land in the same batch when it has room)."""
        return list(await asyncio.gather(*(self.submit(item) for item in items)))

    def _full(self, count: int, size: int) -> bool:
        if count >= self.max_batch or (self.max_size and size >= self.max_size):
            return True
        return self.callers is not None and count >= max(1, self.callers())

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first, self._carry = self._carry or await self._queue.get(), None
            batch, size = [first], self.size(first[0])
            deadline = loop.time() + self.max_wait_s
            while not self._full(len(batch), size):
                if not self._queue.empty():
                    pair = self._queue.get_nowait()
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        pair = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                if self.max_size and size + self.size(pair[0]) > self.max_size:
                    self._carry = pair  # opens the next batch
                    break
                batch.append(pair)
                size += self.size(pair[0])
            await self._answer(batch)

    async def _answer(self, batch: list[tuple[Item, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        items = [item for item, _ in batch]
        self.batch_sizes.append(len(items))
        try:
            results = await loop.run_in_executor(self.executor, _call_checked, self.handler, items)
        except Exception as error:
            if len(batch) == 1:  # the item's own error goes to its caller
                _settle(batch[0][1], error=error)
                return
            self.batch_sizes.pop()
            for pair in batch:  # find who failed: answer each item alone
                await self._answer([pair])
            return
        for (_, future), result in zip(batch, results):
            _settle(future, result=result)

    def stats(self) -> dict[str, float]:
        sizes = self.batch_sizes
        return {
            "batches": float(len(sizes)),
            "requests": float(sum(sizes)),
            "mean_batch": float(sum(sizes) / len(sizes)) if sizes else 0.0,
            "max_batch_seen": float(max(sizes)) if sizes else 0.0,
        }


def _call_checked(handler: Callable[[list[Any]], Sequence[Any]], items: list[Any]) -> list[Any]:
    results = list(handler(items))
    if len(results) != len(items):
        raise RuntimeError(f"batch handler returned {len(results)} results for {len(items)} items")
    return results


def _settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():  # the caller went away (cancelled)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
