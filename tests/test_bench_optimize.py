"""The optimisation benchmark runs at smoke-test size: the rows describe the iterations it ran."""

import json
import statistics

import benchmarks.optimize as bench
from benchmarks.optimize import main


def test_quick_benchmark_times_the_iterations_it_says(tmp_path, capsys, monkeypatch):
    histories = []

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        histories.append(result.history)
        return result

    real = bench.optimize_asset
    monkeypatch.setattr(bench, "optimize_asset", recording)
    out = tmp_path / "optimize.json"
    results = main(["--quick", "--device", "cpu", "--guidance", "excluded", "--out", str(out),
                    "--iterations", "2", "--warmup", "1", "--backprop", "deferred,direct"])
    on_disk = json.loads(out.read_text())
    assert on_disk["rows"] == results["rows"]
    points = [(r["representation"], r["backprop"]) for r in on_disk["rows"]]
    assert points == [(rep, mode) for rep in ("nerf", "splats") for mode in ("deferred", "direct")] and len(histories) == 4
    for row, history in zip(on_disk["rows"], histories):
        # every iteration ran at the row's point; the figures are those of the timed (post-warm-up) ones
        assert len(history) == 3 and {(h["resolution"], h["batch"]) for h in history} == {(16.0, 4.0)}
        assert (row["guidance"], row["resolution"], row["batch"]) == ("excluded", 16, 4)
        timed_ms = [1000.0 * h["seconds"] for h in history[1:]]
        assert row["ms_per_iteration"] == statistics.median(timed_ms) and row["ms_min"] == min(timed_ms)
        assert row["peak_memory_mb"] == max(h["peak_memory_mb"] for h in history) > 0
    assert "iterations_per_s" in capsys.readouterr().out
