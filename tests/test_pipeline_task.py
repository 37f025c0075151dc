"""The optimiser task in-process (no Ray): it commits the asset and hands cached GPU memory back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pipeline_fakes
from pipeline.config import load_config
from pipeline.jobs import make_jobs
from pipeline.prompts import read_prompts
from pipeline.task import GuidanceHandles, TaskSpec, run_asset
from pipeline.writer import DatasetWriter
from stages.guidance.set import GuidanceSet

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@pytest.mark.parametrize("cuda_in_use", [True, False])
def test_task_commits_and_empties_the_cuda_cache_only_where_cuda_ran(tmp_path, monkeypatch, cuda_in_use):
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda_in_use)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    config = load_config(
        QUICKSTART,
        [f"output={tmp_path / 'ds'}", "method.iterations=3", "method.checkpoint_every=0", "tracking.enabled=false"],
    )
    job = make_jobs(config, read_prompts(config.prompts))[0]
    components = pipeline_fakes.fake_components(reference=False)
    spec = TaskSpec(method=config.method, output=config.output, work_dir=str(tmp_path / "work"), components=components)
    # Guidance answered in-process (the fake actor body), as Ray would through a handle.
    handles = GuidanceHandles()
    monkeypatch.setattr(handles, "guidance_set", lambda asset_id: GuidanceSet(ip=components.ip_guidance()))
    result = run_asset(job, None, handles, spec)
    assert result["row"]["status"] == "succeeded" and DatasetWriter(config.output).is_committed(job.asset_id)
    assert result["row"]["files"]["preview"].endswith("preview.png")
    assert emptied == ([True] if cuda_in_use else [])


def test_out_of_memory_is_recorded_with_what_to_change(tmp_path):
    config = load_config(QUICKSTART, [f"output={tmp_path / 'ds'}", "method.iterations=2", "tracking.enabled=false"])
    job = make_jobs(config, read_prompts(config.prompts))[0]

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    components = pipeline_fakes.fake_components(reference=False)
    components = type(components)(**{**components.__dict__, "optimize": out_of_memory})
    spec = TaskSpec(method=config.method, output=config.output, work_dir=str(tmp_path / "work"), components=components)
    row = run_asset(job, None, GuidanceHandles(), spec)["row"]
    assert row["status"] == "failed" and "Tried to allocate 2.00 GiB" in row["error"]
    for key in ("method.schedule.batch_sizes", "resources.tasks_in_flight", "--retry-failed"):
        assert key in row["error"]
    # any other failure gets no such hint
    assert "hint:" not in run_asset(job, None, GuidanceHandles(), TaskSpec(
        method=config.method, output=config.output, work_dir=str(tmp_path / "work2"),
        components=type(components)(**{**components.__dict__, "optimize": lambda *a, **k: 1 / 0}),
    ))["row"]["error"]
