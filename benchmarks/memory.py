"""The GPU memory plan of a dataset config: every process, where Ray puts it, the sum per GPU.

    python -m benchmarks.memory configs/dataset.yaml [key=value ...] [--gpu-memory-gib 80]
        [--fork-point] [--out benchmarks/out/memory.json]
    python -m benchmarks.memory --update-table      # re-measure the shipped table

Machine-independent: model actors are measured on the ``meta`` device with the real code at full
size (no weights, no GPU; ``stages.guidance.memory``), optimiser tasks come from
``stages.optimize.memory.task_memory``; see ``pipeline.memory_plan``. ``--fork-point`` also
prints the plan as the code at e009dc1 ran the same config: every batch in one VAE pass with its
whole encoder graph alive and one UNet forward (no ``vae_chunk`` / ``unet_rows`` /
``max_batch_views``), so ``max_batch: 16`` of 8-view requests meant 128 encoder graphs at once.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Sequence

from benchmarks.common import write_json
from pipeline.components import models_needed
from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.memory_plan import ACTOR_NAMES, GIB, MemoryPlan, actor_specs, format_plan, plan_memory
from stages.guidance.memory import TABLE, ActorSpec, write_table
from stages.guidance.runtime import UNBOUNDED

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("benchmarks/out/memory.json")
FORK_POINT_TASK = {"backprop": "direct"}
"""``method`` fields that turn the optimiser task back into e009dc1's (direct back-propagation of
the whole render's graph), set in the fork-point plan where the method has them (the deferred
back-propagation switch, ``method.backprop``, comes with ``stages.optimize.memory``)."""
SHIPPED = (
    "dataset.yaml",
    "dataset_8gpu.yaml",
    "eval_t3bench.yaml",
    "gpteval3d.yaml",
    "t3bench_multi.yaml",
    "t3bench_single.yaml",
    "t3bench_surr.yaml",
)
"""Configs whose actor figures the shipped table holds (sweep_ip_scale.yaml runs dataset.yaml)."""


def fork_point(config: PipelineConfig) -> PipelineConfig:
    """``config`` as the code at e009dc1 ran it (see the module docstring)."""
    old = copy.deepcopy(config)
    for kind in ("ip", "mvd"):
        actor = getattr(old.resources, kind)
        actor.vae_chunk = actor.unet_rows = UNBOUNDED
        actor.max_batch_views = 0
    for name, value in FORK_POINT_TASK.items():
        if hasattr(old.method, name):
            setattr(old.method, name, value)
    return old


def plan_json(plan: MemoryPlan, capacity: int, headroom: float) -> dict[str, Any]:
    gpus = []
    for index, (gpu, total) in enumerate(zip(plan.gpus, plan.gpu_totals())):
        groups: dict[str, dict[str, Any]] = {}
        for p in gpu:
            group = groups.setdefault(p.kind, {"what": ACTOR_NAMES.get(p.kind, "optimiser task"), "count": 0, "share": p.share,
                                               "peak_bytes": p.peak, "parts_bytes": p.parts, "call": p.detail})
            group["count"] += 1
        gpus.append({"gpu": index, "total_bytes": total, "total_gib": total / GIB, "fits": total <= capacity * (1 - headroom),
                     "processes": list(groups.values())})
    return {
        "dtype": plan.dtype,
        "complete": plan.complete,
        "capacity_gib": capacity / GIB,
        "headroom": headroom,
        "gpus": gpus,
        "on_cpu": len(plan.on_cpu),
        "task_phases": [vars(p) for p in plan.task_phases] if plan.task_phases else None,
        "notes": plan.notes,
    }


def shipped_specs() -> list[ActorSpec]:
    """Every actor spec the shipped GPU configs (and their fork-point plans) need."""
    specs: dict[str, ActorSpec] = {}
    for name in SHIPPED:
        config = load_config(REPO / "configs" / name, check_models=False)  # the plan needs no weights
        for candidate in (config, fork_point(config)):
            for kind in models_needed(candidate.method):
                if getattr(candidate.resources, kind).num_gpus > 0:
                    for spec in actor_specs(candidate, kind):
                        specs[spec.key()] = spec
    return list(specs.values())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="dataset YAML (configs/dataset.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. resources.tasks_in_flight=8")
    parser.add_argument("--gpu-memory-gib", type=float, default=None, help="GPU to plan against (default: resources.gpu_memory_gib, else 80)")
    parser.add_argument("--fork-point", action="store_true", help="also print the plan as e009dc1 ran this config")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--update-table", action="store_true", help=f"re-measure the shipped table ({TABLE.name})")
    args = parser.parse_intermixed_args(argv)
    if args.update_table:
        entries = write_table(shipped_specs(), TABLE)
        print(f"wrote {len(entries)} entries to {TABLE}")
        return {"entries": entries}
    if not args.config:
        parser.error("CONFIG is required (or --update-table)")
    try:
        config = load_config(args.config, args.overrides, check_models=False)  # the plan needs no weights
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    gib = args.gpu_memory_gib or config.resources.gpu_memory_gib or 80.0
    capacity, headroom = int(gib * GIB), config.resources.gpu_memory_headroom
    results: dict[str, Any] = {"benchmark": "memory", "config": str(args.config), "overrides": list(args.overrides)}
    plans = [("plan", config)] + ([("fork_point", fork_point(config))] if args.fork_point else [])
    for name, candidate in plans:
        plan = plan_memory(candidate)
        title = "as at e009dc1 (one VAE pass and one UNet forward per batch)" if name == "fork_point" else "this code"
        print(f"\n== {args.config} — {title}")
        print(format_plan(plan, capacity, headroom))
        results[name] = plan_json(plan, capacity, headroom)
    path = write_json(results, args.out)
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
