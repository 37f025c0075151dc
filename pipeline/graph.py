"""The shape of a dataset run, in one place.

::

    job ──► ReferenceActor.sample(prompt, reference_seed)        (batched over assets)
     │                 │
     └────────────────►▼
               optimise task (run_asset)  ──grad──►  IPGuidanceActor ×replicas   (batched)
               one per asset, many at once ──grad──►  MVDreamGuidanceActor ×replicas
                       │
                       ▼ committed asset + manifest row

The model actors are long-lived and shared by every asset, so they are created once and
each asset's two calls chain on them: ``graph.submit(job)`` asks a reference replica for the
image and hands its ObjectRef to the optimise task, which Ray starts once the image exists, and
returns the ObjectRef of the asset's result. The two Ray tasks carry the asset's id in their names (``reference[<asset_id>]``, ``optimise[<asset_id>]``), so the
dashboard's task list says which asset each one is. Optimiser tasks talk to the
guidance actors through handles passed as arguments (``GuidanceHandles``) because each task
calls them thousands of times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray

from pipeline.actors import IPGuidanceActor, MVDreamGuidanceActor, ReferenceActor
from pipeline.components import Components
from pipeline.config import ActorResources, PipelineConfig
from pipeline.jobs import Job
from pipeline.progress import ProgressActor
from pipeline.task import GuidanceHandles, TaskSpec, run_asset

optimise_asset = ray.remote(run_asset)
"""The optimiser task; resources and retries are set per run in :func:`build_graph`."""


def _actor_options(resources: ActorResources, retry_calls: bool) -> dict[str, Any]:
    return {
        "num_cpus": resources.num_cpus,
        "num_gpus": resources.num_gpus,
        "max_restarts": resources.max_restarts,
        # Reference samples are idempotent: Ray re-sends them to a restarted actor. Guidance
        # calls are retried by the client, which must re-register the asset first.
        "max_task_retries": resources.max_restarts if retry_calls else 0,
        "max_concurrency": 1000,
    }


def task_name(stage: str, job: Job) -> str:
    """The Ray task name of one stage of one asset (what the dashboard lists)."""
    return f"{stage}[{job.asset_id}]"


@dataclass
class Graph:
    """The model actors of one run and how one asset's calls chain over them."""

    task_options: dict[str, Any]
    """The optimiser task's resources and retries in this run."""
    handles: GuidanceHandles
    spec: TaskSpec
    reference: list[Any] = field(default_factory=list)
    ip: list[Any] = field(default_factory=list)
    mvd: list[Any] = field(default_factory=list)
    progress: Any = None
    _submitted: int = 0

    def submit(self, job: Job) -> ray.ObjectRef:
        """Start one asset: reference sample → optimise task, both named after the asset;
        reference replicas take turns."""
        image = None
        if self.reference:
            sampler = self.reference[self._submitted % len(self.reference)]
            image = sampler.sample.options(name=task_name("reference", job)).remote(job.prompt, job.reference_seed)
        self._submitted += 1
        task = optimise_asset.options(**self.task_options, name=task_name("optimise", job))
        return task.remote(job, image, self.handles, self.spec)

    def model_actors(self) -> dict[str, list[Any]]:
        """The model actors by kind (``reference``, ``ip``, ``mvd``)."""
        return {kind: actors for kind, actors in (("reference", self.reference), ("ip", self.ip), ("mvd", self.mvd)) if actors}

    def actor_stats(self) -> dict[str, list[dict[str, float]]]:
        """Batching statistics of every model actor, by kind ({} for an actor that is gone)."""
        return {kind: [_stats(actor) for actor in actors] for kind, actors in self.model_actors().items()}

    def shutdown(self) -> None:
        for actor in [*self.reference, *self.ip, *self.mvd, self.progress]:
            if actor is not None:
                ray.kill(actor)


def _stats(actor: Any) -> dict[str, float]:
    try:
        return ray.get(actor.stats.remote(), timeout=30)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return {}


def build_graph(config: PipelineConfig, components: Components, work_dir: str) -> Graph:
    """Create the model actors and the graph one asset runs through, for ``config``."""
    res = config.resources

    def replicas(actor_class: Any, factory: Any, resources: ActorResources, retry_calls: bool, *extra: Any) -> list[Any]:
        if factory is None:
            return []
        options = _actor_options(resources, retry_calls)
        return [
            actor_class.options(**options).remote(factory, resources.max_batch, resources.max_wait_ms, *extra)
            for _ in range(resources.replicas)
        ]

    reference = replicas(ReferenceActor, components.reference_sampler, res.reference, True)
    ip = replicas(IPGuidanceActor, components.ip_guidance, res.ip, False, res.ip.max_batch_views)
    mvd = replicas(MVDreamGuidanceActor, components.mvd_guidance, res.mvd, False, res.mvd.max_batch_views)
    progress = ProgressActor.remote()

    handles = GuidanceHandles(ip=ip, mvd=mvd)
    spec = TaskSpec(
        method=config.method,
        output=config.output,
        work_dir=work_dir,
        components=components,
        progress=progress,
        track=config.tracking.enabled,
    )
    task_options = {"num_cpus": res.task_num_cpus, "num_gpus": res.task_num_gpus, "max_retries": res.task_max_retries}
    return Graph(task_options=task_options, handles=handles, spec=spec, reference=reference, ip=ip, mvd=mvd, progress=progress)
