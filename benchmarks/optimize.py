"""Per-asset optimisation speed: iterations/s and peak memory per representation and resolution.

    python -m benchmarks.optimize [--quick] [--out benchmarks/out/optimize.json] [--device auto]
                                  [--guidance excluded,included] [--representations nerf,splats]
                                  [--backprop deferred,direct]

``excluded``: the image-target guidance (an analytic sphere, no network), so the numbers are
the scene's render + backward + optimiser step alone. ``included``: in-process tiny SD1.5 +
IP-Adapter and MVDream guidance (random weights, ``models=tiny``), i.e. the full loop of the
CLI with toy models. CPU runs the tiny scene presets; CUDA runs the paper's scene configs (NeRF
hash grid with 512 samples per ray, splats with gsplat) at the paper's resolutions and batch
sizes (8 views at 64², 4 views at 256²). ``--backprop``: the modes of ``method.backprop`` to
time, so the cost of deferred back-propagation (one extra render forward) shows beside direct
mode's. Timings are medians over the measured iterations,
after warm-up iterations; peak memory is CUDA ``max_memory_allocated`` (or the process' peak
RSS on the CPU).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from benchmarks.common import environment, format_table, write_json
from stages.guidance.image_target import ImageTargetGuidance, SphereTarget
from stages.guidance.set import GuidanceSet
from stages.models.config import ModelsConfig
from stages.models.device import resolve_device
from stages.optimize.config import OptimizeConfig
from stages.optimize.loop import optimize_asset

DEFAULT_OUT = Path("benchmarks/out/optimize.json")
COLUMNS = (
    "representation", "backprop", "resolution", "batch", "guidance", "iterations_per_s", "ms_per_iteration", "ms_min",
    "peak_memory_mb", "opacity_mean",
)
"""``iterations_per_s`` / ``ms_per_iteration`` are medians, ``ms_min`` the fastest iteration (the
better estimate on a shared, contended CPU). ``opacity_mean`` of the timed renders: NeRF cost
depends on the occupied volume (occupancy pruning), so read speeds together with it."""


def bench_config(
    representation: str, resolution: int, batch: int, iterations: int, device: torch.device, backprop: str = "auto"
) -> OptimizeConfig:
    """Tiny scene presets on the CPU, the paper's scene configs on CUDA; one fixed resolution."""
    cfg = OptimizeConfig.tiny(representation) if device.type == "cpu" else OptimizeConfig(representation=representation)
    cfg.device = str(device)
    cfg.backprop = backprop
    cfg.iterations = iterations
    cfg.checkpoint_every = 0
    cfg.schedule.milestones = [1.0]
    cfg.schedule.resolutions = [resolution, resolution]
    cfg.schedule.batch_sizes = [batch, batch]
    return cfg


def build_guidance(kind: str, device: torch.device) -> GuidanceSet:
    """``excluded``: image target in both slots; ``included``: tiny IPGuidance + MVDreamGuidance."""
    if kind == "excluded":
        target = ImageTargetGuidance(SphereTarget(0.5))
        return GuidanceSet(ip=target, mvd=target)
    from stages.guidance.ip_guidance import IPGuidance
    from stages.guidance.mvdream_guidance import MVDreamGuidance

    tiny = {k: "tiny" for k in ("sd", "ip_adapter", "image_encoder", "mvdream", "mvdream_text", "reference")}
    models = ModelsConfig(**tiny, device=str(device), dtype="float32")
    return GuidanceSet(ip=IPGuidance.from_config(models), mvd=MVDreamGuidance.from_config(models))


def measure(cfg: OptimizeConfig, guidance: GuidanceSet, warmup: int, device: torch.device) -> dict[str, float]:
    """Run ``cfg.iterations`` iterations; time the ones after ``warmup``."""
    reference = Image.new("RGB", (64, 64), (180, 40, 40))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as work:
        result = optimize_asset(cfg, guidance, reference, 0, Path(work), "a red apple", "bench")
    seconds = [h["seconds"] for h in result.history[warmup:]] or [h["seconds"] for h in result.history]
    median = statistics.median(seconds)
    return {
        "iterations_per_s": 1.0 / median,
        "ms_per_iteration": 1000.0 * median,
        "ms_min": 1000.0 * min(seconds),
        "peak_memory_mb": max(h["peak_memory_mb"] for h in result.history),
        "opacity_mean": statistics.mean(h["opacity_mean"] for h in result.history[warmup:] or result.history),
    }


def run(
    device: torch.device,
    representations: Sequence[str],
    points: Sequence[tuple[int, int]],
    guidance_kinds: Sequence[str],
    iterations: int,
    warmup: int,
    backprops: Sequence[str] = ("auto",),
) -> list[dict[str, Any]]:
    rows = []
    for kind in guidance_kinds:
        guidance = build_guidance(kind, device)
        for representation in representations:
            for resolution, batch in points:
                for backprop in backprops:
                    cfg = bench_config(representation, resolution, batch, iterations + warmup, device, backprop)
                    row = {"representation": representation, "backprop": backprop, "resolution": resolution,
                           "batch": batch, "guidance": kind}
                    row.update(measure(cfg, guidance, warmup, device))
                    rows.append(row)
                    print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.optimize", description=__doc__.splitlines()[0],
        epilog="examples:\n  python -m benchmarks.optimize\n  python -m benchmarks.optimize --quick --representations nerf\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--quick", action="store_true", help="16² renders, 2 timed iterations (smoke test)")
    parser.add_argument("--guidance", default="excluded,included", help="comma list of excluded | included")
    parser.add_argument("--representations", default="nerf,splats", help="comma list of nerf | splats")
    parser.add_argument("--backprop", default="deferred,direct", help="comma list of method.backprop modes")
    parser.add_argument("--iterations", type=int, default=None, help="timed iterations per point")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations per point")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    kinds = [k for k in args.guidance.split(",") if k]
    representations = [r for r in args.representations.split(",") if r]
    for kind in kinds:
        if kind not in ("excluded", "included"):
            parser.error(f"--guidance: unknown kind {kind!r} (excluded | included)")
    for representation in representations:
        if representation not in ("nerf", "splats"):
            parser.error(f"--representations: unknown representation {representation!r} (nerf | splats)")
    backprops = [b for b in args.backprop.split(",") if b]
    for backprop in backprops:
        if backprop not in ("auto", "deferred", "direct"):
            parser.error(f"--backprop: unknown mode {backprop!r} (auto | deferred | direct)")
    if args.quick:
        points, iterations, warmup = [(16, 4)], 2, 1
    elif device.type == "cuda":
        points, iterations, warmup = [(64, 8), (256, 4)], 20, 5
    else:
        points, iterations, warmup = [(32, 4), (64, 4)], 5, 2
    iterations = args.iterations or iterations
    warmup = args.warmup if args.warmup is not None else warmup
    print("  ".join(COLUMNS), flush=True)
    rows = run(device, representations, points, kinds, iterations, warmup, backprops)
    results = {
        "benchmark": "optimize",
        "environment": environment(device),
        "settings": {"iterations": iterations, "warmup": warmup, "quick": args.quick,
                     "scene_configs": "tiny presets" if device.type == "cpu" else "paper defaults",
                     "included_guidance": "tiny random SD1.5+IP-Adapter and MVDream (models=tiny)"},
        "rows": rows,
    }
    print()
    print(format_table(rows, COLUMNS))
    print(f"wrote {write_json(results, args.out)}")
    return results


if __name__ == "__main__":
    main()
