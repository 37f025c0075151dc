"""What the driver tells the user besides the progress line: what it is doing while nothing
is counted yet (starting Ray, loading the models) and, at the end, where to look."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

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


class ModelsWatch:
    """Says when each model actor has built its model (their ``pid`` answers once ``__init__`` ran)."""

    def __init__(self, actors: dict[str, list[Any]], note: Callable[[str], None]) -> None:
        self.note = note
        self.began = time.monotonic()
        self.pending: dict[Any, str] = {}
        for kind, replicas in actors.items():
            for index, actor in enumerate(replicas):
                self.pending[actor.pid.remote()] = kind if len(replicas) == 1 else f"{kind}[{index}]"
        if self.pending:
            names = ", ".join(sorted(set(self.pending.values())))
            note(f"[pipeline] loading models in their actors: {names} (the first iterations wait for them)")

    def poll(self) -> None:
        if not self.pending:
            return
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
        for ref in ready:
            name = self.pending.pop(ref)
            try:
                ray.get(ref)
            except Exception as error:  # noqa: BLE001 - reported; the run's own error handling decides
                self.note(f"[pipeline] model {name} failed to load: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
                continue
            self.note(f"[pipeline] model {name} ready ({time.monotonic() - self.began:.1f}s)")


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
