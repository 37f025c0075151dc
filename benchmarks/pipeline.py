"""Aggregate optimiser throughput of the Ray pipeline vs the same assets run one after another.

``python -m benchmarks.pipeline [--concurrency 1 4 16] [--iterations 20] [--size auto] [--out FILE]``

Sequential baseline: in-process ``IPGuidance`` + ``MVDreamGuidance`` and ``optimize_asset`` for
each asset in turn. Pipeline: the same model factories inside ``IPGuidanceActor`` /
``MVDreamGuidanceActor`` (dynamic batching, ``max_batch`` = number of concurrent assets) and N
optimiser tasks at once. Reports aggregate iterations/s, speed-up, and the mean batch size each
actor saw; prints a table and writes JSON. Model loading and worker start-up are outside the
timed region (actors are pinged, workers warmed up first).

``--size``: ``tiny`` (tiny presets, ``OptimizeConfig.tiny()``) or ``full`` (SD1.5-, IP-Adapter-
and MVDream-size models with random weights from ``benchmarks.full``, fp16, the paper's
optimiser config; CUDA only). ``auto`` is ``full`` on CUDA and ``tiny`` on the CPU. On CUDA
the two guidance actors get ``--actor-gpus`` each and the optimiser tasks share the rest.
"""

from __future__ import annotations

import argparse
import functools
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import ray

from benchmarks.common import environment, write_json
from pipeline.actors import IPGuidanceActor, MVDreamGuidanceActor
from pipeline.components import default_components
from pipeline.task import GuidanceHandles
from stages.guidance.protocol import Guidance
from stages.guidance.set import GuidanceSet
from stages.models.config import ModelsConfig
from stages.optimize.config import OptimizeConfig

SIZES = ("auto", "tiny", "full")

PROMPTS = ["a red apple", "a wooden chair", "a ceramic teapot", "a small cactus", "a blue car", "a stone lion", "a tin robot", "a paper boat"]


def tiny_models(device: str) -> ModelsConfig:
    return ModelsConfig(
        sd="tiny", ip_adapter="tiny", image_encoder="tiny", mvdream="tiny", mvdream_text="tiny", reference="tiny", device=device, dtype="float32"
    )


def guidance_factories(size: str, config: OptimizeConfig, device: str) -> tuple[Callable[[], Guidance], Callable[[], Guidance]]:
    """Picklable factories of the IP and MVDream guidance at ``size`` (``tiny`` / ``full``)."""
    if size == "tiny":
        components = default_components(config, tiny_models(device))
        return components.ip_guidance, components.mvd_guidance
    import torch

    from benchmarks.full import build_ip_guidance, build_mvd_guidance

    return (
        functools.partial(build_ip_guidance, True, device, torch.float16),
        functools.partial(build_mvd_guidance, True, device, torch.float16),
    )


def prompt_of(index: int) -> str:
    return f"{PROMPTS[index % len(PROMPTS)]} #{index}"


@ray.remote
def _optimise(config: OptimizeConfig, handles: GuidanceHandles, reference: Any, index: int, work: str, tag: str = "bench") -> int:
    from stages.optimize.loop import optimize_asset

    asset_id = f"{tag}-{index}"
    guidance = handles.guidance_set(asset_id)
    result = optimize_asset(config, guidance, reference, index, Path(work) / asset_id, prompt_of(index), asset_id)
    for model in (guidance.ip, guidance.mvd):
        if model is not None:
            model.release(asset_id)
    return int(result.iterations - result.resumed_from)


def sequential(config: OptimizeConfig, factories: tuple[Callable[[], Guidance], Callable[[], Guidance]], references: list[Any], assets: int) -> dict[str, float]:
    from stages.optimize.loop import optimize_asset

    guidance = GuidanceSet(ip=factories[0](), mvd=factories[1]())
    with tempfile.TemporaryDirectory() as work:
        warm = OptimizeConfig(**{**config.__dict__, "iterations": 2})
        optimize_asset(warm, guidance, references[0], 0, Path(work) / "warm", prompt_of(0), "warm")  # untimed: lazy init
        began = time.perf_counter()
        iterations = 0
        for index in range(assets):
            result = optimize_asset(config, guidance, references[index], index, Path(work) / str(index), prompt_of(index), f"seq-{index}")
            iterations += result.iterations
        seconds = time.perf_counter() - began
    return {"assets": assets, "iterations": iterations, "seconds": seconds, "its": iterations / seconds}


def concurrent(
    config: OptimizeConfig,
    factories: tuple[Callable[[], Guidance], Callable[[], Guidance]],
    references: list[Any],
    assets: int,
    cpus: float,
    max_wait_ms: float,
    gpus: float = 0.0,
    actor_gpus: float = 0.0,
) -> dict[str, Any]:
    """N optimiser tasks at once against one IP and one MVDream actor; ``gpus`` is what the
    tasks share, ``actor_gpus`` what each actor gets (0 on the CPU)."""
    options = {"num_cpus": 0, "num_gpus": actor_gpus}
    ip = [IPGuidanceActor.options(**options).remote(factories[0], assets, max_wait_ms)]
    mvd = [MVDreamGuidanceActor.options(**options).remote(factories[1], assets, max_wait_ms)]
    task = {"num_cpus": cpus / assets, "num_gpus": gpus / assets}
    ray.get([actor.stats.remote() for actor in ip + mvd])  # models loaded before timing
    handles = GuidanceHandles(ip=ip, mvd=mvd)
    with tempfile.TemporaryDirectory() as work:
        # Untimed round of 2 iterations at the same concurrency: starts the workers and runs
        # every code path once (lazy init), so the timed round measures steady state.
        warm = OptimizeConfig(**{**config.__dict__, "iterations": 2})
        ray.get([_optimise.options(**task).remote(warm, handles, references[i], i, work, "warm") for i in range(assets)])
        began = time.perf_counter()
        refs = [_optimise.options(**task).remote(config, handles, references[i], i, work) for i in range(assets)]
        iterations = sum(ray.get(refs))
        seconds = time.perf_counter() - began
    stats = {"ip": ray.get(ip[0].stats.remote()), "mvd": ray.get(mvd[0].stats.remote())}
    for actor in ip + mvd:
        ray.kill(actor)
    return {"assets": assets, "iterations": iterations, "seconds": seconds, "its": iterations / seconds, "actors": stats}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pipeline", description=__doc__.splitlines()[0],
        epilog="examples:\n  python -m benchmarks.pipeline\n  python -m benchmarks.pipeline --concurrency 1 4 --iterations 10 --size tiny\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--sequential-assets", type=int, default=2)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", default="auto", choices=SIZES, help="model size (auto: full on CUDA, tiny on CPU)")
    parser.add_argument("--actor-gpus", type=float, default=0.25, help="GPU fraction of each guidance actor (CUDA)")
    parser.add_argument("--out", default="benchmarks/out/pipeline.json")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    size = ("full" if cuda else "tiny") if args.size == "auto" else args.size
    if size == "full" and not cuda:
        parser.error("--size full needs --device cuda (real-size models on the CPU take minutes per iteration)")

    config = OptimizeConfig() if size == "full" else OptimizeConfig.tiny()
    config.iterations = args.iterations
    config.checkpoint_every = 0
    config.device = args.device
    factories = guidance_factories(size, config, args.device)
    from stages.models.reference import ReferenceSampler

    n = max([args.sequential_assets, *args.concurrency])
    sampler = ReferenceSampler("tiny", device="cpu")  # the reference's content does not change the timing
    references = sampler.sample_many([prompt_of(i) for i in range(n)], list(range(n)), num_inference_steps=4)

    # Ray workers run torch with one thread (OMP_NUM_THREADS=1); measure the baseline both ways
    # and compare against the faster one.
    import torch

    threads = torch.get_num_threads()
    baselines = {}
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        baselines[f"{count}_threads"] = sequential(config, factories, references, args.sequential_assets)
    torch.set_num_threads(threads)
    best = max(baselines.values(), key=lambda row: row["its"])
    results: dict[str, Any] = {
        "config": vars(args), "size": size, "machine": platform.platform(), "environment": environment(args.device),
        "sequential": best, "sequential_by_threads": baselines,
    }
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    gpus = max(0.0, ray.cluster_resources().get("GPU", 0.0) - 2 * args.actor_gpus) if cuda else 0.0
    actor_gpus = args.actor_gpus if cuda else 0.0
    results["concurrent"] = [
        concurrent(config, factories, references, c, cpus, args.max_wait_ms, gpus, actor_gpus) for c in args.concurrency
    ]
    base = results["sequential"]["its"]
    print(f"{'assets at once':>14} | {'it/s (aggregate)':>16} | {'speed-up':>8} | {'mean batch ip':>13} | {'mean batch mvd':>14}")
    print(f"{'sequential':>14} | {base:16.2f} | {1.0:8.2f} | {'-':>13} | {'-':>14}")
    for row in results["concurrent"]:
        row["speedup"] = row["its"] / base
        ip, mvd = row["actors"]["ip"].get("mean_batch", 0.0), row["actors"]["mvd"].get("mean_batch", 0.0)
        print(f"{row['assets']:>14} | {row['its']:16.2f} | {row['speedup']:8.2f} | {ip:13.2f} | {mvd:14.2f}")
    print(f"wrote {write_json(results, args.out)}")
    return results


if __name__ == "__main__":
    main()
