"""Score a dataset (``python -m pipeline.evaluate``, :mod:`pipeline.evaluate.cli`).

:func:`evaluate_dataset` reads top to bottom: load the evaluation config → the latest succeeded manifest row of every
asset → the method config each asset was made with (``method.yaml`` in its dir, else
``dataset_config`` when its digest matches, else the ``config.yaml`` logged on the asset's
MLflow dataset run) → views of each asset (rendered from its checkpoint with that config, or
cut from its preview when no config is known) → CLIP alignment and quality per asset → one
new ``scores/part-*.parquet`` shard → diversity per prompt across its variants → ``evaluation/<run>/`` (summary.json, summary.md, diversity.csv)
→ MLflow (the dataset's parent run when the manifest names its child runs, else a new run) → the
dataset's gallery, rebuilt when it exists, so it shows the scores. A toy-world dataset is also
scored against its prompts' known objects (:mod:`~pipeline.evaluate.toyworld`).

The rooms: the config (:mod:`~pipeline.evaluate.config`), score shards
(:mod:`~pipeline.evaluate.scores`), the report (:mod:`~pipeline.evaluate.report`), MLflow
(:mod:`~pipeline.evaluate.tracking`), the command line (:mod:`~pipeline.evaluate.cli`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from pipeline.config import ConfigError
from pipeline.evaluate.config import EvaluationRunConfig, eval_digest
from pipeline.evaluate.report import read_groups, summarise, summary_markdown, write_report
from pipeline.evaluate.scores import latest_scores, write_scores
from pipeline.evaluate.toyworld import toy_diversity, toy_scores, toyworld_of
from pipeline.evaluate.tracking import log_to_mlflow, methods_from_mlflow, mlflow_client_for_reading
from pipeline.manifest import utc_now
from pipeline.writer import DatasetWriter
from stages.asset_layout import GALLERY_DIR
from stages.evaluate.evaluator import Evaluator, diversity_by_prompt
from stages.evaluate.render import METHOD_FILE, AssetViewsError


def expected_view_source(views: str, method: Any | None, asset_dir: Path | None) -> str:
    """Where :func:`stages.evaluate.render.asset_views` will take an asset's views from."""
    if views == "preview":
        return "preview"
    if views == "render" or method is not None:
        return "render"
    return "render" if asset_dir is not None and (asset_dir / METHOD_FILE).is_file() else "preview"


# ------------------------------------------------------------------ method config of the dataset
def dataset_pipeline_config(config: EvaluationRunConfig) -> Any | None:
    """The ``PipelineConfig`` of ``dataset_config`` (+ overrides), or None."""
    if not config.dataset_config:
        return None
    from pipeline.config import load_config

    return load_config(config.dataset_config, config.dataset_overrides)


def dataset_method(config: EvaluationRunConfig) -> tuple[Any | None, str | None]:
    """(OptimizeConfig, config digest) of ``dataset_config``, or (None, None)."""
    pipeline_config = dataset_pipeline_config(config)
    if pipeline_config is None:
        return None, None
    from pipeline.jobs import config_digest

    return pipeline_config.method, config_digest(pipeline_config)


@dataclass
class EvaluationResult:
    scores: list[dict[str, Any]]
    """The latest score row of every evaluated asset (this run's or reused)."""
    diversity: list[Any]
    summary: dict[str, dict[str, float]]
    scores_path: str | None
    report_dir: str
    mlflow_run_id: str | None = None
    scored: int = 0
    reused: int = 0
    failed: int = 0


def evaluate_dataset(
    output: str,
    config: EvaluationRunConfig,
    evaluator: Evaluator | None = None,
    method: Any | None = None,
    stream: TextIO | None = None,
    mlflow_client: Any | None = None,
) -> EvaluationResult:
    """Score every succeeded asset of the dataset at ``output``; write shards, report, MLflow.

    ``method`` (an ``OptimizeConfig``) overrides ``config.dataset_config``; assets whose
    ``config_digest`` differs from the dataset config's are not rendered with it (their
    preview is used under ``views: auto``). ``mlflow_client`` replaces the ``MlflowClient``
    of ``config.tracking`` (tests).
    """
    stream = stream or sys.stderr
    writer = DatasetWriter(output)
    manifest = [r for r in writer.latest_rows().values() if r["status"] == "succeeded"]
    if not manifest:
        raise ConfigError(f"{output}: no succeeded assets in the manifest (nothing to evaluate)")
    digest = None
    if method is None:
        method, digest = dataset_method(config)
    by_asset: dict[str, tuple[Any, str]] = {}
    if method is None and config.method_from_mlflow and config.tracking.enabled:
        by_asset = methods_from_mlflow(mlflow_client or mlflow_client_for_reading(output, config), manifest, stream)
    groups = read_groups(config.groups)
    world = toyworld_of(config, dataset_pipeline_config(config) if config.toyworld == "auto" else None)
    evaluator = evaluator or Evaluator.from_config(config.evaluate)
    settings = evaluator.config  # the evaluator's settings are the ones that score
    edigest = eval_digest(settings, config.views, world)
    previous = latest_scores(writer) if config.skip_scored else {}
    local = writer.local_root()
    new_rows, result_rows = [], []
    reused = failed = 0
    for row in sorted(manifest, key=lambda r: (r["prompt_index"] or 0, r["variant"] or 0, r["asset_id"])):
        asset_method = method if digest is None or digest == row["config_digest"] else None
        if row["asset_id"] in by_asset:
            asset_method = by_asset[row["asset_id"]][0]
        if method is not None and asset_method is None:
            print(
                f"[evaluate] {row['asset_id']}: config_digest {row['config_digest']} differs from dataset_config's "
                f"{digest}; not rendering it with that config (views={config.views})",
                file=stream,
                flush=True,
            )
        asset_dir = None if local is None else local / row["asset_dir"]
        old = previous.get(row["asset_id"])
        if (
            old is not None
            and old["status"] == "succeeded"
            and old["eval_digest"] == edigest
            and old["asset_finished_at"] == row["finished_at"]
            and old["view_source"] == expected_view_source(config.views, asset_method, asset_dir)
        ):
            result_rows.append(old)
            reused += 1
            continue
        base = {
            "asset_id": row["asset_id"],
            "prompt": row["prompt"],
            "prompt_index": row["prompt_index"],
            "variant": row["variant"],
            "config_digest": row["config_digest"],
            "asset_finished_at": row["finished_at"],
            "eval_digest": edigest,
            "clip": settings.clip,
            "aesthetic_head": settings.aesthetic_head,
        }
        try:
            if asset_dir is None:
                raise AssetViewsError(f"{output}: evaluating remote datasets needs a local copy (pyarrow fs download not implemented)")
            scored = evaluator.score_asset(asset_dir, row["prompt"], asset_method, config.views)
            toy = {} if world is None else toy_scores(asset_dir, row["prompt"], asset_method, world, evaluator.device)
        except AssetViewsError as error:
            failed += 1
            print(f"[evaluate] {row['asset_id']}: {error}", file=stream, flush=True)
            new_rows.append({**base, "status": "failed", "error": str(error), "evaluated_at": utc_now()})
            continue
        scored_row = {
            **base,
            "status": "succeeded",
            "alignment": scored.alignment,
            "quality": None if math.isnan(scored.quality) else scored.quality,
            "num_views": scored.num_views,
            "view_source": scored.view_source,
            "image_features": scored.image_features.tolist(),
            "evaluated_at": utc_now(),
            **{k: (v if math.isfinite(v) else None) for k, v in toy.items()},
        }
        new_rows.append(scored_row)
        result_rows.append(scored_row)
    scores_path = write_scores(writer, new_rows)

    diversity = diversity_by_prompt(
        (r["prompt"], r["config_digest"], _features(r["image_features"])) for r in result_rows
    )
    summary = summarise(result_rows, diversity, groups)
    header = f"# Evaluation of {output}\n\nclip: `{settings.clip}`, quality head: `{settings.aesthetic_head}`, views: `{config.views}`"
    markdown = summary_markdown(summary, header)
    payload = {
        "dataset": output,
        "evaluate": asdict(settings),
        "views": config.views,
        "eval_digest": edigest,
        "summary": summary,
        "diversity": [asdict(d) for d in diversity],
        "toy_diversity": toy_diversity(result_rows),
        "assets": {"scored": len(new_rows) - failed, "reused": reused, "failed": failed},
    }
    report_dir = write_report(writer, markdown, payload, diversity, groups)

    result = EvaluationResult(result_rows, diversity, summary, scores_path, report_dir, None, len(new_rows) - failed, reused, failed)
    if config.tracking.enabled:
        result.mlflow_run_id = log_to_mlflow(output, config, result, manifest, markdown, mlflow_client)
    print(markdown, file=stream, flush=True)
    _refresh_gallery(writer, output, stream)
    return result


def _features(values: Any) -> torch.Tensor:
    """A score row's (V, D) CLIP features (``evaluate.clip: none`` leaves them empty)."""
    features = torch.tensor(values or [], dtype=torch.float32)
    return features if features.ndim == 2 else features.reshape(len(values or []), 0)


def _refresh_gallery(writer: DatasetWriter, output: str, stream: TextIO) -> None:
    """Rebuild ``<output>/gallery`` when the dataset has one, so its pages show the new scores."""
    local = writer.local_root()
    if local is None or not (local / GALLERY_DIR / "index.html").is_file():
        return
    from pipeline.gallery import build_gallery

    try:
        print(f"[evaluate] gallery with scores: {build_gallery(output) / 'index.html'}", file=stream, flush=True)
    except Exception as error:  # noqa: BLE001 - the scores are written; the gallery is a view of them
        print(f"[evaluate] gallery not rebuilt: {type(error).__name__}: {error}", file=stream, flush=True)
