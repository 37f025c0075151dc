"""The driver's console: one line redrawn in place on a terminal, a line every N seconds in logs,
an ETA that counts the exports left, and an end that says how to browse the result."""

from __future__ import annotations

import io

from omegaconf import OmegaConf

from pipeline.config import build_config
from pipeline.console import browse_lines
from pipeline.progress import ProgressPrinter, ProgressState


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_logs_get_a_line_every_n_seconds(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("pipeline.progress.time.monotonic", lambda: clock[0])
    stream = io.StringIO()
    printer = ProgressPrinter(2, 10, every_s=5.0, stream=stream)
    for second in range(12):
        clock[0] = 100.0 + second
        printer.update({"iterations": second, "running": {}})
    printer.update({"iterations": 20, "running": {}}, force=True)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and all(line.startswith("[pipeline] assets ") for line in lines)  # t=0, 5, 10, forced
    assert "\r" not in stream.getvalue()


def test_a_terminal_gets_one_line_redrawn_in_place():
    stream = _Terminal()
    printer = ProgressPrinter(2, 10, every_s=5.0, stream=stream)
    for iterations in range(0, 20, 2):
        printer.update({"iterations": iterations, "running": {}})
    printer.note("[pipeline] model ip ready (3.0s)")  # a message does not break the line
    printer.update({"iterations": 20, "running": {}}, force=True)
    text = stream.getvalue()
    assert text.count("\r") >= 10 and text.count("\n") <= 3
    assert "model ip ready" in text and "iterations 20/20" in text.rsplit("\r", 1)[-1]


def test_eta_counts_the_iterations_and_exports_left():
    printer = ProgressPrinter(4, 100, parallel=2)
    assert printer.eta_seconds(10, [], now=0.0) == (None, False)  # the first iteration seen: no rate yet
    running = {"a": 60, "b": 50}
    eta, complete = printer.eta_seconds(110, [], now=10.0, running=running)
    assert (eta, complete) == ((4 * 100 - 110) / 10.0, False)  # 10 it/s; exports not measured yet
    assert "+ export (not measured yet)" in printer.line(110, 10.0, [], 0, running)
    printer.done = 1
    eta, complete = printer.eta_seconds(210, [4.0, 6.0], now=20.0, running={"b": 100})
    left_iterations = 3 * 100 - 100
    assert complete and eta == left_iterations / 10.0 + 5.0 * 3 / 2  # mean export 5 s, 3 left, 2 at a time


def test_progress_state_hands_points_and_previews_over_once():
    state = ProgressState()
    state.started("a", 1)
    state.report("a", 3, 10, points=[(0, 1, {"loss": 1.0})], previews=[(2, 1, b"png")])
    state.report("a", 4, 10, points=[(3, 2, {"loss": 0.5})])
    state.export_started("a")
    state.export_finished("a")
    drained = state.drain()
    assert drained == {"points": {"a": [(0, 1, {"loss": 1.0}), (3, 2, {"loss": 0.5})]}, "previews": {"a": [(2, 1, b"png")]}}
    assert state.drain() == {"points": {}, "previews": {}}
    snapshot = state.snapshot()
    assert snapshot["iterations"] == 4 and len(snapshot["export_seconds"]) == 1


def test_the_end_names_the_gallery_and_the_mlflow_command(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = OmegaConf.to_object(build_config({"prompts": {"inline": ["x"]}}, [f"output={tmp_path}/qs"]))
    assert browse_lines(config, "7") == [
        f"  gallery: {tmp_path}/qs/gallery/index.html",
        f"  MLflow runs: cd {tmp_path}/qs && mlflow ui --backend-store-uri sqlite:///mlflow.db"
        "  (then open http://127.0.0.1:5000/#/experiments/7?workflowType=machine_learning)",
    ]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000/")
    assert browse_lines(config, "7")[1] == "  MLflow runs: open http://mlflow.internal:5000/#/experiments/7?workflowType=machine_learning"
