"""MLflow tracking: one parent run per dataset run, one nested child run per asset.

Only the driver talks to MLflow (explicit run ids through ``MlflowClient``, no active-run
globals), so a sqlite store is never written by many processes at once and a remote tracking
server needs no credentials on workers. Child runs carry the asset's params (prompt, seeds,
loss, which ``isd.sd_branch``), per-iteration loss curves, timings and its files.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

from pipeline.config import PipelineConfig, TrackingConfig, to_container, to_yaml

PREVIEW_FILES = ("reference.png", "preview.png", "turntable.mp4", "turntable.gif", "metrics.json", "asset.json")
MODEL_FILES = ("mesh.glb", "mesh.obj", "mesh.mtl", "splats.ply", "checkpoint.pt")
MAX_POINTS_PER_CURVE = 500


def default_tracking_uri(output: str) -> str:
    """``sqlite:///<output>/mlflow.db`` for local outputs, else ``./mlruns`` beside the driver."""
    if "://" in output and not output.startswith("file://"):
        return str(Path("mlruns").resolve().as_uri())
    root = Path(output.removeprefix("file://")).expanduser().resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def code_version() -> str:
    """The git commit of the checkout (with ``-dirty`` when modified), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"modedreamer-ray=={version('modedreamer-ray')}"
        except PackageNotFoundError:
            return "unknown"


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists → ``{"a.b": "value"}`` strings (MLflow params)."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(tree) if isinstance(tree, list) else str(tree)}


class Tracker:
    """Parent run on construction; :meth:`log_asset` adds a child run; :meth:`finish` closes."""

    def __init__(self, config: PipelineConfig, total_jobs: int) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        tracking: TrackingConfig = config.tracking
        self.tracking_uri = tracking.tracking_uri or default_tracking_uri(config.output)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.log_models = tracking.log_models
        self.method = config.method
        experiment = self.client.get_experiment_by_name(tracking.experiment)
        if experiment is None:
            artifacts = None
            if self.tracking_uri.startswith("sqlite:///"):  # keep artifacts beside the database
                artifacts = (Path(self.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(tracking.experiment, artifact_location=artifacts)
        else:
            self.experiment_id = experiment.experiment_id
        self.version = code_version()
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"dataset-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={"mlflow.source.git.commit": self.version, "code_version": self.version, "output": config.output},
        )
        self.parent_id = run.info.run_id
        params = flatten({"method": to_container(config.method), "models": to_container(config.models), "resources": to_container(config.resources)})
        params.update(variants=str(config.variants), seed=str(config.seed), output=config.output, jobs=str(total_jobs))
        self._log_params(self.parent_id, [Param(k, v[:6000]) for k, v in params.items()])
        self.client.log_text(self.parent_id, to_yaml(config), "config.yaml")
        self._started = time.monotonic()

    def _log_params(self, run_id: str, params: list[Any]) -> None:
        for start in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[start : start + 100])

    def _log_metrics(self, run_id: str, metrics: Iterable[Any]) -> None:
        batch = list(metrics)
        for start in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[start : start + 1000])

    def log_asset(self, row: dict[str, Any], history: list[dict[str, float]], asset_dir: Path | None) -> str:
        """A child run for one finished asset; returns its run id."""
        from mlflow.entities import Metric, Param

        run = self.client.create_run(
            self.experiment_id,
            run_name=row["asset_id"],
            tags={"mlflow.parentRunId": self.parent_id, "asset_id": row["asset_id"], "status": row["status"]},
        )
        run_id = run.info.run_id
        params = {
            name: row[name]
            for name in ("asset_id", "prompt", "prompt_index", "variant", "reference_seed", "seed", "method", "representation", "config_digest")
        }
        params.update(sd_branch=self.method.isd.sd_branch, iterations=self.method.iterations)
        self._log_params(run_id, [Param(k, str(v)[:6000]) for k, v in params.items()])
        now = int(time.time() * 1000)
        stride = max(1, math.ceil(len(history) / MAX_POINTS_PER_CURVE))
        curves = [
            Metric(key, float(value), now, step)
            for step, scalars in enumerate(history)
            if step % stride == 0 or step == len(history) - 1
            for key, value in scalars.items()
            if isinstance(value, (int, float)) and math.isfinite(float(value))
        ]
        final = json.loads(row["metrics"] or "{}")
        finals = [Metric(f"final/{k}", float(v), now, 0) for k, v in final.items() if isinstance(v, (int, float)) and math.isfinite(float(v))]
        if row.get("duration_s") is not None:
            finals.append(Metric("duration_s", float(row["duration_s"]), now, 0))
        self._log_metrics(run_id, [*curves, *finals])
        if row["error"]:
            self.client.log_text(run_id, row["error"], "error.txt")
        if asset_dir is not None and asset_dir.is_dir():
            names = PREVIEW_FILES + (MODEL_FILES if self.log_models else ())
            for name in names:
                if (asset_dir / name).is_file():
                    self.client.log_artifact(run_id, str(asset_dir / name))
        self.client.set_terminated(run_id, "FINISHED" if row["status"] == "succeeded" else "FAILED")
        return run_id

    def finish(self, totals: dict[str, float], status: str = "FINISHED") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log_metrics(self.parent_id, [Metric(k, float(v), now, 0) for k, v in totals.items()])
        self.client.set_terminated(self.parent_id, status)
