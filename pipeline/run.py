"""Entry point: ``python -m pipeline.run CONFIG.yaml [key=value ...] [--retry-failed]``.

Reads top to bottom: load and validate the config (prompt files, model sources, output paths
included; a relative output of a Ray job goes under ``job_output_root``) → repair the manifest
(``--verify``: check committed files) → plan the jobs (skip committed assets; failed ones unless
``--retry-failed``) → open the tracking (close a killed predecessor's run, give every committed
asset its run) → join or start Ray, check the resources and the GPU memory plan → build the graph
and wait for the models → keep ``resources.tasks_in_flight`` assets running, each with its MLflow child run from
start to end and its curves streamed → record each result (manifest shard) → gallery, totals,
where to look. A fault of the run (a model gone for good, the disk full) stops it with one
message; see ``pipeline/faults.py``.
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

from pipeline.capacity import capacity_note, check_resources, cpu_fallback_notes
from pipeline.components import Components, default_components, models_needed
from pipeline.config import ConfigError, PipelineConfig, load_config, validate_config
from pipeline.console import browse_lines, describe_cluster
from pipeline.faults import (
    ModelGoneError,
    ModelWatch,
    RunFaultError,
    RunStopped,
    disk_full_cause,
    disk_full_message,
    finish_quietly,
)
from pipeline.graph import Graph, build_graph
from pipeline.integrity import damaged_parts_note, repair_manifest, requeue_damaged, verify_assets
from pipeline.job_output import resolve_job_output
from pipeline.memory_plan import check_memory_plan, describe_memory_plan
from pipeline.jobs import Job, make_jobs
from pipeline.preflight import wait_for_ray
from pipeline.progress import ProgressPrinter
from pipeline.prompts import read_prompt_list
from pipeline.manifest import ManifestRow
from pipeline.writer import DatasetWriter, utc_now
from stages.asset_layout import WORK_DIR

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


def describe_plan(config: PipelineConfig, stream: TextIO, show: int = 10, verify: bool = False) -> list[Job]:
    """Print what a run of ``config`` would do and return its jobs to run; writes nothing and
    starts no Ray (``--dry-run``): prompts × variants, the config digest, the method and models,
    which assets are already done or failed (and, with ``verify``, damaged), and the first
    ``show`` assets to run."""
    relocated = resolve_job_output(config)
    prompt_list = read_prompt_list(config.prompts)
    prompts = prompt_list.prompts
    jobs = make_jobs(config, prompts)
    writer = DatasetWriter(config.output)
    todo, done, failed = plan_jobs(jobs, writer, config.retry_failed)
    notes = [prompt_list.note(), *damaged_parts_note(writer)]
    if verify:
        report = verify_assets(writer)
        notes += report.lines() + (["a run with --verify sets the damaged assets aside and redoes them"] if report.damaged else [])
    method = config.method
    lines = [f"[pipeline] note: {relocated}"] if relocated else []
    lines += [f"  {note}" for note in notes if note] + [
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
    """Join ``RAY_ADDRESS`` / ``config.ray_address`` (waiting at most ``ray_connect_timeout_s``
    for it to answer); else start a local Ray (unless one is up)."""
    if ray.is_initialized():
        return
    stream = stream or sys.stderr
    from_env = os.environ.get("RAY_ADDRESS")
    address = from_env or config.ray_address
    began = time.monotonic()
    print(f"[pipeline] {'joining Ray at ' + address if address else 'starting a local Ray'} ...", file=stream, flush=True)
    if address:
        wait_for_ray(address, "RAY_ADDRESS" if from_env else "config key 'ray_address'", config.ray_connect_timeout_s)
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
    return str(root / WORK_DIR)


def run_dataset(
    config: PipelineConfig,
    components: Components | None = None,
    stream: TextIO | None = None,
    verify: bool = False,
) -> RunSummary:
    """Generate every missing asset of ``config``'s dataset; returns what happened. ``verify``:
    check committed files against their checksums first and redo damaged assets. Raises
    :class:`RunStopped` (after the summary, gallery and tracking status) when a fault of the
    run stopped it."""
    stream = stream or sys.stderr
    began = time.monotonic()
    relocated = resolve_job_output(config)
    if relocated:
        print(f"[pipeline] note: {relocated}", file=stream, flush=True)
    prompt_list = read_prompt_list(config.prompts)
    jobs = make_jobs(config, prompt_list.prompts)
    writer = DatasetWriter(config.output)
    writer.clean_staging()
    repair = repair_manifest(writer)
    notes = [prompt_list.note(), *repair.lines(), *(requeue_damaged(writer) if verify else [])]
    for note in notes:
        if note:
            print(f"[pipeline] {note}", file=stream, flush=True)
    summary = RunSummary(jobs=len(jobs), reconciled=repair.reconciled)
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
    check_memory_plan(config, cluster, stream)  # before any model loads
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
    components = components or default_components(config.method, config.models, config.resources)

    if tracker is not None:
        summary.parent_run_id, summary.experiment_id = tracker.parent_id, tracker.experiment_id
        print(f"[pipeline] MLflow: {tracker.tracking_uri} (parent run {tracker.parent_id})", file=stream, flush=True)

    graph = build_graph(config, components, work_dir_of(config, writer))
    watch = ModelWatch.of(graph, config.resources)
    printer = ProgressPrinter(
        len(todo), config.method.iterations, config.progress_every_s, stream, parallel=min(config.resources.tasks_in_flight, len(todo))
    )
    ending = ("FAILED", "")
    try:
        watch.wait_ready(stream)
        _drive(graph, todo, config, writer, tracker, printer, summary, watch)
        ending = ("FINISHED", "")
    except RunStopped as stop:
        stop.summary, ending = summary, ("FAILED", stop.reason)
        raise
    except KeyboardInterrupt:
        ending = ("KILLED", "interrupted (Ctrl-C)")
        raise
    except BaseException as error:
        ending = ("FAILED", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        raise
    finally:
        _finish(graph, config, writer, tracker, printer, summary, began, ending, stream)
    return summary


def _finish(
    graph: Graph, config: PipelineConfig, writer: DatasetWriter, tracker: Any, printer: ProgressPrinter,
    summary: RunSummary, began: float, ending: tuple[str, str], stream: TextIO,
) -> None:
    """Everything a run does at its end, however it ends; a step that fails is reported, never raised."""

    def progress() -> None:
        snapshot = ray.get(graph.progress.snapshot.remote(), timeout=30)
        summary.iterations, summary.attempts = snapshot["iterations"], snapshot["attempts"]
        printer.in_flight = 0
        printer.update(snapshot, force=True)

    def actor_stats() -> None:
        summary.actor_stats = graph.actor_stats()

    def tracking() -> None:
        status, reason = ending
        tracker.finish(summary.totals(), status, reason or None)

    finish_quietly(
        [
            ("reading the progress", progress),
            ("reading the actors' statistics", actor_stats),
            ("stopping the model actors", graph.shutdown),
            ("compacting the manifest", writer.compact_manifest),
            ("gallery", lambda: _write_gallery(config, tracker, stream)),
            *([("closing the MLflow run", tracking)] if tracker is not None else []),
        ],
        stream,
    )
    summary.seconds = time.monotonic() - began


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
    if not config.gallery or not DatasetWriter(config.output).manifest_parts():
        return  # nothing finished yet: no gallery to show
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
    watch: ModelWatch,
) -> None:
    """Keep ``tasks_in_flight`` assets running; record each result as it arrives. On a fault of
    the run, start nothing more, let the assets in flight end, and raise :class:`RunStopped`."""
    pending: dict[ray.ObjectRef, Job] = {}
    rows: list[dict[str, Any]] = []
    last_flush = time.monotonic()
    queue = list(todo)
    stop: str | None = None
    while queue or pending:
        while stop is None and queue and len(pending) < config.resources.tasks_in_flight:
            job = queue.pop(0)
            if tracker is not None:
                job = dataclasses.replace(job, mlflow_run_id=tracker.start_asset(job))
            pending[graph.submit(job)] = job
        if not pending:
            break
        printer.in_flight = len(pending)
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(config.progress_every_s, 1.0))
        if tracker is not None:
            tracker.log_stream(ray.get(graph.progress.drain.remote()))
        for ref in ready:
            job = pending.pop(ref)
            outcome = _collect(ref, job, config)
            if isinstance(outcome, _RunFault):  # no row: the asset is unfinished, not failed
                stop = stop or (watch.find_dead() if outcome.model_gone else None) or outcome.reason
                continue
            row, _ = outcome
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
        if stop is None:
            stop = watch.dead()
        if rows and (len(rows) >= MANIFEST_FLUSH_ROWS or time.monotonic() - last_flush >= MANIFEST_FLUSH_S or not (queue or pending)):
            writer.write_manifest(rows)
            rows, last_flush = [], time.monotonic()
        printer.in_flight = len(pending)
        printer.update(ray.get(graph.progress.snapshot.remote()))
    if rows:
        writer.write_manifest(rows)
    if stop is not None:
        raise RunStopped(stop)


@dataclass
class _RunFault:
    """A task ended on a fault of the run rather than of its asset."""

    reason: str
    model_gone: bool = False


def _collect(ref: ray.ObjectRef, job: Job, config: PipelineConfig) -> tuple[dict[str, Any], list[dict[str, float]]] | _RunFault:
    """The task's result; a failed row when Ray could not run it (retries exhausted, ...); a
    :class:`_RunFault` when a model actor is gone (the reference sample or a guidance call
    failed on it) or the task met a fault of the run (disk full)."""
    try:
        result = ray.get(ref)
        return result["row"], result["history"]
    except (ModelGoneError, ray.exceptions.RayActorError) as error:
        return _RunFault(_cause_text(error), model_gone=True)
    except RunFaultError as error:
        return _RunFault(_cause_text(error))
    except (ray.exceptions.RayError, Exception) as error:  # noqa: BLE001 - recorded per asset
        message = f"{type(error).__name__}: {str(error)[:2000]}"
        now = utc_now()
        return ManifestRow.for_job(job, config.method, status="failed", error=message, started_at=now, finished_at=now).to_dict(), []


def _cause_text(error: BaseException) -> str:
    """The message of the exception a task raised (Ray wraps it with the remote traceback)."""
    cause = getattr(error, "cause", None)
    return str(cause if isinstance(cause, BaseException) else error).strip().splitlines()[0]


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
    parser.add_argument("--dry-run", action="store_true", help="validate the config and print what would run and its GPU memory plan; start nothing")
    parser.add_argument(
        "--verify", action="store_true",
        help="check every committed asset's files against the checksums in its asset.json; damaged assets are set aside and redone",
    )
    return parser.parse_intermixed_args(argv)


def summary_line(summary: RunSummary, config: PipelineConfig, verb: str = "finished") -> str:
    return (
        f"[pipeline] {verb}: {summary.succeeded} succeeded, {summary.failed} failed, "
        f"{summary.skipped_done} skipped (done), {summary.skipped_failed} skipped (failed) "
        f"in {summary.seconds:.1f}s; dataset at {config.output}"
    )


def dry_run(config: PipelineConfig, stream: TextIO, verify: bool = False) -> int:
    """``--dry-run``: the plan and the GPU memory plan, then the model checks that
    :func:`load_config` left for now, so a missing model is named beside the plan (which needs
    no weights) and a plan that cannot fit; 2 when any check failed, else 0."""
    describe_plan(config, stream, verify=verify)
    errors = []
    for check in (lambda: describe_memory_plan(config, stream), lambda: validate_config(config)):
        try:
            check()
        except ConfigError as error:
            errors.append(str(error))
    for error in errors:
        print(f"error: {error}", file=stream, flush=True)
    return 2 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    """0: done; 1: stopped by a fault of the run (model gone, disk full); 2: bad input."""
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides, check_models=not args.dry_run)
        if args.retry_failed:
            config.retry_failed = True
        if args.dry_run:
            return dry_run(config, sys.stderr, verify=args.verify)
        summary = run_dataset(config, verify=args.verify)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunStopped as stop:
        if stop.summary is not None:
            print(summary_line(stop.summary, config, "stopped"), file=sys.stderr, flush=True)
        print(f"error: {stop.reason}", file=sys.stderr, flush=True)
        return 1
    except OSError as error:
        cause = disk_full_cause(error)
        if cause is None:
            raise
        print(f"error: {disk_full_message(cause)}", file=sys.stderr, flush=True)
        return 1
    print(summary_line(summary, config), *browse_lines(config, summary.experiment_id), sep="\n", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
