"""The optimiser task: one asset from reference image to committed dataset entry.

Runs as a Ray task (``graph.py``): optimise against the guidance actors (resuming from the
asset's checkpoint in the work dir), export into a staging dir, write ``metrics.json`` and
``asset.json`` (its manifest row), and commit atomically. Application errors (NaN loss, a
prompt the model rejects) come back as a ``failed`` row instead of an exception, so one bad
asset does not stop the dataset; a dead worker is Ray's business (``max_retries``), and the
retried task resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.clients import ActorGuidance, RenderShare
from pipeline.components import Components
from pipeline.faults import ModelGoneError, RunFaultError, disk_full_cause, disk_full_message
from pipeline.integrity import file_checksums
from pipeline.jobs import Job
from pipeline.manifest import ManifestRow, utc_now
from pipeline.tracking import curve_point
from pipeline.writer import DatasetWriter
from stages.asset_layout import ASSET_RECORD, METRICS_FILE, REFERENCE_FILE
from stages.atomic import atomic_write
from stages.guidance.set import GuidanceSet
from stages.optimize.config import OptimizeConfig
from stages.optimize.loop import NonFiniteLossError


@dataclass
class GuidanceHandles:
    """Actor handles (replicas) per model; an asset always talks to the same replica."""

    ip: list[Any] = field(default_factory=list)
    mvd: list[Any] = field(default_factory=list)
    wire_dtype: str | None = None
    """dtype renders travel in (``float16`` halves the object-store bytes; exact when the guidance
    models run in fp16); None: the render's own (float32)."""

    def pick(self, replicas: list[Any], asset_id: str, renders: RenderShare | None = None) -> ActorGuidance | None:
        if not replicas:
            return None
        # Sticky by asset: its registration lives on that replica.
        index = int.from_bytes(asset_id.encode()[-4:], "little") % len(replicas)
        return ActorGuidance(replicas[index], renders=renders)

    def guidance_set(self, asset_id: str) -> GuidanceSet:
        """The asset's two clients, sharing one :class:`RenderShare`: each iteration's render is
        put in the object store once for both guidance terms."""
        renders = RenderShare(getattr(torch, self.wire_dtype) if self.wire_dtype else None)
        return GuidanceSet(ip=self.pick(self.ip, asset_id, renders), mvd=self.pick(self.mvd, asset_id, renders))


@dataclass
class TaskSpec:
    """What every optimiser task of a run shares."""

    method: OptimizeConfig
    output: str
    work_dir: str
    components: Components
    progress: Any | None = None
    """``ProgressActor`` handle (or None)."""
    report_every_s: float = 1.0
    track: bool = False
    """Send curve points and preview images for MLflow along with the progress."""


def _stable_reference(work: Path, sampled: Any | None) -> Any | None:
    """The reference used by the first attempt (saved in the work dir), so a resumed asset
    keeps optimising towards the same image even if sampling is not bit-reproducible."""
    if sampled is None:
        return None
    from PIL import Image

    path = work / REFERENCE_FILE
    if path.is_file():
        with Image.open(path) as image:
            return image.convert("RGB")
    with atomic_write(path) as tmp:
        sampled.convert("RGB").save(tmp, format="PNG")
    return sampled.convert("RGB")


def _progress_callback(job: Job, spec: TaskSpec) -> Any:
    """The optimiser's per-iteration callback: batches the curve points and preview images to
    track and sends them with the iteration count to the progress actor at most once per
    ``report_every_s`` (one fire-and-forget call). (A non-finite loss already stopped the
    optimiser: :class:`~stages.optimize.loop.NonFiniteLossError`.)"""
    total = spec.method.iterations
    last = [0.0]
    points: list[Any] = []
    previews: list[Any] = []

    def callback(step: int, metrics: dict[str, float], views: Any) -> None:
        if spec.progress is None:
            return
        if spec.track:
            point = curve_point(step, total, metrics)
            if point is not None:
                points.append(point)
            if views is not None:
                previews.append((step, int(time.time() * 1000), preview_png(views)))
        now = time.monotonic()
        if now - last[0] >= spec.report_every_s or step + 1 == total or previews:
            last[0] = now
            spec.progress.report.remote(job.asset_id, step + 1, total, points[:], previews[:])
            points.clear()
            previews.clear()

    return callback


def preview_png(views: Any) -> bytes:
    """(V, 3, H, W) preview renders in [0, 1] → one PNG grid (4 views a row)."""
    import io

    from stages.export.preview import image_grid

    buffer = io.BytesIO()
    image_grid(views, columns=4).save(buffer, format="PNG")
    return buffer.getvalue()


def run_asset(job: Job, reference: Any | None, handles: GuidanceHandles, spec: TaskSpec) -> dict[str, Any]:
    """Optimise, export and commit one asset. Returns ``{"row": manifest row, "history": [...]}``."""
    writer = DatasetWriter(spec.output)
    if writer.is_committed(job.asset_id):  # a retry after the commit already happened
        return {"row": writer.read_record(job.asset_id), "history": [], "committed": False}
    if spec.progress is not None:
        spec.progress.started.remote(job.asset_id, os.getpid())
    started, tick = utc_now(), time.perf_counter()
    work = Path(spec.work_dir) / job.asset_id
    guidance = handles.guidance_set(job.asset_id)
    try:
        reference = _stable_reference(work, reference)
        try:
            result = spec.components.optimize(
                spec.method,
                guidance,
                reference,
                job.seed,
                work,
                job.prompt,
                job.asset_id,
                _progress_callback(job, spec),
            )
        finally:  # free the actors' embeddings (and their count of active callers)
            guidance.release(job.asset_id)
        bad = {k: v for k, v in result.metrics.items() if isinstance(v, float) and math.isnan(v)}
        if bad:
            raise NonFiniteLossError(f"non-finite final metrics {sorted(bad)}")
        staged = writer.staging_dir(job.asset_id)
        if spec.progress is not None:
            spec.progress.export_started.remote(job.asset_id)
        try:
            files = dict(spec.components.export(result.scene, staged, spec.method, reference=reference))
            if spec.progress is not None:
                spec.progress.export_finished.remote(job.asset_id)
            if reference is not None and not (staged / REFERENCE_FILE).exists():
                reference.save(staged / REFERENCE_FILE, format="PNG")
                files.setdefault("reference", REFERENCE_FILE)
            metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
            metrics["duration_s"] = time.perf_counter() - tick
            (staged / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))
            files.setdefault("metrics", METRICS_FILE)
            row = ManifestRow.for_job(
                job,
                spec.method,
                status="succeeded",
                files=files,
                metrics=metrics,
                iterations=int(result.iterations),
                duration_s=metrics["duration_s"],
                started_at=started,
                finished_at=utc_now(),
            ).to_dict()
            record = {**row, "checksums": file_checksums(staged)}  # what --verify checks
            (staged / ASSET_RECORD).write_text(json.dumps(record, indent=2))
            committed = writer.commit(job.asset_id, staged)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        if not committed:
            row = writer.read_record(job.asset_id)
        shutil.rmtree(work, ignore_errors=True)  # checkpoints are no longer needed
        return {"row": row, "history": result.history, "committed": committed}
    except ModelGoneError:
        raise  # the run's fault, not this asset's: no failed row; the driver stops the run
    except Exception as error:  # recorded, not raised: one bad asset must not stop the dataset
        cause = disk_full_cause(error, (spec.work_dir, writer.local_root() or spec.work_dir))
        if cause is not None:
            raise RunFaultError(disk_full_message(cause)) from None
        message = f"{type(error).__name__}: {error}{failure_hint(error)}"
        row = ManifestRow.for_job(
            job,
            spec.method,
            status="failed",
            error=f"{message}\n{traceback.format_exc(limit=8)}",
            duration_s=time.perf_counter() - tick,
            started_at=started,
            finished_at=utc_now(),
        ).to_dict()
        return {"row": row, "history": [], "committed": False}
    finally:
        if spec.progress is not None:
            spec.progress.finished.remote(job.asset_id)
        release_gpu_memory()


OOM_HINT = (
    "\nhint: the GPU ran out of memory. Per asset, lower method.nerf.renderer.chunk_samples (with "
    "method.backprop=auto|deferred it bounds the render's graph), method.schedule.batch_sizes or "
    "method.schedule.resolutions; per GPU, run fewer "
    "optimisers beside the guidance actors (resources.tasks_in_flight) or give the actors their own "
    "GPUs (resources.<ip|mvd|reference>.num_gpus). --retry-failed redoes this asset."
)


def failure_hint(error: BaseException) -> str:
    """What to change for a failure users can fix by config (out of GPU memory); else ''."""
    import torch

    return OOM_HINT if isinstance(error, torch.OutOfMemoryError) else ""


def release_gpu_memory() -> None:
    """Hand this worker's cached CUDA memory back: Ray reuses the worker process for later tasks,
    and blocks torch keeps cached here are unusable by the guidance actors on the same GPU."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_initialized():  # never initialise CUDA in a CPU-only worker
        torch.cuda.empty_cache()

