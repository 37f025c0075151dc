"""Re-export committed assets from their checkpoints, without optimising again.

    python -m pipeline.export OUTPUT [key=value ...]

Export settings (``method.export.*``: mesh threshold and resolution, face count, turntable
frames, video format, ...) are not part of an asset's identity (:mod:`stages.optimize.identity`),
so changing them needs no retraining: this rebuilds each committed asset's scene from its
``checkpoint.pt`` and ``method.yaml`` and runs the exporter again with the new settings, like
threestudio's ``--export`` and nerfstudio's ``ns-export``.

It runs on Ray like ``pipeline.run`` (one task per asset, ``resources.tasks_in_flight`` at a
time, named ``export[<asset_id>]``), replaces the asset's files one by one (each an atomic
rename) with ``asset.json`` last, and appends the asset's updated manifest row (same
``asset_id``; the newer row supersedes). It is resumable: ``asset.json`` records the digest of
the export settings, and an asset already exported with the requested ones is skipped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence, TextIO

from pipeline.config import ConfigError, PipelineConfig
from stages.asset_layout import ASSETS_DIR, CHECKPOINT_FILE, METHOD_FILE, asset_path
from stages.digest import digest

EXPORT_PREFIXES = ("method.export.", "export.")
RUN_KEYS = ("resources.", "ray_address", "local_ray.", "gallery", "job_output_root", "progress_every_s", "method.device")
"""Overrides that say how to run the export (not what it writes)."""
KEPT_FILES = ("reference", "metrics")
"""Files of an asset the exporter does not write (kept as they are)."""

EXAMPLES = """examples:
  python -m pipeline.export outputs/quickstart method.export.mesh_resolution=96
  python -m pipeline.export outputs/t3bench_single method.export.mesh_target_faces=20000 method.export.turntable_frames=120
  python -m pipeline.export outputs/quickstart method.export.mesh_threshold=2.5 --assets a_red_apple-v0-0123456789
  python -m pipeline.export s3://bucket/ds method.export.video_format=gif resources.tasks_in_flight=16 ray_address=auto

Only method.export.* keys change the files; resources.*, ray_address, local_ray.* and method.device
say how to run. Any other key changes the asset itself: run pipeline.run with it instead.
"""


@dataclass
class ExportPlan:
    output: str
    export_overrides: list[str]
    run: PipelineConfig
    digest: str
    asset_ids: list[str] = field(default_factory=list)


def export_digest(export: Any) -> str:
    """12 hex digits over an ``ExportConfig`` (what an asset's files were exported with)."""
    return digest(asdict(export), 12, compact=False)


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(export dotlist relative to ``method.export``, run dotlist); refuses keys that would
    change an asset, naming them."""
    export, run = [], []
    for token in overrides:
        if "=" not in token:
            raise ConfigError(f"override {token!r} is not key=value")
        key = token.split("=", 1)[0]
        prefix = next((p for p in EXPORT_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            export.append(token[len(prefix):])
        elif key.startswith(RUN_KEYS):
            run.append(token)
        else:
            raise ConfigError(
                f"config key '{key}' changes the assets themselves, not their export; pipeline.export only takes "
                f"method.export.* (and how to run: {', '.join(RUN_KEYS)}). Run pipeline.run with it to make new assets."
            )
    return export, run


def apply_export(method: Any, export_overrides: Sequence[str]) -> Any:
    """``method`` with ``export_overrides`` merged into its ``export`` section, validated."""
    from stages.config_loading import load_structured

    method.export = load_structured(method.export, overrides=export_overrides, what="export", key_prefix="method.export.")
    try:
        method.validate()
    except ValueError as error:
        raise ConfigError(f"config key {error}") from None
    return method


def plan_export(output: str, overrides: Sequence[str], asset_ids: Sequence[str] = ()) -> ExportPlan:
    """Check the overrides and the dataset before any work."""
    from omegaconf import OmegaConf

    from pipeline.config import build_config, validate_config
    from pipeline.job_output import resolve_job_output
    from pipeline.writer import DatasetWriter
    from stages.optimize.config import OptimizeConfig

    export_overrides, run_overrides = split_overrides(overrides)
    run: PipelineConfig = OmegaConf.to_object(build_config({"prompts": {"inline": ["-"]}}, [f"output={output}", *run_overrides]))
    resolve_job_output(run)
    validate_config(run, actors=())  # export loads no model
    digest = export_digest(apply_export(OptimizeConfig(), export_overrides).export) if export_overrides else ""
    writer = DatasetWriter(run.output)
    committed = sorted(writer.committed_ids())
    missing = sorted(set(asset_ids) - set(committed))
    if missing:
        raise ConfigError(f"--assets: {missing[:5]} are not committed assets of {run.output}")
    if not committed:
        raise ConfigError(f"{run.output} has no committed assets (assets/<id>/asset.json) to export")
    return ExportPlan(run.output, export_overrides, run, digest, list(asset_ids) or committed)


# ------------------------------------------------------------------ one asset (a Ray task)
def export_one(output: str, asset_id: str, export_overrides: list[str], device: str = "auto") -> dict[str, Any]:
    """Re-export one committed asset; returns ``{"row": ..., "skipped": bool}``."""
    import tempfile

    from pipeline.integrity import file_checksums
    from pipeline.manifest import utc_now
    from pipeline.writer import DatasetWriter
    from stages.evaluate.render import load_asset_scene
    from stages.export import export_asset
    from stages.models.device import resolve_device
    from stages.optimize.config import load_optimize_config

    writer = DatasetWriter(output)
    record = writer.read_record(asset_id)
    with tempfile.TemporaryDirectory() as tmp:
        for name in (METHOD_FILE, CHECKPOINT_FILE):
            with writer.fs.open_input_stream(writer.path(ASSETS_DIR, asset_id, name)) as src, open(Path(tmp) / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        method = apply_export(load_optimize_config(Path(tmp) / METHOD_FILE), export_overrides)
        digest = export_digest(method.export)
        if record.get("export_digest", export_digest(load_optimize_config(Path(tmp) / METHOD_FILE).export)) == digest:
            return {"row": record, "skipped": True}
        scene = load_asset_scene(Path(tmp), method, resolve_device(device))
        staged = writer.staging_dir(asset_id)
        try:
            files = dict(export_asset(scene, staged, method))
            old = record.get("files") or {}
            for kind in KEPT_FILES:
                if kind in old:
                    files.setdefault(kind, Path(old[kind]).name)
            fresh = file_checksums(staged)  # before the files move
            moved, removed = _replace_files(writer, asset_id, staged, files, old)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    record.update(
        files={role: asset_path(asset_id, name) for role, name in sorted(files.items())},
        finished_at=utc_now(),
        export_digest=digest,
    )
    if isinstance(record.get("checksums"), dict):  # what --verify checks follows the new files
        kept = {name: value for name, value in record["checksums"].items() if name not in removed}
        record["checksums"] = {**kept, **{name: fresh[name] for name in moved}}
    writer.rewrite_record(asset_id, record)
    return {"row": record, "skipped": False}


def _replace_files(
    writer: Any, asset_id: str, staged: Path, files: dict[str, str], old: dict[str, str]
) -> tuple[list[str], list[str]]:
    """Move the new files over the asset's (one atomic rename each); delete files of the old
    export that the new one does not write (e.g. the mesh when ``mesh=false``). Returns the
    names (moved, removed)."""
    target = writer.path(ASSETS_DIR, asset_id)
    # method.yaml (which names the export settings) last: if it is new, every other file is too
    moved, removed = [], []
    for name in sorted(set(files.values()), key=lambda n: (n == METHOD_FILE, n)):
        if not (staged / name).is_file():
            continue
        moved.append(name)
        if writer.is_local:
            os.replace(staged / name, Path(target) / name)
        else:
            with open(staged / name, "rb") as src, writer.fs.open_output_stream(f"{target}/{name}") as dst:
                shutil.copyfileobj(src, dst)
    keep = set(files.values())
    for path in old.values():
        name = Path(path).name
        if name not in keep:
            removed.append(name)
            try:
                writer.fs.delete_file(f"{target}/{name}")
            except (FileNotFoundError, OSError):
                pass
    return moved, removed


# ------------------------------------------------------------------ the driver
def run_export(plan: ExportPlan, stream: TextIO | None = None) -> dict[str, int]:
    """Export every asset of ``plan`` on Ray; returns counts (exported, skipped, failed)."""
    import ray

    from pipeline.progress import ProgressPrinter
    from pipeline.run import _write_gallery, connect_ray
    from pipeline.writer import DatasetWriter

    stream = stream or sys.stderr
    writer = DatasetWriter(plan.output)
    connect_ray(plan.run, stream)
    res = plan.run.resources
    task = ray.remote(export_one)
    options = {"num_cpus": res.task_num_cpus, "num_gpus": res.task_num_gpus, "max_retries": res.task_max_retries}
    device = plan.run.method.device
    print(f"[export] {len(plan.asset_ids)} committed assets of {plan.output}, {res.tasks_in_flight} at a time"
          f"{'; settings: ' + ' '.join(plan.export_overrides) if plan.export_overrides else ''}", file=stream, flush=True)
    printer = ProgressPrinter(len(plan.asset_ids), 1, plan.run.progress_every_s, stream, parallel=res.tasks_in_flight)
    counts = {"exported": 0, "skipped": 0, "failed": 0}
    queue, pending, rows = list(plan.asset_ids), {}, []
    latest = writer.latest_rows()
    while queue or pending:
        while queue and len(pending) < res.tasks_in_flight:
            asset_id = queue.pop(0)
            ref = task.options(**options, name=f"export[{asset_id}]").remote(plan.output, asset_id, plan.export_overrides, device)
            pending[ref] = asset_id
        printer.in_flight = len(pending)
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        for ref in ready:
            asset_id = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as error:  # noqa: BLE001 - reported per asset; its old files are untouched or complete
                counts["failed"] += 1
                printer.failed += 1
                printer.note(f"[export] FAILED {asset_id}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
                continue
            counts["skipped" if result["skipped"] else "exported"] += 1
            printer.done += 1
            row = latest.get(asset_id)
            if not result["skipped"] or row is None or row.get("finished_at") != result["row"].get("finished_at"):
                rows.append(result["row"])  # a new export, or one whose row a stopped run never wrote
        if len(rows) >= 16 or (rows and not (queue or pending)):
            writer.write_manifest(rows)
            rows = []
        done = printer.done + printer.failed
        printer.update({"iterations": done, "running": {}})
    if rows:
        writer.write_manifest(rows)
    printer.close()
    _write_gallery(plan.run, None, stream)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.export", description=__doc__.splitlines()[0], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output", help="the dataset (a pipeline.run output: local path or URI)")
    parser.add_argument("overrides", nargs="*", help="method.export.<key>=<value> (and resources.*, ray_address, ...)")
    parser.add_argument("--assets", nargs="+", default=(), metavar="ASSET_ID", help="only these assets (default: every committed one)")
    args = parser.parse_intermixed_args(argv)
    began = time.monotonic()
    try:
        plan = plan_export(args.output, args.overrides, args.assets)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = run_export(plan)
    print(
        f"[export] finished in {time.monotonic() - began:.1f}s: {counts['exported']} exported, "
        f"{counts['skipped']} already had these settings, {counts['failed']} failed; dataset at {plan.output}",
        file=sys.stderr, flush=True,
    )
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
