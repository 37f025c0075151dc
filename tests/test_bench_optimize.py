"""The optimisation benchmark runs at smoke-test size and writes a well-formed JSON table."""

import json
import math

from benchmarks.optimize import main


def test_quick_benchmark_writes_rows_for_each_representation(tmp_path, capsys):
    out = tmp_path / "optimize.json"
    results = main(["--quick", "--device", "cpu", "--guidance", "excluded", "--out", str(out),
                    "--iterations", "1", "--warmup", "1"])
    on_disk = json.loads(out.read_text())
    assert on_disk["rows"] == results["rows"]
    assert {r["representation"] for r in on_disk["rows"]} == {"nerf", "splats"}
    for row in on_disk["rows"]:
        assert row["guidance"] == "excluded" and row["resolution"] == 16 and row["batch"] == 4
        assert row["iterations_per_s"] > 0 and math.isclose(row["iterations_per_s"] * row["ms_per_iteration"], 1000.0)
        assert row["peak_memory_mb"] > 0
    assert "iterations_per_s" in capsys.readouterr().out
