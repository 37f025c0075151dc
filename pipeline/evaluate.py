"""Score a dataset: ``python -m pipeline.evaluate DATASET [--config configs/evaluate.yaml] [key=value ...]``.

Reads top to bottom: load the evaluation config → the latest succeeded manifest row of every
asset → the method config each asset was made with (``method.yaml`` in its dir, else
``dataset_config`` when its digest matches, else the ``config.yaml`` logged on the asset's
MLflow dataset run) → views of each asset (rendered from its checkpoint with that config, or
cut from its preview when no config is known) → CLIP alignment and quality per asset → one
new ``scores/part-*.parquet`` shard → diversity per prompt across its variants → ``evaluation/<run>/`` (summary.json, summary.md, diversity.csv)
→ MLflow (the dataset's parent run when the manifest names its child runs, else a new run) → the
dataset's gallery, rebuilt when it exists, so it shows the scores.

A toy-world dataset (its models are ``toyworld``: ``stages/toyworld``) is also scored against its
prompts' known objects (``toy_*`` columns: identity, recovered, novel-view PSNR to the reference's
object, consistency across views, mesh IoU; and distinct objects per prompt), see
docs/TOYWORLD.md "Scores".

Scores live in their own shards, not in the manifest: a manifest row means "this asset was
produced", ordered by ``finished_at``; a score row means "this asset was scored", ordered by
``evaluated_at``. Shards are never rewritten; the latest score row of an asset wins
(:func:`latest_scores`), as in the manifest.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import sys
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pipeline.config import ConfigError
from pipeline.writer import DatasetWriter, utc_now
from stages.evaluate.config import EvaluateConfig
from stages.evaluate.evaluator import Evaluator, diversity_by_prompt
from stages.evaluate.render import METHOD_FILE, AssetViewsError, ViewSource

SCORES_DIR = "scores"
TOY_COLUMNS = (
    "toy_identity", "toy_reference", "toy_identity_correct", "toy_psnr_reference", "toy_psnr_identity",
    "toy_consistency", "toy_iou",
)
"""Toy-world fidelity scores (:meth:`stages.toyworld.fidelity.Fidelity.metrics`); null otherwise."""
REPORTS_DIR = "evaluation"

SCORES_SCHEMA = pa.schema(
    [
        ("asset_id", pa.string()),
        ("prompt", pa.string()),
        ("prompt_index", pa.int64()),
        ("variant", pa.int64()),
        ("config_digest", pa.string()),
        ("asset_finished_at", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("alignment", pa.float64()),
        ("quality", pa.float64()),
        ("num_views", pa.int64()),
        ("view_source", pa.string()),
        ("eval_digest", pa.string()),
        ("clip", pa.string()),
        ("aesthetic_head", pa.string()),
        ("image_features", pa.list_(pa.list_(pa.float32()))),
        ("evaluated_at", pa.string()),
        *((name, pa.float64()) for name in TOY_COLUMNS),
    ]
)
SCORE_COLUMNS = tuple(SCORES_SCHEMA.names)


@dataclass
class EvalTrackingConfig:
    enabled: bool = True
    tracking_uri: Optional[str] = None
    """MLflow URI; default the dataset's own (``sqlite:///<dataset>/mlflow.db``)."""
    experiment: str = "modedreamer-evaluation"
    """Experiment of the new run made when the dataset's parent run is not recorded."""


@dataclass
class EvaluationRunConfig:
    """``configs/evaluate.yaml``."""

    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    dataset_config: Optional[str] = None
    """The pipeline YAML the dataset was made with (relative to this file): its ``method``
    rebuilds each scene from ``checkpoint.pt``. Without it (and without ``method.yaml`` in the
    asset dirs) the views are cut from ``preview.png``."""
    dataset_overrides: list[str] = field(default_factory=list)
    """Dotlist overrides the dataset was made with (e.g. ``method.iterations=3000``)."""
    views: ViewSource = ViewSource.auto
    """``auto``: render when the method config is known, else cut the views from ``preview.png``."""
    groups: dict[str, str] = field(default_factory=dict)
    """Prompt lists for the summary columns: name → prompt file (txt/jsonl/...; relative to this
    file). A prompt in none of them counts as ``other``."""
    skip_scored: bool = True
    """Keep an asset's latest score when it was made with the same evaluation settings."""
    method_from_mlflow: bool = True
    """Without ``dataset_config``: rebuild scenes from the ``config.yaml`` the pipeline logged on
    the dataset's parent MLflow run (found through each asset's child run)."""
    toyworld: str = "auto"
    """Score against a toy world's known objects: ``auto`` (when ``dataset_config``'s models are the
    toy world, with its ``models.toyworld``), ``none``, or a world (``default`` / a world YAML)."""
    tracking: EvalTrackingConfig = field(default_factory=EvalTrackingConfig)


def load_evaluation_config(path: str | Path | None, overrides: Sequence[str] = ()) -> EvaluationRunConfig:
    """YAML (optional) + dotlist onto :class:`EvaluationRunConfig`; paths made absolute."""
    from stages.config_loading import load_structured

    base_dir = Path.cwd() if path is None else Path(path).parent
    config: EvaluationRunConfig = load_structured(EvaluationRunConfig, path, overrides, what="evaluation config")
    try:
        config.evaluate.validate()
    except ValueError as error:
        raise ConfigError(f"config key {error}") from None
    absolute = lambda p: p if "://" in p or Path(p).is_absolute() else str((base_dir / p).resolve())  # noqa: E731
    if config.dataset_config:
        config.dataset_config = absolute(config.dataset_config)
    config.groups = {name: absolute(p) for name, p in config.groups.items()}
    return config


def eval_digest(config: EvaluateConfig, views: str, world: Any | None = None) -> str:
    """12 hex digits over the settings that change a score (and the toy world scored against)."""
    payload = {k: v for k, v in asdict(config).items() if k != "device"}
    payload["views"] = views
    if world is not None:
        payload["toyworld"] = world.digest()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------ score shards
def write_scores(writer: DatasetWriter, rows: Sequence[dict[str, Any]]) -> str | None:
    """Write rows as one new ``scores/part-*.parquet`` (temp name + rename); returns its path."""
    if not rows:
        return None
    table = pa.Table.from_pylist([{c: row.get(c) for c in SCORE_COLUMNS} for row in rows], schema=SCORES_SCHEMA)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    name = f"part-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
    directory = writer.path(SCORES_DIR)
    writer.fs.create_dir(directory, recursive=True)
    final = f"{directory}/{name}"
    if writer.is_local:
        tmp = f"{directory}/.{name}.tmp"
        pq.write_table(table, tmp, filesystem=writer.fs)
        os.replace(tmp, final)
    else:
        pq.write_table(table, final, filesystem=writer.fs)  # object stores publish on close
    return final


def read_scores(writer: DatasetWriter) -> list[dict[str, Any]]:
    """Every score row of every shard, oldest first by ``evaluated_at``."""
    selector = pafs.FileSelector(writer.path(SCORES_DIR), allow_not_found=True)
    rows: list[dict[str, Any]] = []
    for info in writer.fs.get_file_info(selector):
        if info.type == pafs.FileType.File and info.base_name.startswith("part-") and info.base_name.endswith(".parquet"):
            rows.extend(pq.read_table(info.path, filesystem=writer.fs).to_pylist())
    rows.sort(key=lambda row: row["evaluated_at"] or "")
    return rows


def latest_scores(writer: DatasetWriter) -> dict[str, dict[str, Any]]:
    """asset_id → its latest score row (later rows supersede earlier ones)."""
    return {row["asset_id"]: row for row in read_scores(writer)}


# ------------------------------------------------------------------ groups and summary
def read_groups(groups: dict[str, str]) -> dict[str, set[str]]:
    """name → set of prompts of that list."""
    from pipeline.prompts import PromptsConfig, PromptSource, read_prompts

    out = {}
    for name, path in groups.items():
        try:
            out[name] = set(read_prompts(PromptsConfig(sources=[PromptSource(path=path)])))
        except (ConfigError, OSError, ValueError) as error:
            raise ConfigError(f"config key 'groups.{name}': {error}") from None
    return out


def group_of(prompt: str, groups: dict[str, set[str]]) -> str:
    for name, prompts in groups.items():
        if prompt in prompts:
            return name
    return "other"


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def toy_diversity(scores: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Distinct toy-world objects recovered per (prompt, config digest): the number of different
    identities among the variants (and of different references, for comparison)."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in scores:
        if row.get("toy_identity") is not None:
            grouped.setdefault((row["prompt"], row["config_digest"]), []).append(row)
    return [
        {
            "prompt": prompt, "config_digest": digest, "variants": len(rows),
            "distinct": len({int(r["toy_identity"]) for r in rows}),
            "distinct_references": len({int(r["toy_reference"]) for r in rows if _finite(r.get("toy_reference"))}),
        }
        for (prompt, digest), rows in sorted(grouped.items())
    ]


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


def summarise(scores: Sequence[dict[str, Any]], diversity: Sequence[Any], groups: dict[str, set[str]]) -> dict[str, dict[str, float]]:
    """Means per prompt list (plus ``all``): alignment, quality, diversity, assets, prompts; and
    for toy-world scores: recovered fraction, PSNR to the reference, consistency, IoU, distinct
    objects per prompt."""
    names = [*groups, "other", "all"]
    table: dict[str, dict[str, float]] = {}
    for name in names:
        rows = [r for r in scores if name == "all" or group_of(r["prompt"], groups) == name]
        divs = [d for d in diversity if name == "all" or group_of(d.prompt, groups) == name]
        if not rows and name == "other":
            continue
        table[name] = {
            "alignment": _mean([r["alignment"] for r in rows]),
            "quality": _mean([r["quality"] for r in rows]),
            "diversity": _mean([d.diversity for d in divs]),
            "assets": float(len(rows)),
            "prompts": float(len({r["prompt"] for r in rows})),
        }
        toy = [r for r in rows if r.get("toy_identity") is not None]
        if toy:
            table[name].update({
                "toy_recovered": _mean([r.get("toy_identity_correct") for r in toy]),
                "toy_psnr_reference": _mean([r.get("toy_psnr_reference") for r in toy]),
                "toy_consistency": _mean([r.get("toy_consistency") for r in toy]),
                "toy_iou": _mean([r.get("toy_iou") for r in toy]),
                "toy_distinct": _mean([float(d["distinct"]) for d in toy_diversity(toy)]),
            })
    return table


def summary_markdown(table: dict[str, dict[str, float]], header: str) -> str:
    """Metrics as rows, prompt lists as columns (the paper's Table 1 layout)."""
    columns = list(table)
    lines = [header, "", "| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    toy = [m for m in TOY_SUMMARY if any(m in table[c] for c in columns)]
    for metric in ("alignment", "quality", "diversity", "assets", "prompts", *toy):
        cells = []
        for c in columns:
            value = table[c].get(metric, math.nan)
            cells.append("n/a" if not math.isfinite(value) else (f"{value:.0f}" if metric in ("assets", "prompts") else f"{value:.4f}"))
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "alignment: 100 · mean cosine(CLIP view, prompt); quality: mean aesthetic-head score (n/a: no head);",
        "diversity: mean pairwise cosine distance of the variants' same-view CLIP features, per prompt, averaged.",
    ]
    if toy:
        lines.append(
            "toy world (held-out views against the prompt's known objects): toy_recovered = fraction whose nearest object is "
            "the reference's; toy_psnr_reference = dB to it; toy_consistency = fraction of views agreeing; toy_iou = mesh "
            "solid vs the object's voxels; toy_distinct = distinct objects per prompt."
        )
    return "\n".join(lines) + "\n"


TOY_SUMMARY = ("toy_recovered", "toy_psnr_reference", "toy_consistency", "toy_iou", "toy_distinct")


def _write_text(writer: DatasetWriter, path: str, text: str) -> None:
    if writer.is_local:
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        Path(tmp).write_text(text)
        os.replace(tmp, path)
    else:
        with writer.fs.open_output_stream(path) as stream:
            stream.write(text.encode())


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


def toyworld_of(config: EvaluationRunConfig) -> Any | None:
    """The toy world to score against (``toyworld`` key), or None."""
    from stages.toyworld.world import WorldError, load_world

    if config.toyworld == "none":
        return None
    source = config.toyworld
    if source == "auto":
        pipeline_config = dataset_pipeline_config(config)
        if pipeline_config is None:
            return None
        from pipeline.toyworld import toyworld_groups

        if not toyworld_groups(pipeline_config):
            return None
        source = pipeline_config.models.toyworld
    try:
        return load_world(source)
    except WorldError as error:
        raise ConfigError(f"config key 'toyworld': {error}") from None


def toy_scores(asset_dir: Path, prompt: str, method: Any | None, world: Any, device: torch.device) -> dict[str, float]:
    """:meth:`~stages.toyworld.fidelity.Fidelity.metrics` of one asset (its ``method.yaml`` wins
    over ``method``); raises :class:`AssetViewsError` naming what is missing."""
    from stages.evaluate.render import load_asset_scene, read_method_config
    from stages.toyworld.fidelity import score_scene

    method = read_method_config(asset_dir) or method
    if method is None:
        raise AssetViewsError(f"{asset_dir}: toy-world scores need the asset's method config ({METHOD_FILE} or dataset_config)")
    if prompt not in world.prompts:
        raise AssetViewsError(f"{asset_dir}: {world.unknown(prompt)}")
    scene = load_asset_scene(asset_dir, method, device)
    reference = asset_dir / "reference.png"
    threshold = method.export.mesh_threshold
    fidelity = score_scene(
        scene, world, prompt, reference if reference.is_file() else None,
        mesh_resolution=method.export.mesh_resolution,
        mesh_threshold=threshold if threshold == "auto" else float(threshold),
        distance=method.cameras.eval_distance, fovy=method.cameras.eval_fovy,
    )
    return fidelity.metrics()


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
    world = toyworld_of(config)
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
    report_dir = writer.path(REPORTS_DIR, f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}")
    writer.fs.create_dir(report_dir, recursive=True)
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
    _write_text(writer, f"{report_dir}/summary.json", json.dumps(json_safe(payload), indent=2) + "\n")
    _write_text(writer, f"{report_dir}/summary.md", markdown)
    buffer = io.StringIO()
    table = csv.writer(buffer)
    table.writerow(["prompt", "config_digest", "prompt_list", "variants", "diversity"])
    for d in diversity:
        table.writerow([d.prompt, d.method, group_of(d.prompt, groups), d.variants, d.diversity])
    _write_text(writer, f"{report_dir}/diversity.csv", buffer.getvalue())

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
    if local is None or not (local / "gallery" / "index.html").is_file():
        return
    from pipeline.gallery import build_gallery

    try:
        print(f"[evaluate] gallery with scores: {build_gallery(output) / 'index.html'}", file=stream, flush=True)
    except Exception as error:  # noqa: BLE001 - the scores are written; the gallery is a view of them
        print(f"[evaluate] gallery not rebuilt: {type(error).__name__}: {error}", file=stream, flush=True)


def json_safe(value: Any) -> Any:
    """NaN / inf floats (also nested) as None, so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# ------------------------------------------------------------------ MLflow
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


# ------------------------------------------------------------------ CLI
EXAMPLES = """examples:
  python -m pipeline.evaluate outputs/t3bench_single --config configs/evaluate.yaml
  python -m pipeline.evaluate outputs/quickstart --config configs/evaluate.yaml evaluate.clip=tiny evaluate.aesthetic_head=tiny
  python -m pipeline.evaluate outputs/t3bench --config configs/evaluate.yaml --dataset-config configs/eval_t3bench.yaml
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate", description="Score a dataset: text alignment and quality per asset, diversity per prompt.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", help="dataset root (the pipeline's output)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. evaluate.clip=tiny views=preview")
    parser.add_argument("--config", default=None, help="evaluation YAML (configs/evaluate.yaml)")
    parser.add_argument("--dataset-config", default=None, help="pipeline YAML the dataset was made with (overrides dataset_config)")
    parser.add_argument(
        "--dataset-override", action="append", default=[], metavar="KEY=VALUE",
        help="a dotlist override the dataset was made with (repeatable), e.g. method.iterations=3000",
    )
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_evaluation_config(args.config, args.overrides)
        if args.dataset_config:
            config.dataset_config = str(Path(args.dataset_config).resolve())
        config.dataset_overrides = [*config.dataset_overrides, *args.dataset_override]
        result = evaluate_dataset(args.dataset, config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"[evaluate] {result.scored} scored, {result.reused} reused, {result.failed} failed; "
        f"scores: {result.scores_path}; report: {result.report_dir}",
        file=sys.stderr,
    )
    return 1 if result.failed and not (result.scored or result.reused) else 0


if __name__ == "__main__":
    sys.exit(main())
