"""Hand-written batching actor vs Ray Serve's ``@serve.batch``: same model, same callers.

``python -m benchmarks.batching [--callers 1 4 16] [--requests 20] [--handler sleep tiny-ip]``

Issue 6 asks to prefer Ray's own dynamic batching (``serve.batch``) over a hand-written queue
unless it measures worse. Both backends here wrap the *same* guidance object with the same
policy (``max_batch`` = number of callers, ``max_wait_ms``):

- ``actor``: :class:`pipeline.actors.GuidanceServer` (``MicroBatcher``) as a Ray actor, called
  with ``handle.grad.remote([request])`` — what the pipeline uses;
- ``serve``: a Serve deployment whose ``grad`` goes through ``@serve.batch``, called with a
  ``DeploymentHandle`` (no HTTP proxy).

N caller tasks each send ``--requests`` requests one after another (no render in between, so
only the batching layer and the model are measured). Handlers: ``sleep`` — a model that takes
``fixed_ms + per_item_ms · n`` without using the CPU, which isolates each layer's overhead and
batch formation from CPU contention; ``tiny-ip`` — the real tiny SD1.5 + IP-Adapter ISD
guidance on the CPU. Prints a table (requests/s, mean batch, median latency) and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import ray
import torch
from ray import serve

from benchmarks.common import write_json
from pipeline.actors import IPGuidanceActor
from stages.guidance.protocol import Guidance, GuidanceRequest, GuidanceResponse, IPSettings

BACKENDS = ("actor", "serve")
HANDLERS = ("sleep", "tiny-ip")
RENDER_SIZE = 32


class SleepGuidance:
    """A stand-in model: a batch of n requests takes ``fixed_ms + per_item_ms · n`` of wall time."""

    def __init__(self, fixed_ms: float = 20.0, per_item_ms: float = 1.0) -> None:
        self.fixed_s = fixed_ms / 1000.0
        self.per_item_s = per_item_ms / 1000.0
        self.registered: set[str] = set()

    def register(self, asset_id: str, prompt: str, reference: Any | None = None, settings: Any | None = None) -> None:
        self.registered.add(asset_id)

    def release(self, asset_id: str) -> None:
        self.registered.discard(asset_id)

    def grad(self, requests: Sequence[GuidanceRequest]) -> list[GuidanceResponse]:
        time.sleep(self.fixed_s + self.per_item_s * len(requests))
        return [
            GuidanceResponse(r.asset_id, torch.zeros_like(r.rgb), 0.0, 0.0, r.timesteps.clone()) for r in requests
        ]


def tiny_ip_guidance() -> Guidance:
    """The tiny ISD guidance the CPU pipeline benchmark uses (renders resized to 64²)."""
    from benchmarks.pipeline import tiny_models
    from stages.guidance.ip_guidance import IPGuidance

    torch.set_num_threads(1)
    return IPGuidance.from_config(tiny_models("cpu"))


def handler_factory(name: str) -> Callable[[], Guidance]:
    if name == "sleep":
        return SleepGuidance
    if name == "tiny-ip":
        return tiny_ip_guidance
    raise ValueError(f"--handler must be one of {HANDLERS}, got {name!r}")


def make_request(asset_id: str, index: int) -> GuidanceRequest:
    generator = torch.Generator().manual_seed(index)
    rgb = torch.rand(1, 3, RENDER_SIZE, RENDER_SIZE, generator=generator)
    return GuidanceRequest(asset_id, rgb, torch.tensor([500]), seed=index)


SETTINGS = IPSettings(loss="isd", view_prompts=False)
"""Every asset's settings: ISD, one prompt for every view (the requests carry no cameras)."""


def reference_image(index: int) -> Any:
    """A seeded random RGB image standing in for a sampled reference."""
    from PIL import Image

    pixels = torch.randint(0, 256, (RENDER_SIZE, RENDER_SIZE, 3), generator=torch.Generator().manual_seed(index))
    return Image.fromarray(pixels.to(torch.uint8).numpy())


@ray.remote(num_cpus=0)
class Caller:
    """One stand-in optimiser: sends requests one after another (a long-lived actor, so worker
    start-up is outside the timed region)."""

    def run(self, backend: str, handle: Any, asset_id: str, requests: int) -> list[float]:
        """Send ``requests`` requests; return each one's latency in seconds."""
        latencies = []
        for index in range(requests):
            request = make_request(asset_id, index)
            began = time.perf_counter()
            if backend == "actor":
                ray.get(handle.grad.remote([request]))
            else:
                handle.grad.remote(request).result()
            latencies.append(time.perf_counter() - began)
        return latencies


class ServeGuidance:
    """Serve deployment body: the same guidance object behind ``@serve.batch``."""

    def __init__(self, factory: Callable[[], Guidance], max_batch: int, max_wait_ms: float) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.guidance = self._executor.submit(factory).result()
        self.batch_sizes: list[int] = []
        self._grad_batch.set_max_batch_size(max_batch)
        self._grad_batch.set_batch_wait_timeout_s(max_wait_ms / 1000.0)

    async def register(self, asset_id: str, prompt: str, reference: Any | None = None, settings: Any | None = None) -> None:
        call = functools.partial(self.guidance.register, asset_id, prompt, reference, settings)
        await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def grad(self, request: GuidanceRequest) -> GuidanceResponse:
        return await self._grad_batch(request)

    @serve.batch(max_batch_size=1)  # the real size and wait are set per deployment in __init__
    async def _grad_batch(self, requests: list[GuidanceRequest]) -> list[GuidanceResponse]:
        self.batch_sizes.append(len(requests))
        call = functools.partial(self.guidance.grad, requests)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def stats(self) -> dict[str, float]:
        sizes = self.batch_sizes
        return {"batches": float(len(sizes)), "mean_batch": sum(sizes) / len(sizes) if sizes else 0.0}


def _serve_deployment(max_ongoing: int) -> Any:
    return serve.deployment(name="guidance", max_ongoing_requests=max_ongoing, ray_actor_options={"num_cpus": 0})(ServeGuidance)


def measure(backend: str, handler: str, callers: int, requests: int, max_wait_ms: float) -> dict[str, Any]:
    """Aggregate requests/s, mean batch and latencies of ``callers`` concurrent callers."""
    factory = handler_factory(handler)
    asset_ids = [f"asset-{i}" for i in range(callers)]
    if backend == "actor":
        handle = IPGuidanceActor.options(num_cpus=0).remote(factory, callers, max_wait_ms)
        ray.get([handle.register.remote(a, "a prompt", reference_image(i), SETTINGS) for i, a in enumerate(asset_ids)])
        stats = lambda: ray.get(handle.stats.remote())  # noqa: E731
    else:
        serve.start(proxy_location="Disabled")
        handle = serve.run(_serve_deployment(max(callers, 1) * 2).bind(factory, callers, max_wait_ms), name="bench", route_prefix=None)
        for index, asset_id in enumerate(asset_ids):
            handle.register.remote(asset_id, "a prompt", reference_image(index), SETTINGS).result()
        stats = lambda: handle.stats.remote().result()  # noqa: E731
    clients = [Caller.remote() for _ in asset_ids]
    try:
        ray.get([c.run.remote(backend, handle, a, 2) for c, a in zip(clients, asset_ids)])  # warm-up, lazy init
        before = stats()
        began = time.perf_counter()
        latencies = sum(ray.get([c.run.remote(backend, handle, a, requests) for c, a in zip(clients, asset_ids)]), [])
        seconds = time.perf_counter() - began
        after = stats()
    finally:
        for client in clients:
            ray.kill(client)
        if backend == "actor":
            ray.kill(handle)
        else:
            serve.delete("bench")
    batches = after["batches"] - before["batches"]
    return {
        "backend": backend,
        "handler": handler,
        "callers": callers,
        "requests": len(latencies),
        "seconds": seconds,
        "requests_per_s": len(latencies) / seconds,
        "mean_batch": len(latencies) / batches if batches else 0.0,
        "median_latency_ms": 1000.0 * statistics.median(latencies),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batching", description=__doc__.splitlines()[0],
        epilog="examples:\n  python -m benchmarks.batching\n  python -m benchmarks.batching --callers 1 4 --requests 10 --handler sleep\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--handler", nargs="+", default=list(HANDLERS), choices=HANDLERS)
    parser.add_argument("--backend", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--out", default="benchmarks/out/batching.json")
    args = parser.parse_args(argv)

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rows = [
        measure(backend, handler, callers, args.requests, args.max_wait_ms)
        for handler in args.handler
        for callers in args.callers
        for backend in args.backend
    ]
    if "serve" in args.backend:
        serve.shutdown()
    print(f"{'handler':>8} | {'callers':>7} | {'backend':>7} | {'requests/s':>10} | {'mean batch':>10} | {'median ms':>9}")
    for row in rows:
        print(
            f"{row['handler']:>8} | {row['callers']:>7} | {row['backend']:>7} | {row['requests_per_s']:10.1f}"
            f" | {row['mean_batch']:10.2f} | {row['median_latency_ms']:9.1f}"
        )
    results = {"config": vars(args), "machine": platform.platform(), "rows": rows}
    print(f"wrote {write_json(results, args.out)}")
    return results


if __name__ == "__main__":
    main()
