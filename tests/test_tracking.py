"""MLflow tracking without Ray: a child run per asset from start to end, streamed curves and
previews, re-attach and repair after a killed driver, a store that moves with the dataset."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from PIL import Image

from pipeline.config import build_config
from pipeline.jobs import make_jobs
from pipeline.run import work_dir_of
from pipeline.tracking import (
    ARTIFACTS_DIR, EXPERIMENT_KIND_TAG, MAX_POINTS_PER_CURVE, MODEL_TRAINING, PREVIEW_KEY, THUMBNAIL_ARTIFACT, Tracker,
    browse_command, curve_point, default_tracking_uri, git_commit, open_client, run_params,
)
from pipeline.writer import ASSET_RECORD, DatasetWriter, utc_now


def _config(out: Path, *overrides: str):
    from omegaconf import OmegaConf

    dotlist = [f"output={out}", "method_preset=tiny", "method.iterations=6", "variants=2", *overrides]
    return OmegaConf.to_object(build_config({"prompts": {"inline": ["a red apple"]}}, dotlist))


def _png(color=(200, 10, 10), size=(64, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _tracker(config) -> Tracker:
    return Tracker(config, work_dir_of(config, DatasetWriter(config.output)), total_jobs=2)


def _commit(config, job, run_id: str | None) -> dict:
    """A committed asset as the optimiser task leaves it (asset.json, preview.png), no manifest row."""
    writer = DatasetWriter(config.output)
    staged = writer.staging_dir(job.asset_id)
    (staged / "preview.png").write_bytes(_png())
    now = utc_now()
    record = {
        "asset_id": job.asset_id, "prompt": job.prompt, "prompt_index": job.prompt_index, "variant": job.variant,
        "reference_seed": job.reference_seed, "seed": job.seed, "method": "isd", "representation": "nerf",
        "config_digest": job.config_digest, "status": "succeeded", "error": None, "asset_dir": f"assets/{job.asset_id}",
        "files": json.dumps({"preview": f"assets/{job.asset_id}/preview.png"}), "metrics": json.dumps({"loss": 0.5}),
        "iterations": 6, "duration_s": 3.0, "started_at": now, "finished_at": now, "mlflow_run_id": run_id,
    }
    (staged / ASSET_RECORD).write_text(json.dumps(record))
    assert writer.commit(job.asset_id, staged)
    return record


def test_the_store_is_movable_and_the_experiment_is_model_training(tmp_path):
    config = _config(tmp_path / "ds")
    tracker = _tracker(config)
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    assert experiment.artifact_location.startswith("mlflow-artifacts:/")  # no absolute path in the store
    parent = tracker.parent_id
    assert (tmp_path / "ds" / ARTIFACTS_DIR).is_dir() and any((tmp_path / "ds" / ARTIFACTS_DIR).rglob("config.yaml"))
    tracker.finish({"succeeded": 0})
    # move the whole dataset: the store and its artifacts still work from the new place
    shutil.move(tmp_path / "ds", tmp_path / "moved")
    client = open_client(default_tracking_uri(str(tmp_path / "moved")))
    assert client.download_artifacts(parent, "config.yaml", str(tmp_path)) and "method_preset" in (tmp_path / "config.yaml").read_text()
    assert browse_command(default_tracking_uri(str(tmp_path / "moved"))) == f"cd {tmp_path / 'moved'} && mlflow ui --backend-store-uri sqlite:///mlflow.db"


def test_git_commit_is_a_commit_or_absent(tmp_path):
    sha, _ = git_commit()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True).stdout.strip()
    assert sha is None or (re.fullmatch(r"[0-9a-f]{40}", sha) and sha == head)
    copy = tmp_path / "pkg"
    shutil.copytree(Path(__file__).resolve().parents[1] / "pipeline", copy / "pipeline")
    assert git_commit(copy) == (None, False)  # a copy without .git (a Ray job's working dir): no tag
    tracker = _tracker(_config(tmp_path / "ds"))
    tags = tracker.client.get_run(tracker.parent_id).data.tags
    assert tags.get("mlflow.source.git.commit") == sha  # the real commit, or not set at all


def test_parent_params_name_only_the_chosen_representation(tmp_path):
    nerf = run_params(_config(tmp_path / "a"), 2)
    splats = run_params(_config(tmp_path / "b", "method.representation=splats"), 2)
    assert any(k.startswith("method.nerf.") for k in nerf) and not any(k.startswith("method.splats.") for k in nerf)
    assert any(k.startswith("method.splats.") for k in splats) and not any(k.startswith("method.nerf.") for k in splats)


def test_curve_points_are_bounded_per_curve():
    steps = [p[0] for s in range(6000) if (p := curve_point(s, 6000, {"loss": 1.0, "step": s, "bad": float("nan")}))]
    assert len(steps) <= MAX_POINTS_PER_CURVE + 1 and steps[-1] == 5999 and steps[0] == 0
    step, stamp, values = curve_point(0, 10, {"loss": 1.0, "step": 0.0, "bad": float("nan")})
    assert values == {"loss": 1.0} and abs(stamp / 1000 - time.time()) < 5


def test_child_run_lives_from_start_to_end_with_streamed_curves_and_previews(tmp_path):
    config = _config(tmp_path / "ds")
    tracker = _tracker(config)
    job = make_jobs(config, ["a red apple"])[0]
    began = time.time()
    run_id = tracker.start_asset(job)
    run = tracker.client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["mlflow.parentRunId"] == tracker.parent_id
    assert run.data.params["asset_id"] == job.asset_id and run.data.params["config_digest"] == job.config_digest
    assert abs(run.info.start_time / 1000 - began) < 5
    points = [curve_point(s, 6, {"loss": 1.0 / (s + 1)}) for s in range(3)]
    tracker.log_stream({"points": {job.asset_id: points}, "previews": {job.asset_id: [(2, points[2][1], _png())]}})
    time.sleep(0.05)
    tracker.log_stream({"points": {job.asset_id: [curve_point(s, 6, {"loss": 1.0 / (s + 1)}) for s in range(3, 6)]}})
    history = tracker.client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(6)) and history[-1].timestamp > history[0].timestamp
    images = [f.path for f in tracker.client.list_artifacts(run_id, "images")]
    assert any(path.startswith(f"images/{PREVIEW_KEY}+step+2+") and path.endswith(".png") for path in images)
    record = _commit(config, job, run_id)
    assert tracker.finish_asset(record, DatasetWriter(config.output)) == run_id
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["final/loss"] == 0.5
    artifacts = {f.path for f in tracker.client.list_artifacts(run_id)}
    assert THUMBNAIL_ARTIFACT in artifacts and "preview.png" not in artifacts  # the asset files stay in the dataset


def test_rerun_after_a_killed_driver_closes_reattaches_and_repairs(tmp_path):
    config = _config(tmp_path / "ds")
    first = _tracker(config)
    jobs = make_jobs(config, ["a red apple"])
    resumed = first.start_asset(jobs[0])
    finished_unclosed = first.start_asset(jobs[1])
    _commit(config, jobs[1], finished_unclosed)  # committed, but the driver died before closing its run
    stale = first.parent_id
    # ... the driver is killed here: nothing is closed ...
    second = _tracker(config)
    assert second.stale_parent == stale
    assert second.client.get_run(stale).info.status == "KILLED"
    assert second.client.get_run(resumed).info.status == "KILLED"
    writer = DatasetWriter(config.output)
    assert second.repair(writer) == []  # the committed asset's run exists: finished, not re-created
    assert second.client.get_run(finished_unclosed).info.status == "FINISHED"
    assert second.start_asset(jobs[0]) == resumed  # re-attached, not duplicated
    run = second.client.get_run(resumed)
    assert run.info.status == "RUNNING" and run.data.tags["mlflow.parentRunId"] == second.parent_id
    runs = second.client.search_runs([second.experiment_id], "tags.asset_id != ''")
    assert sorted(r.data.tags["asset_id"] for r in runs) == sorted(j.asset_id for j in jobs)


def test_repair_recreates_a_missing_child_run_from_asset_json(tmp_path):
    config = _config(tmp_path / "ds")
    job = make_jobs(config, ["a red apple"])[0]
    _commit(config, job, None)  # an asset recovered from asset.json had no run at all
    tracker = _tracker(config)
    writer = DatasetWriter(config.output)
    (changed,) = tracker.repair(writer)
    run = tracker.client.get_run(changed["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["asset_id"] == job.asset_id and run.data.tags["recovered_from"] == "asset.json"
    assert json.loads((tmp_path / "ds" / "assets" / job.asset_id / ASSET_RECORD).read_text())["mlflow_run_id"] == run.info.run_id
    writer.write_manifest([changed])
    assert tracker.repair(writer) == []  # once repaired, nothing more to do
    assert len(tracker.client.search_runs([tracker.experiment_id], "tags.asset_id != ''")) == 1


def test_a_driver_that_stops_closes_the_runs_of_assets_in_flight(tmp_path):
    config = _config(tmp_path / "ds")
    tracker = _tracker(config)
    job = make_jobs(config, ["a red apple"])[0]
    run_id = tracker.start_asset(job)
    tracker.finish({"succeeded": 0}, "KILLED", "KeyboardInterrupt: ")  # Ctrl-C: the finally block
    assert tracker.client.get_run(run_id).info.status == "KILLED"
    assert tracker.client.get_run(tracker.parent_id).data.tags["end_reason"] == "KeyboardInterrupt: "
    again = _tracker(config)
    assert again.stale_parent is None  # closed properly: nothing stale
    assert again.start_asset(job) == run_id  # and the asset's run is re-attached on the rerun
