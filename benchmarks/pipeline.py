"""Aggregate optimiser throughput of the Ray pipeline vs the same assets run one after another.

``python -m benchmarks.pipeline [--concurrency 1 4 16] [--iterations 20] [--out FILE]``

Sequential baseline: in-process ``IPGuidance`` + ``MVDreamGuidance`` (tiny presets by default)
and ``optimize_asset`` for each asset in turn. Pipeline: the same model factories inside
``IPGuidanceActor`` / ``MVDreamGuidanceActor`` (dynamic batching, ``max_batch`` = number of
concurrent assets) and N optimiser tasks at once. Reports aggregate iterations/s, speed-up,
and the mean batch size each actor saw; prints a table and writes JSON. Model loading and
worker start-up are outside the timed region (actors are pinged, workers warmed up first).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from pipeline.actors import IPGuidanceActor, MVDreamGuidanceActor
from pipeline.components import default_components
from pipeline.task import GuidanceHandles
from stages.guidance.set import GuidanceSet
from stages.models.config import ModelsConfig
from stages.optimize.config import OptimizeConfig

PROMPTS = ["a red apple", "a wooden chair", "a ceramic teapot", "a small cactus", "a blue car", "a stone lion", "a tin robot", "a paper boat"]


def tiny_models(device: str) -> ModelsConfig:
    return ModelsConfig(
        sd="tiny", ip_adapter="tiny", image_encoder="tiny", mvdream="tiny", mvdream_text="tiny", reference="tiny", device=device, dtype="float32"
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


def sequential(config: OptimizeConfig, models: ModelsConfig, references: list[Any], assets: int) -> dict[str, float]:
    from stages.optimize.loop import optimize_asset

    components = default_components(config, models)
    guidance = GuidanceSet(
        ip=components.ip_guidance() if components.ip_guidance else None,
        mvd=components.mvd_guidance() if components.mvd_guidance else None,
    )
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


def concurrent(config: OptimizeConfig, models: ModelsConfig, references: list[Any], assets: int, cpus: float, max_wait_ms: float) -> dict[str, Any]:
    components = default_components(config, models)
    ip = [IPGuidanceActor.options(num_cpus=0).remote(components.ip_guidance, assets, max_wait_ms)] if components.ip_guidance else []
    mvd = [MVDreamGuidanceActor.options(num_cpus=0).remote(components.mvd_guidance, assets, max_wait_ms)] if components.mvd_guidance else []
    ray.get([actor.stats.remote() for actor in ip + mvd])  # models loaded before timing
    handles = GuidanceHandles(ip=ip, mvd=mvd)
    with tempfile.TemporaryDirectory() as work:
        # Untimed round of 2 iterations at the same concurrency: starts the workers and runs
        # every code path once (lazy init), so the timed round measures steady state.
        warm = OptimizeConfig(**{**config.__dict__, "iterations": 2})
        ray.get([_optimise.options(num_cpus=cpus / assets).remote(warm, handles, references[i], i, work, "warm") for i in range(assets)])
        began = time.perf_counter()
        refs = [
            _optimise.options(num_cpus=cpus / assets).remote(config, handles, references[i], i, work) for i in range(assets)
        ]
        iterations = sum(ray.get(refs))
        seconds = time.perf_counter() - began
    stats = {"ip": ray.get(ip[0].stats.remote()) if ip else {}, "mvd": ray.get(mvd[0].stats.remote()) if mvd else {}}
    for actor in ip + mvd:
        ray.kill(actor)
    return {"assets": assets, "iterations": iterations, "seconds": seconds, "its": iterations / seconds, "actors": stats}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--sequential-assets", type=int, default=2)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/out/pipeline.json")
    args = parser.parse_args(argv)

    config = OptimizeConfig.tiny()
    config.iterations = args.iterations
    config.checkpoint_every = 0
    config.device = args.device
    models = tiny_models(args.device)
    from stages.models.reference import ReferenceSampler

    n = max([args.sequential_assets, *args.concurrency])
    sampler = ReferenceSampler("tiny", device=args.device)
    references = sampler.sample_many([prompt_of(i) for i in range(n)], list(range(n)), num_inference_steps=4)

    # Ray workers run torch with one thread (OMP_NUM_THREADS=1); measure the baseline both ways
    # and compare against the faster one.
    import torch

    threads = torch.get_num_threads()
    baselines = {}
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        baselines[f"{count}_threads"] = sequential(config, models, references, args.sequential_assets)
    torch.set_num_threads(threads)
    best = max(baselines.values(), key=lambda row: row["its"])
    results: dict[str, Any] = {"config": vars(args), "machine": platform.platform(), "sequential": best, "sequential_by_threads": baselines}
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    results["concurrent"] = [concurrent(config, models, references, c, cpus, args.max_wait_ms) for c in args.concurrency]
    base = results["sequential"]["its"]
    print(f"{'assets at once':>14} | {'it/s (aggregate)':>16} | {'speed-up':>8} | {'mean batch ip':>13} | {'mean batch mvd':>14}")
    print(f"{'sequential':>14} | {base:16.2f} | {1.0:8.2f} | {'-':>13} | {'-':>14}")
    for row in results["concurrent"]:
        row["speedup"] = row["its"] / base
        ip, mvd = row["actors"]["ip"].get("mean_batch", 0.0), row["actors"]["mvd"].get("mean_batch", 0.0)
        print(f"{row['assets']:>14} | {row['its']:16.2f} | {row['speedup']:8.2f} | {ip:13.2f} | {mvd:14.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
