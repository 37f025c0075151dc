"""What live MLflow tracking costs an optimiser iteration, and what the driver's logging sustains.

    python -m benchmarks.tracking [--iterations 200] [--out benchmarks/out/tracking.json]

Task side (what the optimisation pays): the real loop (``optimize_asset``, the quickstart's
tiny NeRF preset at 32², an analytic image-target guidance so no network hides the cost) runs
once with the pipeline's tracking callback (``pipeline.task._progress_callback`` with
``track=True``: curve points batched, one progress-actor call a second, previews PNG-encoded)
and the preview renders it asks for (``method.preview_every``). Measured directly, not as a
difference of two noisy runs: the time spent inside the callback and inside the preview
renders, per iteration, against the median iteration without them. The tiny CPU iteration is
the smallest the pipeline runs, so this fraction is an upper bound for larger scenes.

Driver side (what must keep up): ``Tracker.log_stream`` into the default sqlite store, points
per second for batches like the tasks send (20 metrics x the iterations of one second).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

DEFAULT_OUT = Path("benchmarks/out/tracking.json")


class _LocalProgress:
    """The progress actor's interface, in process: ``report.remote(...)`` calls the state directly."""

    def __init__(self) -> None:
        from pipeline.progress import ProgressState

        self.state = ProgressState()
        self.calls = 0
        outer = self

        class _Method:
            def __init__(self, name: str) -> None:
                self.name = name

            def remote(self, *args: Any, **kwargs: Any) -> None:
                outer.calls += 1
                getattr(outer.state, self.name)(*args, **kwargs)

        self.report = _Method("report")
        self.started = _Method("started")
        self.finished = _Method("finished")


def task_side(iterations: int, preview_every: int) -> dict[str, float]:
    import stages.optimize.loop as loop
    from pipeline.jobs import Job
    from pipeline.task import TaskSpec, _progress_callback
    from stages.guidance.image_target import ImageTargetGuidance, SphereTarget
    from stages.guidance.set import GuidanceSet
    from stages.optimize.config import OptimizeConfig

    method = OptimizeConfig.tiny("nerf")
    method.loss, method.iterations, method.checkpoint_every, method.preview_every = "mvdream", iterations, 0, preview_every
    job = Job("bench-v0-0000000000", "a sphere", 0, 0, 1, 1, "bench")
    progress = _LocalProgress()
    spec = TaskSpec(method=method, output="unused", work_dir="unused", components=None, progress=progress, track=True)
    callback = _progress_callback(job, spec)
    spent = {"callback": 0.0, "preview": 0.0}

    def timed_callback(step: int, metrics: dict[str, float], views: Any) -> None:
        began = time.perf_counter()
        callback(step, metrics, views)
        spent["callback"] += time.perf_counter() - began

    original = loop.render_views

    def timed_render(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent["preview"] += time.perf_counter() - began

    loop.render_views = timed_render
    try:
        with tempfile.TemporaryDirectory() as tmp:
            guidance = GuidanceSet(mvd=ImageTargetGuidance(SphereTarget(radius=0.5)))
            result = loop.optimize_asset(method, guidance, None, 1, Path(tmp), job.prompt, job.asset_id, timed_callback)
    finally:
        loop.render_views = original
    seconds = [h["seconds"] for h in result.history[5:]]  # the loop's own per-iteration timing (excludes the callback)
    iteration_s = statistics.median(seconds)
    per_iteration = (spent["callback"] + spent["preview"]) / iterations
    return {
        "iterations": iterations,
        "preview_every": preview_every,
        "iteration_ms_median": 1000 * iteration_s,
        "callback_us_per_iteration": 1e6 * spent["callback"] / iterations,
        "preview_us_per_iteration": 1e6 * spent["preview"] / iterations,
        "tracking_fraction_of_iteration": per_iteration / iteration_s,
        "progress_calls": progress.calls,
        "points_sent": sum(len(v) for v in progress.state.points.values()),
    }


def driver_side(batches: int, points_per_batch: int, metrics: int) -> dict[str, float]:
    from omegaconf import OmegaConf

    from pipeline.config import build_config
    from pipeline.jobs import make_jobs
    from pipeline.tracking import Tracker

    with tempfile.TemporaryDirectory() as tmp:
        config = OmegaConf.to_object(build_config({"prompts": {"inline": ["a sphere"]}}, [f"output={tmp}/ds", "method_preset=tiny"]))
        tracker = Tracker(config, Path(tmp) / "ds" / ".work", 1)
        job = make_jobs(config, ["a sphere"])[0]
        tracker.start_asset(job)
        now = int(time.time() * 1000)
        values = {f"metric_{i}": float(i) for i in range(metrics)}
        began = time.perf_counter()
        for batch in range(batches):
            points = [(batch * points_per_batch + step, now, values) for step in range(points_per_batch)]
            tracker.log_stream({"points": {job.asset_id: points}})
        seconds = time.perf_counter() - began
    logged = batches * points_per_batch * metrics
    return {"metric_values": logged, "seconds": seconds, "metric_values_per_s": logged / seconds}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from benchmarks.common import environment, format_table, write_json

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tracking", description=__doc__.splitlines()[0],
        epilog="examples:\n  python -m benchmarks.tracking\n  python -m benchmarks.tracking --iterations 60 --out /tmp/tracking.json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--preview-every", type=int, default=100, help="the tiny preset's method.preview_every")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    task = task_side(args.iterations, args.preview_every)
    driver = driver_side(batches=20, points_per_batch=20, metrics=20)
    results = {"environment": environment("cpu"), "task": task, "driver": driver}
    print(format_table([task]))
    print(format_table([driver]))
    write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
