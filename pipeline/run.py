"""Entry point: ``python -m pipeline.run CONFIG.yaml [key=value ...] [--retry-failed]``.

Reads top to bottom: load and validate the config (prompt files included; a relative output
of a Ray job goes under ``job_output_root``) → plan the jobs (skip committed assets; failed ones
unless ``--retry-failed``) → open the tracking (close a killed predecessor's run, give every
committed asset its run) → join or start Ray and check the resources → build the graph → keep
``resources.tasks_in_flight`` assets running, each with its MLflow child run from start to end
and its curves streamed → record each result (manifest shard) → gallery, totals, where to look.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TextIO

import ray

from pipeline.components import Components, default_components, models_needed
from pipeline.config import ConfigError, PipelineConfig, capacity_note, check_resources, cpu_fallback_notes, load_config
from pipeline.console import ModelsWatch, browse_lines, describe_cluster
from pipeline.graph import Graph, build_graph
from pipeline.job_output import resolve_job_output
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
    experiment_id: str | None = None
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
    relocated = resolve_job_output(config)
    prompts = read_prompts(config.prompts)
    jobs = make_jobs(config, prompts)
    todo, done, failed = plan_jobs(jobs, DatasetWriter(config.output), config.retry_failed)
    method = config.method
    lines = [f"[pipeline] note: {relocated}"] if relocated else []
    lines += [
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


def connect_ray(config: PipelineConfig, stream: TextIO | None = None) -> None:
    """Join ``RAY_ADDRESS`` / ``config.ray_address``; else start a local Ray (unless one is up)."""
    if ray.is_initialized():
        return
    stream = stream or sys.stderr
    address = os.environ.get("RAY_ADDRESS") or config.ray_address
    began = time.monotonic()
    print(f"[pipeline] {'joining Ray at ' + address if address else 'starting a local Ray'} ...", file=stream, flush=True)
    if address:
        context = ray.init(address=address)
    else:
        # address="local": always a fresh local Ray, never a stale `ray start` head that
        # /tmp/ray/ray_current_cluster may still name.
        context = ray.init(address="local", num_cpus=config.local_ray.num_cpus, include_dashboard=config.local_ray.include_dashboard)
    print(f"[pipeline] {describe_cluster(time.monotonic() - began, getattr(context, 'dashboard_url', None))}", file=stream, flush=True)


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
    relocated = resolve_job_output(config)
    if relocated:
        print(f"[pipeline] note: {relocated}", file=stream, flush=True)
    jobs = make_jobs(config, read_prompts(config.prompts))
    writer = DatasetWriter(config.output)
    writer.clean_staging()
    summary = RunSummary(jobs=len(jobs), reconciled=len(writer.reconcile()))
    todo, summary.skipped_done, summary.skipped_failed = plan_jobs(jobs, writer, config.retry_failed)
    print(
        f"[pipeline] {len(jobs)} assets: {summary.skipped_done} already done, "
        f"{summary.skipped_failed} failed earlier (kept; --retry-failed redoes them), {len(todo)} to run -> {config.output}",
        file=stream,
        flush=True,
    )
    tracker = _open_tracker(config, writer, len(jobs), stream)

    connect_ray(config, stream)
    cluster, needed = ray.cluster_resources(), models_needed(config.method)
    check_resources(config, cluster, needed)
    for note in [capacity_note(config, cluster, needed), *cpu_fallback_notes(config, cluster, needed)]:
        if note:
            print(f"[pipeline] note: {note}", file=stream, flush=True)
    if not todo:  # nothing to start: no actors; a tracking run only if repairs needed one
        summary.seconds = time.monotonic() - began
        _write_gallery(config, tracker, stream)
        if tracker is not None:
            summary.parent_run_id = tracker.parent_id if tracker.started else None
            summary.experiment_id = tracker.experiment_id
            tracker.finish(summary.totals())
        return summary
    components = components or default_components(config.method, config.models)

    if tracker is not None:
        summary.parent_run_id, summary.experiment_id = tracker.parent_id, tracker.experiment_id
        print(f"[pipeline] MLflow: {tracker.tracking_uri} (parent run {tracker.parent_id})", file=stream, flush=True)

    graph = build_graph(config, components, work_dir_of(config, writer))
    printer = ProgressPrinter(
        len(todo), config.method.iterations, config.progress_every_s, stream, parallel=min(config.resources.tasks_in_flight, len(todo))
    )
    status, reason = "FAILED", None
    try:
        _drive(graph, todo, config, writer, tracker, printer, summary)
        status = "FINISHED"
    except BaseException as error:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        reason = f"{type(error).__name__}: {error}"
        raise
    finally:
        snapshot = ray.get(graph.progress.snapshot.remote())
        summary.iterations = snapshot["iterations"]
        summary.attempts = snapshot["attempts"]
        summary.actor_stats = graph.actor_stats()
        summary.seconds = time.monotonic() - began
        graph.shutdown()
        printer.in_flight = 0
        printer.update(snapshot, force=True)
        _write_gallery(config, tracker, stream)
        if tracker is not None:
            tracker.finish(summary.totals(), status, reason)
    return summary


def _open_tracker(config: PipelineConfig, writer: DatasetWriter, total_jobs: int, stream: TextIO) -> Any:
    """The run's tracker (None when tracking is off), after closing a killed predecessor's
    parent run and giving every committed asset its one child run."""
    if not config.tracking.enabled:
        return None
    from pipeline.tracking import Tracker

    tracker = Tracker(config, work_dir_of(config, writer), total_jobs)
    if tracker.stale_parent:
        print(f"[pipeline] MLflow: closed run {tracker.stale_parent} of a driver that stopped without closing it (KILLED)", file=stream, flush=True)
    repaired = tracker.repair(writer)
    if repaired:
        writer.write_manifest(repaired)
        print(f"[pipeline] MLflow: re-created the child runs of {len(repaired)} committed asset(s) from their asset.json", file=stream, flush=True)
    return tracker


def _write_gallery(config: PipelineConfig, tracker: Any, stream: TextIO) -> None:
    """Build the dataset's gallery and log it under the parent run; a failure here is reported,
    never raised: the assets and manifest are already committed."""
    if not config.gallery:
        return
    from pipeline.gallery import build_gallery, log_gallery_to_mlflow

    try:
        gallery = build_gallery(config.output)
        if tracker is not None and tracker.started:
            log_gallery_to_mlflow(gallery, tracker.parent_id, tracking_uri=tracker.tracking_uri)
    except Exception as error:  # noqa: BLE001 - reported; the dataset itself is complete
        print(f"[pipeline] gallery not written: {type(error).__name__}: {error}", file=stream, flush=True)
        return
    print(f"[pipeline] gallery written: {gallery / 'index.html'}", file=stream, flush=True)


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
    models = ModelsWatch(graph.model_actors(), printer.note)
    while queue or pending:
        while queue and len(pending) < config.resources.tasks_in_flight:
            job = queue.pop(0)
            if tracker is not None:
                job = dataclasses.replace(job, mlflow_run_id=tracker.start_asset(job))
            pending[graph.submit(job)] = job
        printer.in_flight = len(pending)
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(config.progress_every_s, 1.0))
        models.poll()
        if tracker is not None:
            tracker.log_stream(ray.get(graph.progress.drain.remote()))
        for ref in ready:
            job = pending.pop(ref)
            row, _ = _collect(ref, job, config)
            if tracker is not None:
                row["mlflow_run_id"] = tracker.finish_asset(row, writer)
            rows.append(row)
            if row["status"] == "succeeded":
                printer.done += 1
                summary.succeeded += 1
            else:
                printer.failed += 1
                summary.failed += 1
                printer.note(f"[pipeline] FAILED {job.asset_id} ({job.prompt!r}): {row['error'].splitlines()[0]}")
        if rows and (len(rows) >= MANIFEST_FLUSH_ROWS or time.monotonic() - last_flush >= MANIFEST_FLUSH_S or not (queue or pending)):
            writer.write_manifest(rows)
            rows, last_flush = [], time.monotonic()
        printer.in_flight = len(pending)
        printer.update(ray.get(graph.progress.snapshot.remote()))
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


EXAMPLES = """examples:
  python -m pipeline.run configs/quickstart.yaml                              # tiny models on the CPU, no downloads
  python -m pipeline.run configs/dataset.yaml variants=4 method.iterations=3000   # OmegaConf dotlist overrides
  python -m pipeline.run configs/dataset.yaml --dry-run                       # validate and show the plan; start nothing
  python -m pipeline.run configs/dataset.yaml --retry-failed                  # redo the assets recorded as failed
  RAY_ADDRESS=auto python -m pipeline.run configs/dataset.yaml output=s3://bucket/ds work_dir=/shared/work

Rerunning the same config skips committed assets and resumes unfinished ones from their
checkpoints. Keys: docs/CONFIG.md. On a cluster (ray job submit): README "On a Ray cluster".
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.run", description=__doc__.splitlines()[0], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. variants=4 method.iterations=3000")
    parser.add_argument("--retry-failed", action="store_true", help="redo assets recorded as failed")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and print what would run; start nothing")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.retry_failed:
            config.retry_failed = True
        if args.dry_run:
            describe_plan(config, sys.stderr)
            return 0
        summary = run_dataset(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"[pipeline] finished: {summary.succeeded} succeeded, {summary.failed} failed, "
        f"{summary.skipped_done} skipped (done), {summary.skipped_failed} skipped (failed) "
        f"in {summary.seconds:.1f}s; dataset at {config.output}",
        *browse_lines(config, summary.experiment_id),
        sep="\n",
        file=sys.stderr,
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
