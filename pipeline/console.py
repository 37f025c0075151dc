"""What the driver tells the user besides the progress line: the Ray it runs on and, at the
end, where to look (model loading is announced by ``faults.ModelWatch.wait_ready``)."""

from __future__ import annotations

from pathlib import Path

import ray

from pipeline.config import PipelineConfig


def describe_cluster(started_s: float, dashboard: str | None) -> str:
    """One line about the Ray this driver is connected to."""
    resources = ray.cluster_resources()
    where = ""
    if dashboard:
        where = f", dashboard {dashboard if dashboard.startswith('http') else 'http://' + dashboard}"
    return (
        f"Ray ready in {started_s:.1f}s: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs, "
        f"{len(ray.nodes())} node(s){where}"
    )


def browse_lines(config: PipelineConfig, experiment_id: str | None = None) -> list[str]:
    """How to look at the result: the gallery's path and the exact command that shows the MLflow
    runs (with the URL that opens the experiment in MLflow 3's model-training view)."""
    from pipeline.tracking import browse_command, tracking_uri_of

    lines = []
    if config.gallery and "://" not in config.output:
        lines.append(f"  gallery: {Path(config.output).expanduser().resolve() / 'gallery' / 'index.html'}")
    elif config.gallery:
        lines.append(f"  gallery: {config.output.rstrip('/')}/gallery/index.html")
    if config.tracking.enabled:
        uri = tracking_uri_of(config)
        remote = uri.startswith(("http://", "https://"))
        server = uri.rstrip("/") if remote else "http://127.0.0.1:5000"
        page = f"{server}/#/experiments/{experiment_id}?workflowType=machine_learning" if experiment_id else server
        lines.append(f"  MLflow runs: open {page}" if remote else f"  MLflow runs: {browse_command(uri)}  (then open {page})")
    return lines
