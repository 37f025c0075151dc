"""Keep a Ray job's dataset: where a relative ``output`` goes when the driver runs in a job.

``ray job submit --working-dir . -- python -m pipeline.run CONFIG`` starts the driver inside
Ray's copy of the working dir (``.../runtime_resources/working_dir_files/_ray_pkg_<hash>/``), a
temporary package deleted with the cluster's session. A relative ``output`` (every shipped
config has one) would land there and be lost. So, in that case only, relative ``output`` and
``work_dir`` are resolved against ``job_output_root`` (default ``~/modedreamer-ray``, like Ray
Train's ``~/ray_results``) and the driver says so before any work. Absolute paths and URIs
are used as given; outside a Ray job nothing changes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.config import PipelineConfig

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor for the driver process: the job's config, runtime env included."""


def job_working_dir(environ: dict[str, str] | None = None) -> str | None:
    """The runtime-env ``working_dir`` of the Ray job this process is the driver of, else None."""
    environ = os.environ if environ is None else environ
    raw = environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    working_dir = runtime_env.get("working_dir")
    return str(working_dir) if working_dir else None


def _is_relative_local(path: str) -> bool:
    return "://" not in path and not Path(path).expanduser().is_absolute()


def resolve_job_output(config: PipelineConfig, environ: dict[str, str] | None = None) -> str | None:
    """Point a relative ``output`` / ``work_dir`` of a Ray-job driver at ``job_output_root``
    (in place); returns the line that says so, or None when nothing changed."""
    working_dir = job_working_dir(environ)
    if working_dir is None:
        return None
    root = Path(config.job_output_root).expanduser()
    changed = []
    if _is_relative_local(config.output):
        given, config.output = config.output, str((root / config.output).resolve())
        changed.append(f"output '{given}' -> {config.output}")
    if config.work_dir is not None and _is_relative_local(config.work_dir):
        given, config.work_dir = config.work_dir, str((root / config.work_dir).resolve())
        changed.append(f"work_dir '{given}' -> {config.work_dir}")
    if not changed:
        return None
    return (
        f"this driver runs in Ray's temporary copy of the working dir ({working_dir}), which is deleted "
        f"with the cluster, so relative paths go under job_output_root={config.job_output_root}: "
        + "; ".join(changed)
        + " (give an absolute path or a URI, e.g. output=s3://bucket/ds, to choose another place)"
    )
