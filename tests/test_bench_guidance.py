"""The guidance benchmark runs in its quick mode and writes a JSON with positive numbers."""

from __future__ import annotations

import json

from benchmarks.common import format_table
from benchmarks.guidance import main


def test_quick_benchmark_writes_json(tmp_path, capsys):
    out = tmp_path / "guidance.json"
    returned = main(["--quick", "--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(returned))
    assert data["model"] == "tiny" and data["environment"]["device"] == "cpu"
    assert [row["batch"] for row in data["unet_throughput"]] == [1, 4]
    for row in data["unet_throughput"]:
        assert row["seconds"] > 0 and row["predictions_per_s"] > 0
        assert abs(row["predictions_per_s"] * row["seconds"] - row["batch"]) < 1e-6 * row["batch"]
    (isd,) = data["isd_one_vs_four"]
    assert isd["views"] == 1 and isd["one_forward_s"] > 0 and isd["four_forwards_s"] > 0
    assert abs(isd["speedup"] - isd["four_forwards_s"] / isd["one_forward_s"]) < 1e-9
    printed = capsys.readouterr().out
    assert "predictions_per_s" in printed and str(out) in printed


def test_format_table_aligns_columns():
    table = format_table([{"a": 1, "b": 0.123456}, {"a": 100, "b": 2.0}], ["a", "b"])
    lines = table.splitlines()
    assert lines[0].split() == ["a", "b"] and lines[2].split() == ["1", "0.1235"]
    assert len({len(line) for line in lines}) == 1
