"""A relative ``output`` under ``ray job submit --working-dir`` goes where it outlives the job."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from pipeline.config import build_config
from pipeline.job_output import JOB_CONFIG_ENV, job_working_dir, resolve_job_output

JOB_ENV = {JOB_CONFIG_ENV: json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123abcd.zip"}, "metadata": {}})}


def _config(*dotlist: str):
    return OmegaConf.to_object(build_config({"prompts": {"inline": ["x"]}}, list(dotlist)))


def test_the_job_working_dir_is_read_from_rays_job_config():
    assert job_working_dir(JOB_ENV) == "gcs://_ray_pkg_0123abcd.zip"
    assert job_working_dir({}) is None  # not a Ray job driver
    assert job_working_dir({JOB_CONFIG_ENV: json.dumps({"runtime_env": {}})}) is None  # a job without --working-dir
    assert job_working_dir({JOB_CONFIG_ENV: "{not json"}) is None


def test_relative_paths_of_a_job_driver_go_under_job_output_root(tmp_path):
    config = _config("output=outputs/quickstart", "work_dir=scratch/work", f"job_output_root={tmp_path}/keep")
    note = resolve_job_output(config, JOB_ENV)
    assert config.output == str(tmp_path / "keep" / "outputs" / "quickstart")
    assert config.work_dir == str(tmp_path / "keep" / "scratch" / "work")
    assert "outputs/quickstart" in note and config.output in note and "_ray_pkg_0123abcd" in note


def test_absolute_uri_and_non_job_outputs_are_kept(tmp_path):
    for output in (str(tmp_path / "abs"), "s3://bucket/ds", "file:///data/ds"):
        config = _config(f"output={output}")
        assert resolve_job_output(config, JOB_ENV) is None and config.output == output
    config = _config("output=outputs/quickstart")
    assert resolve_job_output(config, {}) is None and config.output == "outputs/quickstart"
