"""pipeline.sweep: one validated config per value, each dataset evaluated, a comparison table."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from evaluate_fixtures import TINY_PIPELINE_YAML, build_dataset
from pipeline.config import ConfigError
from pipeline.evaluate import EvaluationRunConfig
from pipeline.sweep import SweepConfig, load_sweep_config, plan_sweep, run_sweep
from stages.evaluate.config import EvaluateConfig
from stages.evaluate.evaluator import Evaluator

REPO = Path(__file__).resolve().parents[1]


def _base(tmp_path: Path) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(TINY_PIPELINE_YAML.replace("ITERATIONS", "1") + "variants: 2\n")
    return path


def test_sweep_runs_each_value_into_its_own_dir_and_compares(tmp_path):
    config = SweepConfig(base=str(_base(tmp_path)), key="method.isd.ip_scale", values=[0.0, 1.0], output=str(tmp_path / "sweep"))
    seen = []
    def fake_run(pipeline_config):
        seen.append((pipeline_config.method.isd.ip_scale, pipeline_config.output))
        radius = 0.3 + 0.4 * pipeline_config.method.isd.ip_scale  # different scenes per value
        build_dataset(Path(pipeline_config.output), [("a red ball", 0, 1, radius), ("a red ball", 1, 1, radius)], pipeline_config.method)

    evaluation = EvaluationRunConfig(evaluate=EvaluateConfig(clip="tiny", aesthetic_head="none", num_views=2, resolution=16, device="cpu"))
    evaluation.tracking.enabled = False
    evaluator = Evaluator.from_config(evaluation.evaluate)
    rows = run_sweep(config, run=fake_run, evaluation=evaluation, evaluator=evaluator, stream=io.StringIO())
    assert seen == [(0.0, str(tmp_path / "sweep" / "ip_scale_0.0")), (1.0, str(tmp_path / "sweep" / "ip_scale_1.0"))]
    saved = json.loads((tmp_path / "sweep" / "comparison.json").read_text())
    assert [r["method.isd.ip_scale"] for r in saved["rows"]] == [0.0, 1.0]
    for row, (_, output) in zip(saved["rows"], seen):
        summaries = sorted((Path(output) / "evaluation").glob("*/summary.json"))
        assert len(summaries) == 1
        summary = json.loads(summaries[0].read_text())["summary"]["all"]
        assert row["alignment"] == pytest.approx(summary["alignment"]) and row["diversity"] == pytest.approx(summary["diversity"])
        assert row["quality"] is None and row["assets"] == 2
    assert rows[0]["alignment"] != rows[1]["alignment"]
    assert "| method.isd.ip_scale |" in (tmp_path / "sweep" / "comparison.md").read_text()


def test_bad_key_or_value_fails_before_any_run(tmp_path):
    base = str(_base(tmp_path))
    with pytest.raises(ConfigError, match="nope"):
        plan_sweep(SweepConfig(base=base, key="method.isd.nope", values=[1.0], output=str(tmp_path)))
    with pytest.raises(ConfigError, match="ip_scale"):
        plan_sweep(SweepConfig(base=base, key="method.isd.ip_scale", values=[0.5, -1.0], output=str(tmp_path)))


def test_shipped_ip_scale_sweep_plans_the_paper_values(monkeypatch):
    # The shipped sweep names hub models; offline, loading it would check (and miss) the local
    # hub cache. Loading a config never downloads.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    config = load_sweep_config(REPO / "configs" / "sweep_ip_scale.yaml")
    runs = plan_sweep(config)
    assert [r.config.method.isd.ip_scale for r in runs] == [0.0, 0.2, 0.5, 0.7, 1.0]
    assert len({r.config.output for r in runs}) == 5
    assert Path(config.evaluate).is_file()


def test_shipped_toyworld_sweep_plans_the_quickstart_per_scale_and_scores_without_clip():
    config = load_sweep_config(REPO / "configs" / "sweep_ip_scale_toyworld.yaml")
    runs = plan_sweep(config)
    assert [r.config.method.isd.ip_scale for r in runs] == [0.0, 0.2, 0.5, 0.7, 1.0]
    assert all(r.config.models.sd == "toyworld" and r.config.method.iterations == 150 for r in runs)
    assert config.evaluate is None and "evaluate.clip=none" in config.evaluate_overrides
