"""Evaluation in MLflow: find the dataset's runs through the manifest, recover the method config
a dataset run logged, and log the scores (per list on the parent run, per asset on its child run)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TextIO

from pipeline.evaluate.config import EvaluationRunConfig
from pipeline.evaluate.scores import TOY_COLUMNS

if TYPE_CHECKING:
    from pipeline.evaluate.run import EvaluationResult


def mlflow_client(output: str, config: EvaluationRunConfig, create: bool) -> Any | None:
    """The tracking client of ``config.tracking`` (default: the dataset's own store); None
    when ``create`` is False and the dataset has no store of its own."""
    from pipeline.tracking import default_tracking_uri, open_client

    uri = config.tracking.tracking_uri or default_tracking_uri(output)
    if not create and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    return open_client(uri)  # reads and writes the dataset store's relative (mlflow-artifacts:) artifacts


def parent_runs(client: Any, manifest: Sequence[dict[str, Any]]) -> dict[str, str]:
    """asset_id → the dataset-run (parent) id of the asset's child run, where recorded."""
    from mlflow.exceptions import MlflowException

    parents = {}
    for row in manifest:
        if not row.get("mlflow_run_id"):
            continue
        try:
            parent = client.get_run(row["mlflow_run_id"]).data.tags.get("mlflow.parentRunId")
        except MlflowException:
            continue
        if parent:
            parents[row["asset_id"]] = parent
    return parents


def method_from_run(client: Any, run_id: str) -> tuple[Any, str] | None:
    """(OptimizeConfig, config digest) from the ``config.yaml`` a dataset run logged; None
    when the run has no such artifact. Prompt files are not read (they may have moved)."""
    import tempfile

    from mlflow.exceptions import MlflowException

    from pipeline.config import build_config
    from pipeline.jobs import config_digest
    from stages.config_loading import read_yaml, to_object

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "config.yaml", tmp)
        except (MlflowException, OSError):
            return None
        source = f"MLflow run {run_id} config.yaml"
        pipeline_config = to_object(build_config(read_yaml(path), source=source), source)
    return pipeline_config.method, config_digest(pipeline_config)


def log_to_mlflow(
    output: str,
    config: EvaluationRunConfig,
    result: EvaluationResult,
    manifest: Sequence[dict[str, Any]],
    markdown: str,
    client: Any | None = None,
) -> str:
    """Metrics ``eval/<list>/<metric>`` on the dataset's parent run (found through the child
    runs named in the manifest), per-asset ``eval/*`` on each child run; else a new run."""
    import time

    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    client = client or mlflow_client(output, config, create=True)
    children: dict[str, str] = {r["asset_id"]: r["mlflow_run_id"] for r in manifest if r.get("mlflow_run_id")}
    parents = Counter(parent_runs(client, manifest).values())
    now = int(time.time() * 1000)
    if parents:
        run_id = parents.most_common(1)[0][0]
    else:
        experiment = client.get_experiment_by_name(config.tracking.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(config.tracking.experiment)
        run_id = client.create_run(experiment_id, run_name="evaluation", tags={"output": output}).info.run_id
    metrics = [
        Metric(f"eval/{group}/{name}", float(value), now, 0)
        for group, values in result.summary.items()
        for name, value in values.items()
        if math.isfinite(value)
    ]
    client.log_batch(run_id, metrics=metrics)
    for row in result.scores:
        child = children.get(row["asset_id"])
        if child is None:
            continue
        per_asset = [
            Metric(f"eval/{k}", float(row[k]), now, 0)
            for k in ("alignment", "quality", *TOY_COLUMNS)
            if row.get(k) is not None and math.isfinite(float(row[k]))
        ]
        try:
            client.log_batch(child, metrics=per_asset)
        except MlflowException:
            pass  # a deleted child run: the parent still gets the summary
    client.log_text(run_id, markdown, f"evaluation/{Path(result.report_dir).name}/summary.md")
    if not parents:
        client.set_terminated(run_id, "FINISHED")
    return run_id


def mlflow_client_for_reading(output: str, config: EvaluationRunConfig) -> Any | None:
    return mlflow_client(output, config, create=False)


def methods_from_mlflow(client: Any | None, manifest: Sequence[dict[str, Any]], stream: TextIO) -> dict[str, tuple[Any, str]]:
    """asset_id → (method, digest) recovered from its dataset run, only where the digest matches
    the asset's ``config_digest``."""
    if client is None:
        return {}
    parents = parent_runs(client, manifest)
    configs: dict[str, tuple[Any, str] | None] = {}
    out = {}
    for row in manifest:
        parent = parents.get(row["asset_id"])
        if parent is None:
            continue
        if parent not in configs:
            configs[parent] = method_from_run(client, parent)
        found = configs[parent]
        if found is not None and found[1] == row["config_digest"]:
            out[row["asset_id"]] = found
    if out:
        print(f"[evaluate] method config of {len(out)} of {len(manifest)} assets recovered from their MLflow dataset runs", file=stream, flush=True)
    return out
