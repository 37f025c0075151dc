"""`python -m stages.toy2d` on a tiny setting: the PNG loads, the JSON is complete and consistent."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from stages import toy2d
from teacher_fixtures import one_thread  # noqa: F401  (autouse: one intra-op thread)


def test_toy2d_writes_plot_and_tables(tmp_path, capsys):
    toy2d.main(["--out", str(tmp_path), "--draws", "40", "--seeds", "3", "--steps", "20"])
    assert "wrote" in capsys.readouterr().out

    with Image.open(tmp_path / "toy2d.png") as image:
        image.load()
        assert image.size[0] > 300 and image.size[1] > 200

    result = json.loads((tmp_path / "toy2d.json").read_text())
    assert set(result) >= {"config", "mode_means", "mode_weights", "variance_table", "optimisation", "seconds"}
    config = result["config"]
    assert (config["draws"], config["seeds"], config["steps"]) == (40, 3, 20)
    rows = result["variance_table"]
    assert len(rows) == len(config["tilts"]) * len(config["timesteps"])
    assert {(r["tilt"], r["t"]) for r in rows} == {(a, t) for a in config["tilts"] for t in config["timesteps"]}
    for r in rows:
        identity = r["var_ip_sds"] + r["var_sds"] - 2 * r["cov_ip_sds_sds"]
        assert r["var_isd"] == pytest.approx(identity, rel=1e-4, abs=1e-12)
        assert r["isd_below_ip_sds"] == (r["var_isd"] < r["var_ip_sds"])
        assert r["isd_below_ip_sds_predicted"] == (r["corr"] > r["corr_threshold"])
        assert r["isd_below_sds_predicted"] == (r["corr"] > r["corr_threshold_sds"])
        assert r["isd_below_sds"] == (r["var_isd"] < r["var_sds"])
        assert -1.0 - 1e-9 <= r["corr"] <= 1.0 + 1e-9
        for name in ("sds", "ip_sds", "isd"):
            assert r[f"snr_{name}"] >= 0 and r[f"norm_{name}"] > 0
    assert set(result["optimisation"]) == {*toy2d.METHODS, "isd_unbounded"}
    for per_ref in result["optimisation"].values():
        assert set(per_ref) == {"0", "1", "2", "3"}
        for outcome in per_ref.values():
            assert sum(outcome["mode_counts"]) == 3
    table = (tmp_path / "toy2d.md").read_text()
    assert table.count("\n| ") >= len(rows) + 20


def test_toy2d_module_entry_point_help():
    done = subprocess.run(
        [sys.executable, "-m", "stages.toy2d", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "--out" in done.stdout
