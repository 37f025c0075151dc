"""pipeline.evaluate on a tiny dataset made by the real loop / export / writer.

Scores are checked against an independent recomputation (scene rebuilt by hand, CLIP features
by hand, cosine by numpy), shards are read back with pyarrow directly.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from evaluate_fixtures import TINY_PIPELINE_YAML, build_dataset, tiny_method
from pipeline.config import ConfigError
from pipeline.evaluate import (
    EvaluationRunConfig,
    evaluate_dataset,
    latest_scores,
    load_evaluation_config,
    write_scores,
)
from pipeline.manifest import utc_now
from pipeline.writer import DatasetWriter
from stages.evaluate.clip import to_pil
from stages.evaluate.config import EvaluateConfig
from stages.evaluate.evaluator import Evaluator
from stages.evaluate.render import METHOD_FILE, AssetViewsError, asset_views
from stages.scene.views import render_views
from stages.scene.cameras import orbit_cameras
from stages.scene.nerf import NeRFScene

ASSETS = [
    ("a red ball", 0, 1, 0.5),
    ("a red ball", 1, 1, 0.5),  # same seed and target: an identical copy of variant 0
    ("a blue cube", 0, 2, 0.3),
    ("a blue cube", 1, 3, 0.7),
]


@pytest.fixture(scope="module")
def method():
    return tiny_method()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, method):
    root = tmp_path_factory.mktemp("dataset")
    rows = build_dataset(root, ASSETS, method)
    return root, rows


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator.from_config(EvaluateConfig(clip="tiny", aesthetic_head="tiny", num_views=3, resolution=16, device="cpu"))


@pytest.fixture(scope="module")
def evaluated(dataset, method, evaluator, tmp_path_factory):
    """The dataset copied and evaluated once (rendered views, a prompt list named ``balls``)."""
    root = tmp_path_factory.mktemp("evaluated") / "ds"
    shutil.copytree(dataset[0], root)
    manifest_before = sorted(p.name for p in (root / "manifest").iterdir())
    config = _config(groups={"balls": str(_prompt_file(root.parent, ["a red ball"]))})
    result = evaluate_dataset(str(root), config, evaluator=evaluator, method=method, stream=io.StringIO())
    return root, result, manifest_before


def _config(**overrides) -> EvaluationRunConfig:
    config = EvaluationRunConfig(evaluate=EvaluateConfig(clip="tiny", aesthetic_head="tiny", num_views=3, resolution=16, device="cpu"))
    config.tracking.enabled = False
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _copy(root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(root, target)
    return target


def _strip_method_files(root: Path) -> Path:
    """Drop every asset's method.yaml: a dataset written before assets carried their config,
    whose scenes must be rebuilt from elsewhere (dataset_config, MLflow) or scored from previews."""
    for path in root.glob(f"assets/*/{METHOD_FILE}"):
        path.unlink()
    return root


def _independent_views(asset_dir: Path, method, n: int, elevation: float, resolution: int) -> list[Image.Image]:
    """A fresh scene per asset (the evaluator reuses one scene across assets)."""
    scene = NeRFScene(method.nerf, seed=123)
    scene.load_state_dict(torch.load(asset_dir / "checkpoint.pt", weights_only=True))
    cams = orbit_cameras(n, elevation, method.cameras.eval_distance, method.cameras.eval_fovy)
    rgb = render_views(scene, cams, resolution)["rgb"]
    return [to_pil(v) for v in rgb]


def test_scores_land_in_a_new_shard_and_match_an_independent_recomputation(dataset, evaluated, method, evaluator):
    root, result, manifest_before = evaluated
    assert sorted(p.name for p in (root / "manifest").iterdir()) == manifest_before  # manifest untouched
    shards = list((root / "scores").glob("part-*.parquet"))
    assert len(shards) == 1 and not list((root / "scores").glob(".*tmp"))
    table = pq.read_table(shards[0]).to_pylist()
    assert {r["asset_id"] for r in table} == {r["asset_id"] for r in dataset[1]}
    clip, head = evaluator.clip, evaluator.head
    for row in table:
        assert row["status"] == "succeeded" and row["view_source"] == "render" and row["num_views"] == 3
        images = _independent_views(root / "assets" / row["asset_id"], method, 3, 15.0, 16)
        features = clip.images(images).numpy()
        text = clip.texts([row["prompt"]])[0].numpy()
        assert row["alignment"] == pytest.approx(100.0 * float(np.mean(features @ text)), rel=1e-4, abs=1e-4)
        quality = float(head(torch.from_numpy(features)).detach().mean())
        assert row["quality"] == pytest.approx(quality, rel=1e-4, abs=1e-5)
        np.testing.assert_allclose(np.array(row["image_features"]), features, atol=1e-5)
    assert result.scored == 4 and result.failed == 0


def test_diversity_zero_for_identical_variants_positive_for_different(evaluated):
    root, result, _ = evaluated
    by_prompt = {d.prompt: d for d in result.diversity}
    assert by_prompt["a red ball"].variants == 2
    assert by_prompt["a red ball"].diversity == pytest.approx(0.0, abs=1e-6)
    cube = [r for r in result.scores if r["prompt"] == "a blue cube"]
    a, b = (np.array(r["image_features"]) for r in cube)
    expected = float(np.mean(1.0 - (a * b).sum(axis=1)))
    assert by_prompt["a blue cube"].diversity == pytest.approx(expected, rel=1e-4) and expected > 1e-4
    # summary columns: the named prompt list, the rest as "other", and "all"
    summary = json.loads((Path(result.report_dir) / "summary.json").read_text())["summary"]
    assert set(summary) == {"balls", "other", "all"}
    assert summary["balls"]["diversity"] == pytest.approx(0.0, abs=1e-6)
    assert summary["other"]["diversity"] == pytest.approx(expected, rel=1e-4)
    assert summary["all"]["assets"] == 4
    ball_alignment = [r["alignment"] for r in result.scores if r["prompt"] == "a red ball"]
    assert summary["balls"]["alignment"] == pytest.approx(float(np.mean(ball_alignment)), rel=1e-6)
    assert "| diversity |" in (Path(result.report_dir) / "summary.md").read_text()
    csv_lines = (Path(result.report_dir) / "diversity.csv").read_text().splitlines()
    assert csv_lines[0].startswith("prompt,") and len(csv_lines) == 3


def _prompt_file(tmp_path: Path, prompts: list[str]) -> Path:
    path = tmp_path / "list.txt"
    path.write_text("\n".join(prompts) + "\n")
    return path


def test_rerun_reuses_scores_and_later_rows_supersede(evaluated, method, evaluator, tmp_path):
    root = _copy(evaluated[0], tmp_path)
    first = evaluated[1]
    second = evaluate_dataset(str(root), _config(), evaluator=evaluator, method=method, stream=io.StringIO())
    assert second.reused == 4 and second.scored == 0 and second.scores_path is None
    assert [r["alignment"] for r in second.scores] == [r["alignment"] for r in first.scores]
    writer = DatasetWriter(str(root))
    newer = dict(first.scores[0], alignment=-7.0, evaluated_at="9999-01-01T00:00:00+00:00")
    write_scores(writer, [newer])
    assert latest_scores(writer)[newer["asset_id"]]["alignment"] == -7.0
    assert len(list((root / "scores").glob("part-*.parquet"))) == 2


def test_without_method_config_views_come_from_the_preview(dataset, evaluator, tmp_path):
    root = _strip_method_files(_copy(dataset[0], tmp_path))
    result = evaluate_dataset(str(root), _config(), evaluator=evaluator, stream=io.StringIO())
    row = result.scores[0]
    assert row["view_source"] == "preview" and row["num_views"] == 4
    with Image.open(root / "assets" / row["asset_id"] / "preview.png") as grid:
        tile = grid.width // 4
        crops = [grid.convert("RGB").crop((c * tile, 0, (c + 1) * tile, tile)) for c in range(4)]
    features = evaluator.clip.images(crops).numpy()
    text = evaluator.clip.texts([row["prompt"]])[0].numpy()
    assert row["alignment"] == pytest.approx(100.0 * float(np.mean(features @ text)), rel=1e-4, abs=1e-4)


def test_method_yaml_in_the_asset_dir_enables_rendering(dataset, method, evaluator, tmp_path):
    from omegaconf import OmegaConf

    root = _copy(dataset[0], tmp_path)
    asset_dir = root / "assets" / dataset[1][2]["asset_id"]
    (asset_dir / METHOD_FILE).write_text(OmegaConf.to_yaml(OmegaConf.structured(method)))
    views = asset_views(asset_dir, evaluator.config, None, "auto")
    assert views.source == "render" and len(views.images) == 3
    expected = _independent_views(asset_dir, method, 3, 15.0, 16)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(views.images, expected))


def test_missing_checkpoint_gives_a_failed_row_naming_the_file(dataset, method, evaluator, tmp_path):
    root = _strip_method_files(_copy(dataset[0], tmp_path))
    victim = dataset[1][3]["asset_id"]
    (root / "assets" / victim / "checkpoint.pt").unlink()
    result = evaluate_dataset(str(root), _config(views="render"), evaluator=evaluator, method=method, stream=io.StringIO())
    assert result.failed == 1 and result.scored == 3
    rows = pq.read_table(result.scores_path).to_pylist()
    bad = [r for r in rows if r["asset_id"] == victim][0]
    assert bad["status"] == "failed" and "checkpoint.pt" in bad["error"]
    assert math.isnan(next(d for d in result.diversity if d.prompt == "a blue cube").diversity)
    with pytest.raises(AssetViewsError, match="dataset_config"):
        asset_views(root / "assets" / victim, evaluator.config, None, "render")


class FakeMlflow:
    """The MlflowClient calls log_to_mlflow makes, in memory."""

    def __init__(self, parents: dict[str, str], artifacts: dict[str, str] | None = None):
        self.parents = parents
        self.artifacts = artifacts or {}
        self.metrics: dict[str, dict[str, float]] = {}
        self.created: list[str] = []

    def download_artifacts(self, run_id, path, dst_path):
        from mlflow.exceptions import MlflowException

        if run_id not in self.artifacts:
            raise MlflowException(f"no artifact {path} in run {run_id}")
        target = Path(dst_path) / path
        target.write_text(self.artifacts[run_id])
        return str(target)

    def get_run(self, run_id):
        from types import SimpleNamespace

        from mlflow.exceptions import MlflowException

        if run_id not in self.parents:
            raise MlflowException(f"run {run_id} not found")
        return SimpleNamespace(data=SimpleNamespace(tags={"mlflow.parentRunId": self.parents[run_id]}))

    def log_batch(self, run_id, metrics=()):
        self.metrics.setdefault(run_id, {}).update({m.key: m.value for m in metrics})

    def log_text(self, run_id, text, path):
        assert "| metric |" in text

    def get_experiment_by_name(self, name):
        return None

    def create_experiment(self, name):
        return "1"

    def create_run(self, experiment_id, run_name=None, tags=None):
        from types import SimpleNamespace

        self.created.append(run_name)
        return SimpleNamespace(info=SimpleNamespace(run_id="new-run"))

    def set_terminated(self, run_id, status):
        pass


def test_scores_go_to_the_datasets_parent_mlflow_run(evaluated):
    from pipeline.evaluate import log_to_mlflow

    root, result, _ = evaluated
    manifest = [dict(r, mlflow_run_id=f"child-{i}") for i, r in enumerate(DatasetWriter(str(root)).latest_rows().values())]
    fake = FakeMlflow({f"child-{i}": "parent" for i in range(len(manifest))})
    config = _config()
    assert log_to_mlflow(str(root), config, result, manifest, "| metric |", fake) == "parent"
    assert fake.metrics["parent"]["eval/all/alignment"] == pytest.approx(result.summary["all"]["alignment"])
    assert fake.metrics["parent"]["eval/balls/diversity"] == pytest.approx(0.0, abs=1e-6)
    child = {r["asset_id"]: r["mlflow_run_id"] for r in manifest}
    some = result.scores[0]
    assert fake.metrics[child[some["asset_id"]]]["eval/alignment"] == pytest.approx(some["alignment"])
    assert not fake.created
    # no child runs recorded: a new "evaluation" run gets the summary
    lonely = FakeMlflow({})
    bare = [dict(r, mlflow_run_id=None) for r in manifest]
    assert log_to_mlflow(str(root), config, result, bare, "| metric |", lonely) == "new-run"
    assert lonely.created == ["evaluation"] and "eval/all/assets" in lonely.metrics["new-run"]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="views"):
        load_evaluation_config(None, ["views=sideways"])
    with pytest.raises(ConfigError, match="num_views"):
        load_evaluation_config(None, ["evaluate.num_views=0"])
    with pytest.raises(ConfigError, match="bogus"):
        load_evaluation_config(None, ["bogus=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_evaluation_config(tmp_path / "nope.yaml")
    repo = Path(__file__).resolve().parents[1]
    config = load_evaluation_config(repo / "configs" / "evaluate.yaml")
    assert config.evaluate.elevation == 15.0
    for name, path in config.groups.items():
        assert Path(path).is_file(), f"groups.{name}: {path}"




def test_dataset_config_rebuilds_scenes_only_for_assets_of_its_digest(evaluator, tmp_path):
    from pipeline.config import load_config
    from pipeline.jobs import config_digest

    made_with = tmp_path / "made.yaml"
    made_with.write_text(TINY_PIPELINE_YAML.replace("ITERATIONS", "1"))
    other = tmp_path / "other.yaml"
    other.write_text(TINY_PIPELINE_YAML.replace("ITERATIONS", "2"))
    pipeline_config = load_config(made_with)
    root = tmp_path / "ds"
    build_dataset(root, [("a red ball", 0, 5, 0.4)], pipeline_config.method, digest=config_digest(pipeline_config))
    _strip_method_files(root)

    first = evaluate_dataset(str(root), _config(), evaluator=evaluator, stream=io.StringIO())
    assert first.scores[0]["view_source"] == "preview"
    # same settings, but now the scene can be rebuilt: the preview score is not reused
    result = evaluate_dataset(str(root), _config(dataset_config=str(made_with)), evaluator=evaluator, stream=io.StringIO())
    assert result.reused == 0 and result.scores[0]["view_source"] == "render" and result.scores[0]["num_views"] == 3
    log = io.StringIO()
    config = _config(dataset_config=str(other), skip_scored=False)
    result = evaluate_dataset(str(root), config, evaluator=evaluator, stream=log)
    assert result.scores[0]["view_source"] == "preview" and "differs from dataset_config" in log.getvalue()

    # no dataset_config: the config.yaml logged on the dataset's parent run rebuilds the scene
    from pipeline.config import to_yaml

    writer = DatasetWriter(str(root))
    rows = [dict(r, mlflow_run_id="child", finished_at=utc_now()) for r in writer.latest_rows().values()]  # a newer row
    writer.write_manifest(rows)
    for artifact, source in ((to_yaml(pipeline_config), "render"), (to_yaml(load_config(other)), "preview")):
        fake = FakeMlflow({"child": "parent"}, {"parent": artifact})
        config = _config(skip_scored=False)
        config.tracking.enabled = True
        result = evaluate_dataset(str(root), config, evaluator=evaluator, stream=io.StringIO(), mlflow_client=fake)
        assert result.scores[0]["view_source"] == source
        assert fake.metrics["parent"]["eval/all/assets"] == 1


def test_cli_scores_a_dataset_and_fails_cleanly_without_one(dataset, tmp_path, capsys):
    from pipeline.evaluate import main

    root = _copy(dataset[0], tmp_path)
    args = [str(root), "evaluate.clip=tiny", "evaluate.num_views=2", "evaluate.resolution=16", "tracking.enabled=false", "views=preview"]
    assert main(args) == 0
    assert len(list((root / "scores").glob("part-*.parquet"))) == 1
    assert "4 scored" in capsys.readouterr().err
    assert main([str(tmp_path / "empty"), "evaluate.clip=tiny", "tracking.enabled=false"]) == 2
    assert "no succeeded assets" in capsys.readouterr().err


def test_toy_world_summary_counts_recovered_and_distinct_objects():
    import math

    from pipeline.evaluate import summarise, summary_markdown, toy_diversity

    def row(prompt, identity, reference, psnr):
        return {"prompt": prompt, "config_digest": "d", "alignment": math.nan, "quality": None, "toy_identity": identity,
                "toy_reference": reference, "toy_identity_correct": float(identity == reference),
                "toy_psnr_reference": psnr, "toy_consistency": 1.0, "toy_iou": 0.5}

    rows = [row("a ring", 1, 1, 24.0), row("a ring", 2, 2, 20.0), row("a pebble", 0, 3, 12.0), row("a pebble", 0, 0, 28.0)]
    diversity = {d["prompt"]: d for d in toy_diversity(rows)}
    assert diversity["a ring"]["distinct"] == 2 and diversity["a pebble"]["distinct"] == 1
    assert diversity["a pebble"]["distinct_references"] == 2
    table = summarise(rows, [], {})
    assert table["all"]["toy_recovered"] == 0.75 and table["all"]["toy_psnr_reference"] == 21.0
    assert table["all"]["toy_distinct"] == 1.5
    text = summary_markdown(table, "# t")
    assert "| toy_recovered | 0.7500 | 0.7500 |" in text and "toy_distinct" in text
    # datasets without toy scores keep the old table
    plain = summarise([{"prompt": "x", "alignment": 20.0, "quality": None}], [], {})
    assert "toy_recovered" not in plain["all"] and "toy_" not in summary_markdown(plain, "# t")


def test_clip_none_scores_no_clip_and_refuses_a_quality_head():
    from stages.evaluate.config import EvaluateConfig
    from stages.evaluate.evaluator import Evaluator, diversity_by_prompt

    evaluator = Evaluator.from_config(EvaluateConfig(clip="none", device="cpu"))
    scores = evaluator.score_images("a ring", [])
    assert math.isnan(scores.alignment) and scores.image_features.shape == (0, 0)
    (div,) = diversity_by_prompt([("a ring", "d", torch.zeros(4, 0)), ("a ring", "d", torch.zeros(4, 0))])
    assert math.isnan(div.diversity)
    with pytest.raises(ValueError, match="aesthetic_head.*evaluate.clip is 'none'"):
        EvaluateConfig(clip="none", aesthetic_head="tiny").validate()
