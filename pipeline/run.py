"""Entry point: ``python -m pipeline.run CONFIG.yaml [key=value ...] [--retry-failed]``.

Reads top to bottom: load and validate the config (prompt files included) → plan the jobs
(skip committed assets; failed ones unless ``--retry-failed``) → join or start Ray and check
the resources and the GPU memory plan → build the graph → keep ``resources.tasks_in_flight``
assets running → record each result (manifest shard, MLflow child run) → totals.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TextIO

import ray

from pipeline.components import Components, default_components, models_needed
from pipeline.config import ConfigError, PipelineConfig, capacity_note, check_resources, cpu_fallback_notes, load_config
from pipeline.graph import Graph, build_graph
from pipeline.memory_plan import check_memory_plan, describe_memory_plan
from pipeline.jobs import Job, make_jobs
from pipeline.progress import ProgressPrinter
from pipeline.prompts import read_prompts
from pipeline.task import manifest_row
from pipeline.writer import DatasetWriter, utc_now

MANIFEST_FLUSH_ROWS = 16
MANIFEST_FLUSH_S = 30.0


@dataclass
class RunSummary:
    """What one ``run_dataset`` call did."""

    jobs: int = 0
    skipped_done: int = 0
    skipped_failed: int = 0
    succeeded: int = 0
    failed: int = 0
    reconciled: int = 0
    iterations: int = 0
    seconds: float = 0.0
    actor_stats: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    parent_run_id: str | None = None
    attempts: dict[str, int] = field(default_factory=dict)
    """Optimiser attempts per asset started in this run (> 1: Ray retried the task)."""

    def totals(self) -> dict[str, float]:
        rate = self.iterations / self.seconds if self.seconds > 0 else 0.0
        totals = {
            "jobs": self.jobs,
            "skipped_done": self.skipped_done,
            "skipped_failed": self.skipped_failed,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "duration_s": self.seconds,
            "iterations": self.iterations,
            "iterations_per_s": rate,
            "assets_per_hour": 3600.0 * (self.succeeded + self.failed) / self.seconds if self.seconds > 0 else 0.0,
        }
        for kind, stats in self.actor_stats.items():
            for replica, values in enumerate(stats):
                totals[f"actor/{kind}/{replica}/mean_batch"] = values.get("mean_batch", 0.0)
        return totals


def plan_jobs(jobs: Sequence[Job], writer: DatasetWriter, retry_failed: bool) -> tuple[list[Job], int, int]:
    """(jobs to run, #already committed, #failed and not retried)."""
    committed = writer.committed_ids()
    latest = writer.latest_rows()
    todo, done, failed = [], 0, 0
    for job in jobs:
        if job.asset_id in committed:
            done += 1
        elif not retry_failed and latest.get(job.asset_id, {}).get("status") == "failed":
            failed += 1
        else:
            todo.append(job)
    return todo, done, failed


def describe_plan(config: PipelineConfig, stream: TextIO, show: int = 10) -> list[Job]:
    """Print what a run of ``config`` would do and return its jobs to run; writes nothing and
    starts no Ray (``--dry-run``): prompts × variants, the config digest, the method and models,
    which assets are already done or failed, and the first ``show`` assets to run."""
    prompts = read_prompts(config.prompts)
    jobs = make_jobs(config, prompts)
    todo, done, failed = plan_jobs(jobs, DatasetWriter(config.output), config.retry_failed)
    method = config.method
    lines = [
        f"[pipeline] dry run: {len(prompts)} prompts x {config.variants} variants = {len(jobs)} assets -> {config.output}",
        f"  config digest {jobs[0].config_digest if jobs else '-'}: loss {method.loss}, {method.representation}, "
        f"{method.iterations} iterations; models: {', '.join(models_needed(method))}",
        f"  {done} already done, {failed} failed earlier ({'redone' if config.retry_failed else 'kept; --retry-failed redoes them'}), "
        f"{len(todo)} to run, {config.resources.tasks_in_flight} at a time",
    ]
    lines += [f"  would run {job.asset_id}  variant {job.variant}  {job.prompt!r}" for job in todo[:show]]
    if len(todo) > show:
        lines.append(f"  ... and {len(todo) - show} more")
    print("\n".join(lines), file=stream, flush=True)
    return todo


def connect_ray(config: PipelineConfig) -> None:
    """Join ``RAY_ADDRESS`` / ``config.ray_address``; else start a local Ray (unless one is up)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or config.ray_address
    if address:
        ray.init(address=address)
    else:
        # address="local": always a fresh local Ray, never a stale `ray start` head that
        # /tmp/ray/ray_current_cluster may still name.
        ray.init(address="local", num_cpus=config.local_ray.num_cpus, include_dashboard=config.local_ray.include_dashboard)


def work_dir_of(config: PipelineConfig, writer: DatasetWriter) -> str:
    if config.work_dir:
        return str(Path(config.work_dir).expanduser().resolve())
    root = writer.local_root()
    assert root is not None, "validate_config requires work_dir for remote outputs"
    return str(root / ".work")


def run_dataset(
    config: PipelineConfig,
    components: Components | None = None,
    stream: TextIO | None = None,
) -> RunSummary:
    """Generate every missing asset of ``config``'s dataset; returns what happened."""
    stream = stream or sys.stderr
    began = time.monotonic()
    jobs = make_jobs(config, read_prompts(config.prompts))
    writer = DatasetWriter(config.output)
    writer.clean_staging()
    summary = RunSummary(jobs=len(jobs), reconciled=len(writer.reconcile()))
    todo, summary.skipped_done, summary.skipped_failed = plan_jobs(jobs, writer, config.retry_failed)
    print(
        f"[pipeline] {len(jobs)} assets: {summary.skipped_done} already done, "
        f"{summary.skipped_failed} failed earlier (kept; --retry-failed redoes them), {len(todo)} to run",
        file=stream,
        flush=True,
    )

    connect_ray(config)
    cluster, needed = ray.cluster_resources(), models_needed(config.method)
    check_resources(config, cluster, needed)
    check_memory_plan(config, cluster, stream)  # before any model loads
    for note in [capacity_note(config, cluster, needed), *cpu_fallback_notes(config, cluster, needed)]:
        if note:
            print(f"[pipeline] note: {note}", file=stream, flush=True)
    if not todo:  # nothing to start: no actors, no tracking run
        _write_gallery(config, None, stream)
        summary.seconds = time.monotonic() - began
        return summary
    components = components or default_components(config.method, config.models, config.resources)

    tracker = None
    if config.tracking.enabled:
        from pipeline.tracking import Tracker

        tracker = Tracker(config, len(jobs))
        summary.parent_run_id = tracker.parent_id
        print(f"[pipeline] MLflow: {tracker.tracking_uri} (parent run {tracker.parent_id})", file=stream, flush=True)

    graph = build_graph(config, components, work_dir_of(config, writer))
    printer = ProgressPrinter(len(todo), config.method.iterations, config.progress_every_s, stream)
    status = "FAILED"
    try:
        _drive(graph, todo, config, writer, tracker, printer, summary)
        status = "FINISHED"
    finally:
        snapshot = ray.get(graph.progress.snapshot.remote())
        summary.iterations = snapshot["iterations"]
        summary.attempts = snapshot["attempts"]
        summary.actor_stats = graph.actor_stats()
        summary.seconds = time.monotonic() - began
        graph.shutdown()
        _write_gallery(config, tracker, stream)
        if tracker is not None:
            tracker.finish(summary.totals(), status)
    printer.in_flight = 0
    printer.maybe_print(summary.iterations, force=True)
    return summary


def _write_gallery(config: PipelineConfig, tracker: Any, stream: TextIO) -> None:
    """Build the dataset's gallery and log it under the parent run; a failure here is reported,
    never raised: the assets and manifest are already committed."""
    if not config.gallery:
        return
    from pipeline.gallery import build_gallery, log_gallery_to_mlflow

    try:
        gallery = build_gallery(config.output)
        if tracker is not None:
            log_gallery_to_mlflow(gallery, tracker.parent_id, tracking_uri=tracker.tracking_uri)
    except Exception as error:  # noqa: BLE001 - reported; the dataset itself is complete
        print(f"[pipeline] gallery not written: {type(error).__name__}: {error}", file=stream, flush=True)
        return
    print(f"[pipeline] gallery: {gallery / 'index.html'}", file=stream, flush=True)


def _drive(
    graph: Graph,
    todo: list[Job],
    config: PipelineConfig,
    writer: DatasetWriter,
    tracker: Any,
    printer: ProgressPrinter,
    summary: RunSummary,
) -> None:
    """Keep ``tasks_in_flight`` assets running; record each result as it arrives."""
    pending: dict[ray.ObjectRef, Job] = {}
    rows: list[dict[str, Any]] = []
    last_flush = time.monotonic()
    queue = list(todo)
    while queue or pending:
        while queue and len(pending) < config.resources.tasks_in_flight:
            job = queue.pop(0)
            pending[graph.submit(job)] = job
        printer.in_flight = len(pending)
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(config.progress_every_s, 1.0))
        for ref in ready:
            job = pending.pop(ref)
            row, history = _collect(ref, job, config)
            if tracker is not None:
                local = writer.local_root()
                asset_dir = local / row["asset_dir"] if local is not None and row["status"] == "succeeded" else None
                row["mlflow_run_id"] = tracker.log_asset(row, history, asset_dir)
            rows.append(row)
            if row["status"] == "succeeded":
                printer.done += 1
                summary.succeeded += 1
            else:
                printer.failed += 1
                summary.failed += 1
                print(f"[pipeline] FAILED {job.asset_id} ({job.prompt!r}): {row['error'].splitlines()[0]}", file=printer.stream, flush=True)
        if rows and (len(rows) >= MANIFEST_FLUSH_ROWS or time.monotonic() - last_flush >= MANIFEST_FLUSH_S or not (queue or pending)):
            writer.write_manifest(rows)
            rows, last_flush = [], time.monotonic()
        printer.in_flight = len(pending)
        printer.maybe_print(ray.get(graph.progress.snapshot.remote())["iterations"])
    if rows:
        writer.write_manifest(rows)


def _collect(ref: ray.ObjectRef, job: Job, config: PipelineConfig) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """The task's result, or a failed row when Ray could not run it (retries exhausted, ...)."""
    try:
        result = ray.get(ref)
        return result["row"], result["history"]
    except (ray.exceptions.RayError, Exception) as error:  # noqa: BLE001 - recorded per asset
        message = f"{type(error).__name__}: {str(error)[:2000]}"
        now = utc_now()
        return manifest_row(job, config.method, status="failed", error=message, started_at=now, finished_at=now), []


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. variants=4 method.iterations=3000")
    parser.add_argument("--retry-failed", action="store_true", help="redo assets recorded as failed")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and print what would run and its GPU memory plan; start nothing")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.retry_failed:
            config.retry_failed = True
        if args.dry_run:
            describe_plan(config, sys.stderr)
            describe_memory_plan(config, sys.stderr)
            return 0
        summary = run_dataset(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"[pipeline] finished: {summary.succeeded} succeeded, {summary.failed} failed, "
        f"{summary.skipped_done} skipped (done), {summary.skipped_failed} skipped (failed) "
        f"in {summary.seconds:.1f}s; dataset at {config.output}",
        file=sys.stderr,
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
