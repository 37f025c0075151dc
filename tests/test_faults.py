"""Fault injection (issue #11): every case of the issue, each as a test that reproduces it.

Bad input, model sources and output paths are refused before any work (no Ray); dataset damage
is repaired or named; a run fault (a model actor gone for good, the disk full) stops the run
with one message on a real local Ray head (``test_pipeline_ray.head``) with the fakes of
``pipeline_fakes`` / ``fault_fakes``. The single-fault kill tests (one worker, the IP actor
once, the driver) live in ``test_pipeline_ray.py``; the chaos run is ``test_chaos_run`` here,
out of the default run (``pytest -m chaos tests/test_faults.py``).

New modules are imported inside the tests, so the module also runs against the code before
the fixes and shows which cases failed there.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

import fault_fakes
import pipeline_fakes
from pipeline.config import ConfigError, load_config
from pipeline.jobs import make_jobs
from pipeline.writer import DatasetWriter
from test_pipeline_ray import _wait_for, fake_config, head  # noqa: F401 - `head` is a fixture

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart_tiny.yaml"  # tiny models: the faults are the diffusers side's
TINY_MODELS = [f"models.{k}=tiny" for k in ("sd", "ip_adapter", "image_encoder", "mvdream", "mvdream_text", "reference")]


def write_yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def quick(tmp_path: Path, *overrides: str):
    """The tiny-models quickstart config writing under ``tmp_path``."""
    return load_config(QUICKSTART, [f"output={tmp_path / 'ds'}", *overrides])


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.run", *args], capture_output=True, text=True, timeout=timeout,
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


# =========================================================================== bad input


def test_prompts_parquet_that_is_not_parquet_is_named(tmp_path):
    (tmp_path / "prompts.parquet").write_text("prompt\na red apple\n")  # a CSV with the wrong suffix
    path = write_yaml(tmp_path, f"prompts:\n  sources: [{{path: prompts.parquet}}]\noutput: {tmp_path / 'o'}\n")
    with pytest.raises(ConfigError, match=r"prompts\.parquet.*not a readable Parquet file"):
        load_config(path, TINY_MODELS)


def test_latin1_prompt_file_names_file_line_and_encoding(tmp_path):
    (tmp_path / "p.txt").write_bytes("a red apple\na café chair\n".encode("latin-1"))
    path = write_yaml(tmp_path, f"prompts:\n  sources: [{{path: p.txt}}]\noutput: {tmp_path / 'o'}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, TINY_MODELS)
    message = str(info.value)
    assert "p.txt:2" in message and "UTF-8" in message and "0xe9" in message


def test_yaml_whose_top_level_is_a_list_is_named(tmp_path):
    path = write_yaml(tmp_path, "- prompts: [a red apple]\n- output: somewhere\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: the top level must be a mapping.*got a list"):
        load_config(path)


def test_dotlist_override_inside_prompt_sources(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "b.txt").write_text("four\n")
    path = write_yaml(tmp_path, f"prompts:\n  sources: [{{path: a.txt}}, {{path: b.txt}}]\noutput: {tmp_path / 'o'}\n")
    config = load_config(path, [*TINY_MODELS, "prompts.sources.0.limit=2"])
    assert config.prompts.sources[0].limit == 2 and config.prompts.sources[1].limit is None
    assert config.prompts.sources[1].path.endswith("b.txt")
    with pytest.raises(ConfigError, match=r"prompts\.sources\[0\]\.limit.*>= 1"):
        load_config(path, [*TINY_MODELS, "prompts.sources.0.limit=0"])
    with pytest.raises(ConfigError, match=r"'prompts\.sources' has 2 entries"):
        load_config(path, [*TINY_MODELS, "prompts.sources.5.limit=1"])


def test_schedule_resolutions_error_names_the_config_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        quick(tmp_path, "method.schedule.resolutions=[32]")
    assert "method.schedule.resolutions" in str(info.value) and "ScheduleConfig" not in str(info.value)


# =========================================================================== models before Ray


@pytest.mark.parametrize(
    "override, key",
    [
        ("models.sd=not a model id", "models.sd"),
        ("models.sd=/no/such/dir/sd15", "models.sd"),
        ("models.mvdream=./missing/mvdream.pt", "models.mvdream"),
        ("models.dtype=float64", "models.dtype"),
        ("models.device=tpu", "models.device"),
        ("method.device=tpu", "method.device"),
    ],
)
def test_model_that_cannot_load_is_found_at_config_load(tmp_path, override, key):
    with pytest.raises(ConfigError) as info:
        quick(tmp_path, override)
    assert key in str(info.value)


def test_offline_hub_id_not_in_the_cache_names_the_key_and_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as info:
        quick(tmp_path, "models.reference=someone/not-cached")
    message = str(info.value)
    assert "models.reference" in message and "HF_HUB_OFFLINE" in message and "local" in message
    # online, a hub id is not looked up (that would download): the run awaits the actors instead
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert quick(tmp_path, "models.reference=someone/not-cached").models.reference == "someone/not-cached"


def test_model_directory_without_its_files_is_named(tmp_path):
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(ConfigError, match=r"models\.sd.*model_index\.json"):
        quick(tmp_path, f"models.sd={tmp_path / 'empty-model'}")
    with pytest.raises(ConfigError, match=r"models\.mvdream.*mvdream\.json"):
        quick(tmp_path, f"models.mvdream={tmp_path / 'empty-model'}")
    # the method decides which keys count: MVDream is not loaded without the MVDream term
    quick(tmp_path, f"models.mvdream={tmp_path / 'empty-model'}", "method.mvd.enabled=false")


def test_preflight_marker_matches_the_mvdream_loader():
    from pipeline.preflight import MARKER_FILE
    from stages.models.mvdream import MARKER_FILE as LOADER_MARKER

    assert MARKER_FILE == LOADER_MARKER


def test_dry_run_refuses_a_bad_model_in_seconds(tmp_path):
    began = time.monotonic()
    result = run_cli(str(QUICKSTART), f"output={tmp_path / 'ds'}", "models.sd=/no/such/dir", "--dry-run")
    assert result.returncode == 2 and result.stderr.count("Traceback") == 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # the plan is printed beside it
    assert len(errors) == 1 and "models.sd" in errors[0] and result.stderr.rstrip().endswith(errors[0])
    assert time.monotonic() - began < 60


# =========================================================================== output paths


def test_output_that_is_an_existing_file_is_named(tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"'output'.*taken.*not a directory"):
        load_config(QUICKSTART, [f"output={tmp_path / 'taken'}"])
    with pytest.raises(ConfigError, match=r"'output'.*taken.*is a file"):
        load_config(QUICKSTART, [f"output={tmp_path / 'taken' / 'ds'}"])


CHECK_AS_NOBODY = """
import sys
sys.path.insert(0, {repo!r})
from pipeline.config import ConfigError, load_config
try:
    load_config({config!r}, ["output={output}"])
    print("accepted")
except ConfigError as error:
    print("refused:", error)
"""


@pytest.mark.parametrize("which", ["directory", "parent"])
def test_unwritable_output_is_named_at_config_load(which):
    """As an unprivileged user (root writes anywhere): an output directory, or the parent it
    would be created in, that the user cannot write is named when the config loads."""
    top = Path(tempfile.mkdtemp(prefix="faults-", dir="/tmp"))
    try:
        top.chmod(0o755)
        locked = top / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        config = top / "run.yaml"
        config.write_text(
            "prompts:\n  inline: [a red apple]\n"
            "models: {sd: tiny, ip_adapter: tiny, image_encoder: tiny, mvdream: tiny, mvdream_text: tiny, reference: tiny}\n"
        )
        config.chmod(0o644)
        output = locked if which == "directory" else locked / "ds"
        script = CHECK_AS_NOBODY.format(repo=str(REPO), config=str(config), output=output)
        if os.geteuid() == 0:
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", script]
        else:
            cmd = [sys.executable, "-c", script]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(top)})
        assert result.stdout.startswith("refused:"), result.stdout + result.stderr
        assert "'output'" in result.stdout and str(locked) in result.stdout and "not writable" in result.stdout
    finally:
        shutil.rmtree(top, ignore_errors=True)


# =========================================================================== Ray address


def test_unreachable_ray_address_waits_a_bounded_time_and_says_so(tmp_path, monkeypatch):
    from pipeline.run import connect_ray

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = quick(tmp_path, f"ray_address=127.0.0.1:{port}", "ray_connect_timeout_s=3")
    assert not ray.is_initialized()
    began = time.monotonic()
    with pytest.raises(ConfigError) as info:
        connect_ray(config)
    elapsed = time.monotonic() - began
    assert 2.0 <= elapsed < 15.0
    assert "ray_address" in str(info.value) and f"127.0.0.1:{port}" in str(info.value)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="RAY_ADDRESS"):
        connect_ray(config)


# =========================================================================== prompt lists


def test_duplicates_after_stripping_are_merged_and_counted(tmp_path):
    from pipeline.prompts import read_prompt_list

    config = quick(tmp_path, "prompts.inline=['a red apple','  a red apple ','a blue chair','a red apple']")
    prompt_list = read_prompt_list(config.prompts)
    assert prompt_list.prompts == ["a red apple", "a blue chair"] and prompt_list.duplicates == 2
    assert "2 duplicates merged" in prompt_list.note()


def test_txt_splits_on_newlines_only(tmp_path):
    from pipeline.prompts import read_prompts

    (tmp_path / "p.txt").write_text("one\u2028two\nthree\x1cfour\r\nfive\x0bsix\n", encoding="utf-8")
    config = quick(tmp_path, f"prompts.sources=[{{path: {tmp_path / 'p.txt'}}}]", "prompts.inline=[]")
    assert read_prompts(config.prompts) == ["one\u2028two", "three\x1cfour", "five\x0bsix"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "one\u2028two"}\n{"prompt": "three"}\n', encoding="utf-8")
    config = quick(tmp_path, f"prompts.sources=[{{path: {tmp_path / 'p.jsonl'}}}]", "prompts.inline=[]")
    assert read_prompts(config.prompts) == ["one\u2028two", "three"]


def test_blank_entries_are_skipped_and_counted_in_every_format(tmp_path):
    from pipeline.prompts import read_prompt_list

    prompts = ["a cat", "  ", "a hat", ""]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n")
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    with open(tmp_path / "p.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt"])
        writer.writerows([[p] for p in prompts])
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "p.parquet")
    for name in ("p.txt", "p.jsonl", "p.json", "p.csv", "p.parquet"):
        config = quick(tmp_path, f"prompts.sources=[{{path: {tmp_path / name}}}]", "prompts.inline=[]")
        prompt_list = read_prompt_list(config.prompts)
        assert (prompt_list.prompts, prompt_list.blank) == (["a cat", "a hat"], 2), name
    config = quick(tmp_path, "prompts.inline=['a cat','','a hat']")
    prompt_list = read_prompt_list(config.prompts)
    assert (prompt_list.prompts, prompt_list.blank) == (["a cat", "a hat"], 1)
    assert "1 blank entry skipped" in prompt_list.note()


def test_dry_run_says_how_many_prompts_were_merged_and_skipped(tmp_path):
    result = run_cli(str(QUICKSTART), f"output={tmp_path / 'ds'}", "prompts.inline=['a cat',' a cat','','a hat']", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "1 duplicate merged" in result.stderr and "1 blank entry skipped" in result.stderr


def _manifest_row(asset_id: str, prompt: str, status: str = "succeeded", finished_at: str = "2026-01-01T00:00:00") -> dict:
    return {
        "asset_id": asset_id, "prompt": prompt, "prompt_index": 0, "variant": 0, "reference_seed": 1, "seed": 2,
        "method": "isd", "representation": "nerf", "config_digest": "x", "status": status, "error": None,
        "asset_dir": f"assets/{asset_id}", "files": "{}", "metrics": "{}", "iterations": 1, "duration_s": 1.0,
        "started_at": finished_at, "finished_at": finished_at, "mlflow_run_id": None,
    }


def test_control_bytes_never_reach_the_gallery_html_raw(tmp_path):
    from pipeline.gallery import build_gallery

    prompt = "a mug\x00 with\x1b[31m red\x7f text\x85"
    DatasetWriter(str(tmp_path)).write_manifest([_manifest_row("mug-v0-1", prompt)])
    gallery = build_gallery(str(tmp_path))
    for page in [gallery / "index.html", *gallery.rglob("*.html")]:
        text = page.read_text(encoding="utf-8")
        assert not any(ch in text for ch in "\x00\x1b\x7f\x85"), page
    index = (gallery / "index.html").read_text(encoding="utf-8")
    assert "\u2400" in index and "\u241b" in index  # NUL and ESC shown as ␀ and ␛


# =========================================================================== dataset on disk


def committed_dataset(tmp_path: Path, prompts: list[str], parts: int = 1) -> tuple[object, list]:
    """A dataset of committed assets made in-process (no Ray), its rows in ``parts`` shards."""
    from stages.guidance.set import GuidanceSet
    from pipeline.task import GuidanceHandles, TaskSpec, run_asset

    config = fake_config(tmp_path / "ds", prompts, **{"variants": 1})
    jobs = make_jobs(config, prompts)
    components = pipeline_fakes.fake_components(reference=False)
    spec = TaskSpec(method=config.method, output=config.output, work_dir=str(tmp_path / "ds" / ".work"), components=components)
    handles = GuidanceHandles()
    guidance = components.ip_guidance()
    handles.guidance_set = lambda asset_id: GuidanceSet(ip=guidance)
    rows = [run_asset(job, None, handles, spec)["row"] for job in jobs]
    writer = DatasetWriter(config.output)
    for index in range(parts):
        writer.write_manifest(rows[index::parts])
    return config, jobs


def _truncate(part: str) -> None:
    data = Path(part).read_bytes()
    Path(part).write_bytes(data[: len(data) // 2])


def test_truncated_manifest_part_is_named_in_dry_run_and_set_aside_by_the_gallery(tmp_path, capsys):
    from pipeline.gallery import build_gallery
    from pipeline.run import describe_plan

    config, jobs = committed_dataset(tmp_path, ["a lamp", "a kite", "a drum", "a vase"], parts=2)
    writer = DatasetWriter(config.output)
    damaged = writer.manifest_parts()[0]
    _truncate(damaged)
    todo = describe_plan(config, sys.stderr)
    err = capsys.readouterr().err
    assert todo == [] and Path(damaged).name in err and "damaged" in err
    assert Path(damaged).is_file()  # a dry run moves nothing

    gallery = build_gallery(config.output)
    err = capsys.readouterr().err
    assert Path(damaged).name in err and "rebuilt from their asset.json" in err
    assert not Path(damaged).exists() and (Path(config.output) / "damaged" / "manifest" / Path(damaged).name).is_file()
    index = (gallery / "index.html").read_text()
    assert all(job.asset_id in index for job in jobs)
    assert set(DatasetWriter(config.output).latest_rows()) == {job.asset_id for job in jobs}


def test_checksums_are_recorded_and_verify_names_a_damaged_asset(tmp_path, capsys):
    from pipeline.integrity import verify_assets
    from pipeline.run import describe_plan

    config, jobs = committed_dataset(tmp_path, ["a lamp", "a kite"])
    writer = DatasetWriter(config.output)
    record = writer.read_record(jobs[0].asset_id)
    assert set(record["checksums"]) >= {"checkpoint.pt", "preview.png", "metrics.json"}
    assert all(value.startswith("sha256:") for value in record["checksums"].values())
    assert verify_assets(writer).damaged == {}
    (Path(config.output) / "assets" / jobs[0].asset_id / "checkpoint.pt").write_bytes(b"garbage")
    report = verify_assets(writer)
    assert report.damaged == {jobs[0].asset_id: ["checkpoint.pt checksum differs"]} and report.checked == 2
    describe_plan(config, sys.stderr, verify=True)
    assert f"damaged {jobs[0].asset_id}: checkpoint.pt checksum differs" in capsys.readouterr().err


def test_disk_full_in_a_task_is_a_run_fault_with_the_root_cause_first(tmp_path, monkeypatch):
    """torch's writer reports a full disk as "[enforce fail at inline_container.cc:672] ...
    unexpected pos" with no errno; with (simulated) no free space left, the task raises a run
    fault whose first words are the root cause, instead of recording its asset as failed."""
    import pipeline.faults as faults
    from pipeline.task import GuidanceHandles, TaskSpec, run_asset

    config = fake_config(tmp_path / "ds", ["a lamp"], **{"variants": 1})
    job = make_jobs(config, ["a lamp"])[0]

    def torch_disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    components = fault_fakes.components(optimize=torch_disk_full)
    spec = TaskSpec(method=config.method, output=config.output, work_dir=str(tmp_path / "work"), components=components)
    row = run_asset(job, None, GuidanceHandles(), spec)["row"]  # plenty of space: an asset failure
    assert row["status"] == "failed" and "inline_container" in row["error"]
    monkeypatch.setattr(faults, "free_bytes", lambda path: 1024)
    with pytest.raises(faults.RunFaultError) as info:
        run_asset(job, None, GuidanceHandles(), spec)
    assert str(info.value).startswith("No space left on device")
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/manifest/.part.tmp")
    assert faults.disk_full_cause(RuntimeError("wrapped").with_traceback(None)) is None
    wrapped = RuntimeError("export failed")
    wrapped.__cause__ = enospc
    assert faults.disk_full_cause(wrapped).startswith("No space left on device writing /data/manifest/.part.tmp")


def test_disk_full_on_the_driver_is_one_line_naming_the_root_cause(tmp_path, monkeypatch, capsys):
    import pipeline.run as run

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(run, "run_dataset", full)
    assert run.main([str(QUICKSTART), f"output={tmp_path / 'ds'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: No space left on device")


# =========================================================================== runs on Ray


@pytest.fixture(scope="module")
def ray_head(head):
    ray.cloudpickle.register_pickle_by_value(fault_fakes)
    return head


def _alive(head: dict, class_name: str) -> list:
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")], address=head["dashboard"])


def _parent_run(out: Path, run_id: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_run(run_id)


def test_unbuildable_model_stops_the_run_before_any_asset(ray_head, tmp_path):
    from pipeline.faults import RunStopped
    from pipeline.run import run_dataset

    out = tmp_path / "ds"
    config = fake_config(out, ["a lamp", "a kite", "a drum"], **{"tracking.enabled": "true"})
    stream = _Stream()
    with pytest.raises(RunStopped) as info:
        run_dataset(config, fault_fakes.components(ip_guidance=fault_fakes.unbuildable_guidance), stream=stream)
    reason = info.value.reason
    assert "IP guidance" in reason and reason.count("models.sd") == 1 and "nobody/no-such-model" in reason
    summary = info.value.summary
    assert (summary.succeeded, summary.failed) == (0, 0) and summary.attempts == {}  # no asset started
    assert DatasetWriter(str(out)).manifest_rows() == []  # nothing marked failed
    assert stream.text.count("nobody/no-such-model") == 0  # the reason is said once, by the caller
    parent = _parent_run(out, summary.parent_run_id)
    assert parent.info.status == "FAILED" and "models.sd" in parent.data.tags["end_reason"]
    assert _alive(ray_head, "IPGuidanceActor") == []  # actors shut down

    again = run_dataset(config, pipeline_fakes.fake_components(reference=False))  # a plain rerun runs them all
    assert (again.succeeded, again.failed, again.skipped_failed) == (6, 0, 0)


class _Stream:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_model_actor_out_of_restarts_stops_the_run_and_loses_nothing(ray_head, tmp_path):
    """The IP actor killed twice with ``max_restarts=1``: the run starts nothing more, marks
    nothing failed, still writes the gallery, closes the MLflow run as FAILED with the reason and
    stops its actors; ``finally`` does not raise over the real error; a plain rerun completes."""
    from pipeline.faults import RunStopped
    from pipeline.run import run_dataset

    out = tmp_path / "ds"
    prompts = ["a lamp", "a kite", "a drum", "a vase"]
    config = fake_config(out, prompts, **{"tracking.enabled": "true", "method.iterations": 60, "resources.ip.max_restarts": 1})
    kills: list[int] = []

    def killer():
        _wait_for(lambda: list((out / "assets").glob("*/asset.json")), timeout=120)
        for _ in range(2):
            actor = _wait_for(lambda: [a for a in _alive(ray_head, "IPGuidanceActor") if a.pid not in kills], timeout=60)[0]
            kills.append(actor.pid)
            os.kill(actor.pid, signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    with pytest.raises(RunStopped) as info:
        run_dataset(config, pipeline_fakes.fake_components(step_s=0.05, reference=False), stream=_Stream())
    thread.join(10)
    assert len(kills) == 2
    reason = info.value.reason
    assert "IP guidance" in reason and "resources.ip.max_restarts=1" in reason
    summary = info.value.summary
    rows = DatasetWriter(str(out)).latest_rows()
    assert summary.failed == 0 and all(row["status"] == "succeeded" for row in rows.values())
    assert 1 <= summary.succeeded < 8 and len(rows) == summary.succeeded
    assert sorted(os.listdir(out / "assets")) == sorted(rows)
    index = (out / "gallery" / "index.html").read_text()
    assert all(asset_id in index for asset_id in rows)
    parent = _parent_run(out, summary.parent_run_id)
    assert parent.info.status == "FAILED" and "max_restarts" in parent.data.tags["end_reason"]
    assert _alive(ray_head, "IPGuidanceActor") == []

    again = run_dataset(config, pipeline_fakes.fake_components(reference=False), stream=_Stream())
    assert again.skipped_failed == 0 and again.failed == 0 and again.succeeded + again.skipped_done == 8
    assert len(DatasetWriter(str(out)).manifest_rows()) == 8


def test_disk_full_stops_the_run_instead_of_failing_every_asset(ray_head, tmp_path):
    from pipeline.faults import RunStopped
    from pipeline.run import run_dataset

    out = tmp_path / "ds"
    flag = tmp_path / "disk-is-full"
    flag.touch()
    config = fake_config(out, ["a lamp", "a kite", "a drum", "a vase"])
    with pytest.raises(RunStopped) as info:
        run_dataset(config, fault_fakes.disk_full_components(flag), stream=_Stream())
    assert info.value.reason.startswith("No space left on device")
    summary = info.value.summary
    assert summary.failed == 0 and len(summary.attempts) <= config.resources.tasks_in_flight  # the rest never started
    assert DatasetWriter(str(out)).manifest_rows() == []
    flag.unlink()  # space freed: a plain rerun makes everything
    again = run_dataset(config, fault_fakes.disk_full_components(flag), stream=_Stream())
    assert (again.succeeded, again.failed, again.skipped_failed) == (8, 0, 0)


def test_truncated_manifest_part_is_repaired_by_the_run(ray_head, tmp_path):
    from pipeline.run import run_dataset

    config, jobs = committed_dataset(tmp_path, ["a lamp", "a kite", "a drum"], parts=3)
    damaged = DatasetWriter(config.output).manifest_parts()[1]
    _truncate(damaged)
    stream = _Stream()
    summary = run_dataset(config, pipeline_fakes.fake_components(reference=False), stream=stream)
    assert summary.skipped_done == 3 and summary.succeeded == 0
    lines = [line for line in stream.text.splitlines() if Path(damaged).name in line]
    assert len(lines) == 1 and "rebuilt from their asset.json" in lines[0]
    assert (Path(config.output) / "damaged" / "manifest" / Path(damaged).name).is_file()
    assert len(DatasetWriter(config.output).manifest_rows()) == 3


def test_deleted_asset_directory_is_redone_and_keeps_one_manifest_row(ray_head, tmp_path):
    from pipeline.run import run_dataset

    out = tmp_path / "ds"
    config = fake_config(out, ["a lamp", "a kite"])
    run_dataset(config, pipeline_fakes.fake_components(reference=False), stream=_Stream())
    victim = sorted(os.listdir(out / "assets"))[0]
    before = DatasetWriter(str(out)).latest_rows()[victim]["finished_at"]
    shutil.rmtree(out / "assets" / victim)
    summary = run_dataset(config, pipeline_fakes.fake_components(reference=False), stream=_Stream())
    assert (summary.succeeded, summary.skipped_done) == (1, 3)
    rows = DatasetWriter(str(out)).manifest_rows()
    assert len(rows) == 4 and len({row["asset_id"] for row in rows}) == 4
    assert next(row for row in rows if row["asset_id"] == victim)["finished_at"] > before


def test_verify_requeues_a_damaged_asset(ray_head, tmp_path):
    from pipeline.integrity import verify_assets
    from pipeline.run import run_dataset

    config, jobs = committed_dataset(tmp_path, ["a lamp", "a kite"])
    victim = jobs[1].asset_id
    (Path(config.output) / "assets" / victim / "checkpoint.pt").write_bytes(b"garbage")
    plain = run_dataset(config, pipeline_fakes.fake_components(reference=False), stream=_Stream())
    assert plain.skipped_done == 2  # without --verify a damaged file goes unnoticed
    stream = _Stream()
    summary = run_dataset(config, pipeline_fakes.fake_components(reference=False), stream=stream, verify=True)
    assert (summary.succeeded, summary.skipped_done) == (1, 1)
    assert f"damaged {victim}: checkpoint.pt checksum differs" in stream.text
    assert list((Path(config.output) / "damaged" / "assets").glob(f"{victim}-*/checkpoint.pt"))
    assert verify_assets(DatasetWriter(config.output)).damaged == {}
    assert len(DatasetWriter(config.output).manifest_rows()) == 2


# =========================================================================== security (deploy/)


def test_postgres_password_is_not_on_the_mlflow_command_line():
    import yaml

    compose = yaml.safe_load((REPO / "deploy" / "mlflow" / "docker-compose.yaml").read_text())
    mlflow = compose["services"]["mlflow"]
    command = " ".join([*mlflow.get("entrypoint", []), *mlflow["command"]])
    assert "POSTGRES_PASSWORD" not in command and "mlflow:${" not in command
    assert not any("PASSWORD" in str(value) and "POSTGRES" in key for key, value in mlflow["environment"].items())
    assert compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "postgres_password" in mlflow["secrets"] and "/run/secrets/postgres_password" in command


def test_mlflow_default_permission_is_none_and_said_so():
    import configparser

    text = (REPO / "deploy" / "mlflow" / "basic_auth.ini").read_text()
    parser = configparser.ConfigParser()
    parser.read_string(text)
    assert parser["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert "NO_PERMISSIONS" in (REPO / "deploy" / "README.md").read_text()


def test_plain_http_tracking_uri_is_documented_with_its_remedy():
    rayjob = (REPO / "deploy" / "kuberay" / "rayjob.yaml").read_text()
    assert "tracking.tracking_uri=http://" in rayjob
    assert "in the clear" in rayjob and "TLS" in rayjob and "mTLS" in rayjob


def test_include_dashboard_says_which_ports_listen_where():
    from pipeline.config import LocalRayConfig
    from pipeline.config_reference import field_docs

    doc = field_docs(LocalRayConfig)["include_dashboard"]
    assert "127.0.0.1" in doc and "all interfaces" in doc and "token" in doc


# =========================================================================== chaos (opt-in)


@pytest.mark.chaos
def test_chaos_run(tmp_path):
    """``benchmarks.chaos`` at its defaults: 16 assets, a kill every ~20 s (workers, the IP,
    MVDream and reference actors) and the driver once, then the rerun. Every asset is committed
    exactly once; the redone work stays bounded by the checkpoint interval; MLflow ends with one
    child run per committed asset and no run left RUNNING (the killed driver's parent is closed
    as KILLED by the rerun)."""
    from benchmarks.chaos import main

    result = main(["--workdir", str(tmp_path / "chaos"), "--out", str(tmp_path / "chaos.json")])
    assert result["ok"], result["checks"]
    kills = result["kills_by_target"]
    assert kills["driver"] == 1 and sum(kills.values()) >= 4, kills
    assert 1.0 <= result["work_redone"] < 1.5, result["work_redone"]
    mlflow = result["mlflow"]
    assert not mlflow.get("running") and mlflow.get("exactly_one_child_run_each"), mlflow
