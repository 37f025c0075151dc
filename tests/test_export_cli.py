"""``python -m pipeline.export``: what it accepts and refuses before any work (the Ray run is in test_pipeline_ray)."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError
from pipeline.export import apply_export, export_digest, main, plan_export, split_overrides
from stages.optimize.config import OptimizeConfig


def test_only_export_settings_and_how_to_run_are_accepted():
    export, run = split_overrides(["method.export.mesh_resolution=96", "export.turntable_frames=30", "resources.tasks_in_flight=2"])
    assert export == ["mesh_resolution=96", "turntable_frames=30"] and run == ["resources.tasks_in_flight=2"]
    with pytest.raises(ConfigError, match="'method.iterations' changes the assets themselves"):
        split_overrides(["method.iterations=10"])
    with pytest.raises(ConfigError, match="'seed'"):
        split_overrides(["seed=3"])


def test_bad_export_values_name_the_key():
    with pytest.raises(ConfigError, match="method.export.turntable_frames"):
        apply_export(OptimizeConfig(), ["turntable_frames=0"])
    with pytest.raises(ConfigError, match="method.export.nosuch"):
        apply_export(OptimizeConfig(), ["nosuch=1"])
    assert export_digest(apply_export(OptimizeConfig(), ["mesh_resolution=64"]).export) != export_digest(OptimizeConfig().export)


def test_a_dataset_without_assets_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no committed assets"):
        plan_export(str(tmp_path), ["method.export.mesh=false"])
    assert main([str(tmp_path), "method.loss=sds"]) == 2


def test_help_shows_usage_and_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m pipeline.export") and "examples:" in out and "method.export.mesh_resolution" in out
