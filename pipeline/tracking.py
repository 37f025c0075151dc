"""MLflow tracking: a parent run per dataset run, one child run per asset for the asset's whole life.

Only the driver talks to MLflow (explicit run ids through ``MlflowClient``, no active-run
globals), so a sqlite store is never written by many processes at once and a remote tracking
server needs no credentials on workers.

An asset's child run

- starts when the driver submits the asset; its id is kept in the asset's work dir
  (``tracking.json``) and travels with the job into ``asset.json`` and the manifest row;
- receives metric points while the asset trains: the task batches them (one Ray call a second,
  at most :data:`MAX_POINTS_PER_CURVE` per curve) into the progress actor, and the driver drains
  them into ``log_batch``; preview renders become MLflow images (key ``preview``, by step);
- ends with the final metrics, the error text of a failed asset, a thumbnail, FINISHED/FAILED.

A rerun re-attaches a resumed asset's run (same id, moved under the new dataset run), closes a
predecessor's parent left RUNNING by a killed driver (KILLED, with its RUNNING children), and
gives every committed asset exactly one child run, re-created from ``asset.json`` when missing.

The dataset's ``assets/`` is the one copy of the asset files; MLflow holds the tracking record
(params, curves, preview images, errors, a thumbnail, ``config.yaml``, the gallery index). With
the default store (``sqlite:///<output>/mlflow.db``) artifacts are addressed as
``mlflow-artifacts:/...`` and kept in ``<output>/mlartifacts`` (what ``mlflow ui`` serves when
started in the dataset directory), so nothing in the store names an absolute path and the dataset
directory can move.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from pipeline.config import PipelineConfig, to_container, to_yaml
from pipeline.manifest import parse_map
from stages.asset_layout import PREVIEW_FILE, WORK_TRACKING, asset_dir
from stages.atomic import atomic_write

if TYPE_CHECKING:
    from pipeline.jobs import Job
    from pipeline.writer import DatasetWriter

STATE_FILE = WORK_TRACKING
"""In the run's work dir: the dataset run's parent run; in an asset's work dir: its child run."""
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
"""Beside the default store's database; ``mlflow ui``'s default ``--artifacts-destination``."""
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
"""The experiment kind MLflow 3's UI opens in its model-training view (not the GenAI one)."""
MAX_POINTS_PER_CURVE = 500
PREVIEW_KEY = "preview"
THUMBNAIL_ARTIFACT = "thumbnail.jpg"
METRIC_BATCH = 1000
PARAM_BATCH = 100
CHILD_PARAMS = ("asset_id", "prompt", "prompt_index", "variant", "reference_seed", "seed", "method", "representation", "config_digest")


# ------------------------------------------------------------------ where the store is
def default_tracking_uri(output: str) -> str:
    """``sqlite:///<output>/mlflow.db`` for local outputs, else ``./mlruns`` beside the driver."""
    if "://" in output and not output.startswith("file://"):
        return str(Path("mlruns").resolve().as_uri())
    root = Path(output.removeprefix("file://")).expanduser().resolve()
    return f"sqlite:///{root / DB_NAME}"


def tracking_uri_of(config: PipelineConfig) -> str:
    """``tracking.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the dataset's own store."""
    return config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(config.output)


def local_store_dir(tracking_uri: str) -> Path | None:
    """The directory of a local sqlite store's database, else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///")).expanduser().resolve().parent


def browse_command(tracking_uri: str) -> str:
    """The exact command that shows this store in a browser."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    store = local_store_dir(tracking_uri)
    if store is not None:
        database = Path(tracking_uri.removeprefix("sqlite:///")).name
        return f"cd {store} && mlflow ui --backend-store-uri sqlite:///{database}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def _mlflow_artifacts_repository(artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None) -> Any:
    """``mlflow-artifacts:/x`` of a local sqlite store → ``<store dir>/mlartifacts/x`` (what the
    server of ``mlflow ui`` started there would serve); any other store: MLflow's own proxy."""
    from urllib.parse import urlparse

    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    store = local_store_dir(tracking_uri or "")
    if store is None:
        return MlflowArtifactsRepository(artifact_uri, tracking_uri=tracking_uri, registry_uri=registry_uri)
    relative = urlparse(artifact_uri).path.lstrip("/")
    return LocalArtifactRepository(str(store / ARTIFACTS_DIR / relative), tracking_uri=tracking_uri, registry_uri=registry_uri)


def open_client(tracking_uri: str) -> Any:
    """An ``MlflowClient`` for ``tracking_uri`` that can read and write the default store's
    relative (``mlflow-artifacts:``) artifacts without a server."""
    from mlflow.store.artifact.artifact_repository_registry import _artifact_repository_registry
    from mlflow.tracking import MlflowClient

    # MLflow's plugin hook (what the `mlflow.artifact_repository` entry points call).
    _artifact_repository_registry.register("mlflow-artifacts", _mlflow_artifacts_repository)
    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id_for(client: Any, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created when missing: marked as model training, and with
    relative artifacts in the default store."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return experiment.experiment_id
    location = None
    if local_store_dir(tracking_uri) is not None:
        location = "mlflow-artifacts:/" + (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment")
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})


# ------------------------------------------------------------------ what is logged
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def git_commit(root: Path = PROJECT_ROOT) -> tuple[str | None, bool]:
    """(commit sha, has uncommitted changes) of the project's own git checkout; (None, False)
    outside one (an installed package, a Ray job's working-dir copy without ``.git``)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return None, False  # some other repository encloses the package
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, False
    return (sha, dirty) if re.fullmatch(r"[0-9a-f]{40}", sha) else (None, False)


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists → ``{"a.b": "value"}`` strings (MLflow params)."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(tree) if isinstance(tree, list) else str(tree)}


def run_params(config: PipelineConfig, total_jobs: int) -> dict[str, str]:
    """The parent run's params: the method (with only the chosen representation's section),
    models, resources and the run's size."""
    method = to_container(config.method)
    for representation in ("nerf", "splats"):
        if representation != config.method.representation:
            method.pop(representation, None)
    params = flatten({"method": method, "models": to_container(config.models), "resources": to_container(config.resources)})
    params.update(variants=str(config.variants), seed=str(config.seed), output=config.output, jobs=str(total_jobs))
    return params


def metric_stride(iterations: int) -> int:
    """Log every ``stride``-th iteration so a curve has at most :data:`MAX_POINTS_PER_CURVE` points."""
    return max(1, math.ceil(iterations / MAX_POINTS_PER_CURVE))


def curve_point(step: int, iterations: int, metrics: dict[str, Any]) -> tuple[int, int, dict[str, float]] | None:
    """(step, timestamp ms, finite scalars) of one iteration, or None for a step not logged."""
    if step % metric_stride(iterations) and step != iterations - 1:
        return None
    values = {k: float(v) for k, v in metrics.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
    return step, int(time.time() * 1000), values


def _finite(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2))


class Tracker:
    """The tracking of one dataset run. The parent run is created on first use (a rerun with
    nothing to do and nothing to repair leaves no run behind)."""

    def __init__(self, config: PipelineConfig, work_dir: str | Path, total_jobs: int) -> None:
        from mlflow.entities import RunStatus  # noqa: F401 - fail early when MLflow is missing

        self.config = config
        self.method = config.method
        self.total_jobs = total_jobs
        self.work_dir = Path(work_dir)
        self.tracking_uri = tracking_uri_of(config)
        self.client = open_client(self.tracking_uri)
        self.experiment_id = experiment_id_for(self.client, config.tracking.experiment, self.tracking_uri)
        self._parent: str | None = None
        self.runs: dict[str, str] = {}
        """asset_id → child run id, for the assets this run started or repaired."""
        self.open: set[str] = set()
        """Assets whose child run this tracker started and has not closed yet."""
        self.stale_parent = self._close_stale_parent()

    # ---------------------------------------------------------------- parent run
    @property
    def parent_id(self) -> str:
        if self._parent is None:
            from mlflow.entities import Param

            sha, dirty = git_commit()
            tags = {"output": self.config.output, "code_dirty": str(dirty).lower()}
            if sha is not None:
                tags["mlflow.source.git.commit"] = sha
            if self.stale_parent:
                tags["resumes_run"] = self.stale_parent
            run = self.client.create_run(self.experiment_id, run_name=f"dataset-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
            self._parent = run.info.run_id
            _write_json(self.work_dir / STATE_FILE, {"parent_run_id": self._parent, "tracking_uri": self.tracking_uri})
            params = run_params(self.config, self.total_jobs)
            self._log_params(self._parent, [Param(k, v[:6000]) for k, v in params.items()])
            self.client.log_text(self._parent, to_yaml(self.config), "config.yaml")
        return self._parent

    @property
    def started(self) -> bool:
        return self._parent is not None

    def _close_stale_parent(self) -> str | None:
        """KILLED for the parent (and its RUNNING children) of a predecessor whose driver died."""
        from mlflow.exceptions import MlflowException

        state = _read_json(self.work_dir / STATE_FILE)
        if not state or state.get("tracking_uri") != self.tracking_uri:
            return None
        stale = state.get("parent_run_id")
        try:
            run = self.client.get_run(stale)
        except MlflowException:
            return None
        if run.info.status != "RUNNING":
            return None
        note = "its driver stopped without closing it (killed); closed by the next run of this dataset"
        for child in self._search(f"tags.mlflow.parentRunId = '{stale}' and attributes.status = 'RUNNING'"):
            self.client.set_terminated(child.info.run_id, "KILLED")
        self.client.set_tag(stale, "end_reason", note)
        self.client.set_terminated(stale, "KILLED")
        return stale

    def finish(self, totals: dict[str, float], status: str = "FINISHED", reason: str | None = None) -> None:
        """Close the parent run (if one was started) with the run's totals, and the child runs of
        assets still in flight (the driver stopped before they ended: KILLED; a rerun re-attaches)."""
        if self._parent is None:
            return
        from mlflow.entities import Metric

        for asset_id in sorted(self.open):
            self.client.set_terminated(self.runs[asset_id], "KILLED")
        self.open.clear()
        now = int(time.time() * 1000)
        self._log_metrics(self._parent, [Metric(k, float(v), now, 0) for k, v in _finite(totals).items()])
        if reason:
            self.client.set_tag(self._parent, "end_reason", reason[:5000])
        self.client.set_terminated(self._parent, status)
        (self.work_dir / STATE_FILE).unlink(missing_ok=True)

    # ---------------------------------------------------------------- child runs
    def start_asset(self, job: "Job") -> str:
        """The asset's child run, RUNNING under this run's parent: re-attached when an earlier
        run started it (its id is in the asset's work dir), else created now."""
        from mlflow.exceptions import MlflowException

        state_path = self.work_dir / job.asset_id / STATE_FILE
        state = _read_json(state_path)
        if state and state.get("tracking_uri") == self.tracking_uri:
            try:
                run = self.client.get_run(state["mlflow_run_id"])
            except (MlflowException, KeyError):
                run = None
            if run is not None:
                run_id = run.info.run_id
                self.client.set_tag(run_id, "mlflow.parentRunId", self.parent_id)
                self.client.set_tag(run_id, "status", "running")
                self.client.update_run(run_id, status="RUNNING")
                self.runs[job.asset_id] = run_id
                self.open.add(job.asset_id)
                return run_id
        run_id = self._create_child(job.asset_id, "running", self._job_params(job))
        self.open.add(job.asset_id)
        _write_json(state_path, {"mlflow_run_id": run_id, "tracking_uri": self.tracking_uri})
        return run_id

    def _job_params(self, job: "Job | dict[str, Any]") -> dict[str, Any]:
        """A child run's params from its job (or its manifest row / ``asset.json``)."""
        fields = job if isinstance(job, dict) else dataclasses.asdict(job)
        params = {name: fields.get(name) for name in CHILD_PARAMS}
        params.update(
            method=self.method.loss, representation=self.method.representation,
            sd_branch=self.method.isd.sd_branch, iterations=self.method.iterations,
        )
        return params

    def _create_child(self, asset_id: str, status: str, params: dict[str, Any]) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(
            self.experiment_id,
            run_name=asset_id,
            tags={"mlflow.parentRunId": self.parent_id, "asset_id": asset_id, "status": status, "asset_dir": f"assets/{asset_id}"},
        )
        run_id = run.info.run_id
        self._log_params(run_id, [Param(k, str(v)[:6000]) for k, v in params.items()])
        self.runs[asset_id] = run_id
        return run_id

    def log_stream(self, drained: dict[str, Any]) -> None:
        """Log what the progress actor collected: metric points and preview images per asset."""
        from mlflow.entities import Metric

        for asset_id, points in drained.get("points", {}).items():
            run_id = self.runs.get(asset_id)
            if run_id is None:
                continue
            self._log_metrics(run_id, [Metric(k, v, stamp, step) for step, stamp, values in points for k, v in values.items()])
        for asset_id, previews in drained.get("previews", {}).items():
            run_id = self.runs.get(asset_id)
            if run_id is None:
                continue
            for step, stamp, png in previews:
                self.log_preview(run_id, step, stamp, png)

    def log_preview(self, run_id: str, step: int, stamp: int, png: bytes) -> None:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(png)) as image:
            self.client.log_image(run_id, image.convert("RGB"), key=PREVIEW_KEY, step=int(step), timestamp=int(stamp))

    def finish_asset(self, row: dict[str, Any], writer: "DatasetWriter | None" = None) -> str:
        """Close the asset's child run with its final metrics (and error, thumbnail); returns its id."""
        from mlflow.entities import Metric

        started = self.runs.get(row["asset_id"])
        run_id = row.get("mlflow_run_id") or started
        if run_id is None:  # tracked without start_asset (a row from elsewhere): make its run now
            run_id = self._create_child(row["asset_id"], row["status"], self._job_params(row))
        elif started is not None and started != run_id:
            # a task of a killed driver committed the asset (with its own run) after this run
            # had started a new one for it: one asset, one run
            self.client.delete_run(started)
            self.runs[row["asset_id"]] = run_id
        now = int(time.time() * 1000)
        finals = [Metric(f"final/{k}", v, now, 0) for k, v in _finite(parse_map(row.get("metrics"), "metrics")).items()]
        if row.get("duration_s") is not None:
            finals.append(Metric("duration_s", float(row["duration_s"]), now, 0))
        self._log_metrics(run_id, finals)
        if row.get("error"):
            self.client.log_text(run_id, row["error"], "error.txt")
        if row["status"] == "succeeded" and writer is not None:
            self._log_thumbnail(run_id, writer, row)
        self.client.set_tag(run_id, "status", row["status"])
        self.client.set_terminated(run_id, "FINISHED" if row["status"] == "succeeded" else "FAILED")
        self.open.discard(row["asset_id"])
        return run_id

    def _log_thumbnail(self, run_id: str, writer: "DatasetWriter", row: dict[str, Any]) -> None:
        from pipeline.thumbnails import thumbnail_jpeg

        path = writer.path(*(row.get("asset_dir") or asset_dir(row["asset_id"])).split("/"), PREVIEW_FILE)
        try:
            with writer.fs.open_input_stream(path) as stream:
                data = thumbnail_jpeg(stream.read())
        except (OSError, ValueError):
            return  # no preview (a custom exporter): the run simply has no thumbnail
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / THUMBNAIL_ARTIFACT).write_bytes(data)
            self.client.log_artifact(run_id, str(Path(tmp) / THUMBNAIL_ARTIFACT))

    # ---------------------------------------------------------------- repair
    def repair(self, writer: "DatasetWriter") -> list[dict[str, Any]]:
        """Give every committed asset exactly one FINISHED child run: finish runs a killed driver
        left open, re-create missing ones from the asset's record. Returns the manifest rows
        whose ``mlflow_run_id`` changed (the caller writes them; ``asset.json`` is updated here)."""
        from pipeline.manifest import utc_now

        latest = writer.latest_rows()
        status = {run.info.run_id: run.info.status for run in self._search(None)}
        changed = []
        for asset_id in sorted(writer.committed_ids()):
            row = latest.get(asset_id)
            record = row if row is not None and row["status"] == "succeeded" else writer.read_record(asset_id)
            run_id = record.get("mlflow_run_id")
            state = status.get(run_id) if run_id else None
            if state == "FINISHED":
                continue
            if state is None:  # never made, or lost with another store: make it again
                record = {**record, "mlflow_run_id": self._create_child(asset_id, "succeeded", self._job_params(record))}
                self.client.set_tag(record["mlflow_run_id"], "recovered_from", "asset.json")
                record["finished_at"] = utc_now()
                writer.rewrite_record(asset_id, record)
                changed.append(record)
            self.finish_asset(record, writer)
        return changed

    def _search(self, filter_string: str | None) -> Iterable[Any]:
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string or "", max_results=1000, page_token=token)
            yield from page
            token = page.token
            if not token:
                return

    # ---------------------------------------------------------------- batching
    def _log_params(self, run_id: str, params: Sequence[Any]) -> None:
        for start in range(0, len(params), PARAM_BATCH):
            self.client.log_batch(run_id, params=list(params[start : start + PARAM_BATCH]))

    def _log_metrics(self, run_id: str, metrics: Iterable[Any]) -> None:
        batch = list(metrics)
        for start in range(0, len(batch), METRIC_BATCH):
            self.client.log_batch(run_id, metrics=batch[start : start + METRIC_BATCH])

