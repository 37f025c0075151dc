"""Cluster capacity: what the model actors reserve, whether a config can ever be placed on a
cluster, how many optimiser tasks fit beside the actors, and the parts left on the CPU.

``cluster`` is ``ray.cluster_resources()`` (``{"CPU": 16.0, "GPU": 1.0, ...}``); ``models_needed``
names the actor kinds the method uses (``reference``, ``ip``, ``mvd``;
:func:`pipeline.components.models_needed`). Every refusal is a ``ConfigError`` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from stages.config_loading import require as _require

if TYPE_CHECKING:  # pipeline.config calls check_gpu_visibility while it validates
    from pipeline.config import ActorResources, PipelineConfig


def actor_reservations(config: PipelineConfig, models_needed: Sequence[str]) -> tuple[float, float]:
    """(CPUs, GPUs) that all replicas of the model actors this method uses reserve together."""
    actors: list[ActorResources] = [getattr(config.resources, name) for name in models_needed]
    return sum(a.replicas * a.num_cpus for a in actors), sum(a.replicas * a.num_gpus for a in actors)


def check_resources(config: PipelineConfig, cluster: dict[str, float], models_needed: Sequence[str]) -> None:
    """Raise when the cluster (``ray.cluster_resources()``) cannot ever place what the config asks.

    ``models_needed`` names the actor kinds this method uses (``reference``, ``ip``, ``mvd``).
    """
    res = config.resources
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    _require(res.task_num_cpus <= cpus, "resources.task_num_cpus", f"{res.task_num_cpus} CPUs per task but the cluster has {cpus}")
    _require(res.task_num_gpus <= gpus, "resources.task_num_gpus", f"{res.task_num_gpus} GPUs per task but the cluster has {gpus}")
    for name in models_needed:
        actor: ActorResources = getattr(res, name)
        _require(actor.num_gpus <= gpus, f"resources.{name}.num_gpus", f"{actor.num_gpus} GPUs per replica but the cluster has {gpus}")
    actor_cpus, actor_gpus = actor_reservations(config, models_needed)
    _require(actor_cpus + res.task_num_cpus <= cpus, "resources", f"actors reserve {actor_cpus} CPUs, leaving less than one task's {res.task_num_cpus} of the cluster's {cpus}")
    _require(actor_gpus + res.task_num_gpus <= gpus, "resources", f"actors reserve {actor_gpus} GPUs, leaving less than one task's {res.task_num_gpus} of the cluster's {gpus}")


@dataclass(frozen=True)
class _GpuShare:
    """One place work runs: its GPU-share key and value, what runs there, and its device setting."""

    key: str
    share: float
    what: str
    device_key: str
    device: str

    @property
    def setting(self) -> str:
        return f"{self.device_key}={self.device}"


def _gpu_shares(config: PipelineConfig, models_needed: Sequence[str]) -> list[_GpuShare]:
    """The optimiser tasks and every model actor the method uses."""
    res = config.resources
    shares = [_GpuShare("resources.task_num_gpus", res.task_num_gpus, "the optimiser tasks", "method.device", str(config.method.device))]
    names = {"reference": "reference sampler", "ip": "IP guidance", "mvd": "MVDream guidance"}
    shares += [
        _GpuShare(f"resources.{n}.num_gpus", getattr(res, n).num_gpus, f"the {names[n]} actor", "models.device", str(config.models.device))
        for n in models_needed
    ]
    return shares


def check_gpu_visibility(config: PipelineConfig, models_needed: Sequence[str]) -> None:
    """Raise when a device setting asks for CUDA where Ray will hide every GPU: a task or actor
    with no GPU share gets ``CUDA_VISIBLE_DEVICES=""``, so ``cuda`` would fail on every asset."""
    for place in _gpu_shares(config, models_needed):
        _require(
            place.share > 0 or not place.device.startswith("cuda"),
            place.key,
            f"is 0, so Ray hides the GPUs from it, but {place.setting}; give it a GPU share or use device auto/cpu",
        )


def cpu_fallback_notes(config: PipelineConfig, cluster: dict[str, float], models_needed: Sequence[str]) -> list[str]:
    """Lines for the driver: parts left on the CPU (``auto`` device, no GPU share) of a cluster that has GPUs."""
    gpus = cluster.get("GPU", 0.0)
    if gpus <= 0:
        return []
    return [
        f"{place.key}=0: {place.what} will run on the CPU ({place.setting}) although the cluster has {gpus:g} GPUs"
        for place in _gpu_shares(config, models_needed)
        if place.share <= 0 and place.device == "auto"
    ]


def tasks_that_fit(config: PipelineConfig, cluster: dict[str, float], models_needed: Sequence[str]) -> int:
    """How many optimiser tasks the cluster can run at once beside the model actors (by their
    CPU/GPU reservations), at most ``resources.tasks_in_flight``."""
    res = config.resources
    reserved_cpus, reserved_gpus = actor_reservations(config, models_needed)
    fits = res.tasks_in_flight
    for kind, per_task, reserved in (("CPU", res.task_num_cpus, reserved_cpus), ("GPU", res.task_num_gpus, reserved_gpus)):
        if per_task > 0:
            # a small epsilon: Ray's fractions are decimal (1/16 GPU fits 16 times in 1 GPU)
            fits = min(fits, int((cluster.get(kind, 0.0) - reserved) / per_task + 1e-9))
    return max(fits, 0)


def capacity_note(config: PipelineConfig, cluster: dict[str, float], models_needed: Sequence[str]) -> str | None:
    """A line for the driver when fewer than ``tasks_in_flight`` tasks fit the cluster now."""
    fits = tasks_that_fit(config, cluster, models_needed)
    res = config.resources
    if fits >= res.tasks_in_flight:
        return None
    return (
        f"the cluster fits {fits} of resources.tasks_in_flight={res.tasks_in_flight} optimiser tasks at once "
        f"({cluster.get('CPU', 0.0):g} CPUs, {cluster.get('GPU', 0.0):g} GPUs; per task "
        f"resources.task_num_cpus={res.task_num_cpus:g}, resources.task_num_gpus={res.task_num_gpus:g}, "
        f"after the model actors' reservations); the others wait for a slot or for the autoscaler"
    )
