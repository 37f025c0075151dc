"""The optimiser task in-process (no Ray): it commits the asset and hands cached GPU memory back."""

from __future__ import annotations

import json
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
    assert json.loads(result["row"]["files"])["preview"].endswith("preview.png")
    assert emptied == ([True] if cuda_in_use else [])
