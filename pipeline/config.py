"""The dataset-run config: a structured OmegaConf schema with documented defaults.

``load_config(path, overrides)`` merges a YAML file and dotlist overrides
(``variants=4 method.iterations=3000``) onto :class:`PipelineConfig` with
:mod:`stages.config_loading`, checks every value that can be checked without a cluster, and
raises :class:`ConfigError` naming the bad key or file. Prompt files named in
``prompts.sources`` are resolved relative to the config file. Checks that need the cluster
(enough CPUs/GPUs) live in :mod:`pipeline.capacity`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from pipeline.capacity import check_gpu_visibility
from pipeline.components import models_needed
from pipeline.preflight import preflight
from pipeline.prompts import PromptsConfig, read_prompts
from pipeline.toyworld import check_toyworld, resolve_world_path
from stages.config_loading import Choice, ConfigError, merge_config, read_yaml, require, to_object
from stages.guidance.runtime import GuidanceRuntime
from stages.models.config import ModelsConfig
from stages.optimize.config import OptimizeConfig

__all__ = ["ConfigError", "PipelineConfig", "build_config", "load_config", "validate_config"]


class MethodPreset(Choice):
    """Defaults the ``method`` keys start from."""

    paper = "paper"
    tiny = "tiny"


@dataclass
class ActorResources:
    """One model actor kind: how many copies, on what, and how it batches requests."""

    replicas: int = 1
    """Copies of this model actor; each asset talks to one replica (its registration lives there)."""
    num_cpus: float = 0.0
    """CPUs reserved per replica (0: the actor is not counted against the tasks' CPUs)."""
    num_gpus: float = 0.0
    """GPUs per replica; a fraction (< 1) packs several replicas/actors on one GPU."""
    max_batch: int = 8
    """Largest number of requests answered by one model call."""
    max_batch_views: int = 0
    """Guidance actors: largest number of renders (views, summed over the requests) in one batch;
    0: bounded by ``max_batch`` alone. A request larger than the bound is answered alone."""
    max_wait_ms: float = 10.0
    """How long the first request of a batch waits for more before the forward runs."""
    max_restarts: int = 3
    """Ray restarts a dead replica this many times (its clients re-register their assets)."""
    vae_chunk: int = GuidanceRuntime.vae_chunk
    """Guidance actors: images whose VAE-encoder graph is held at once (~1.5 GiB each at 512² in
    fp16): requests are sliced into whole views (MVDream: whole 4-view groups) and answered in
    passes of at most this many images, with no extra FLOPs; only an MVDream group larger than
    this is re-encoded chunk by chunk for its input gradient."""
    unet_rows: int = GuidanceRuntime.unet_rows
    """Guidance actors: largest UNet batch of one forward (ISD rows are 4 per view, ``ip_null`` 2,
    MVDream 2); a pass with more rows runs several forwards."""
    compile: bool = False
    """Guidance actors: ``torch.compile`` the UNet and the VAE encoder (batch sizes are padded to
    power-of-two buckets, so each compiles a bounded number of times; the first calls are slow)."""


@dataclass
class ResourcesConfig:
    tasks_in_flight: int = 4
    """Optimiser tasks (assets) running at once."""
    task_num_cpus: float = 1.0
    """CPUs reserved per optimiser task (fractions below 1 share a core between tasks)."""
    task_num_gpus: float = 0.0
    """GPU fraction per optimiser task (renders and Adam run there)."""
    task_max_retries: int = 3
    """Ray re-runs an optimiser task whose worker died; it resumes from its checkpoint."""
    gpu_memory_gib: Optional[float] = None
    """Memory of one GPU to plan against (GiB); null: detected (NVML on the driver, or on each GPU
    node of the cluster). The run is refused before any model loads when the memory plan
    (``python -m benchmarks.memory CONFIG``) does not fit."""
    gpu_memory_headroom: float = 0.1
    """Fraction of each GPU's memory the plan keeps free (allocator fragmentation, kernel
    workspaces, anything the plan does not measure)."""
    reference: ActorResources = field(default_factory=lambda: ActorResources(max_batch=4))
    ip: ActorResources = field(default_factory=ActorResources)
    mvd: ActorResources = field(default_factory=ActorResources)


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log the run to MLflow: a parent run per dataset run, a nested child run per asset."""
    tracking_uri: Optional[str] = None
    """MLflow tracking URI; default ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<output>/mlflow.db``
    (local outputs; its artifacts in ``<output>/mlartifacts``). Only the driver talks to MLflow."""
    experiment: str = "modedreamer-ray"
    """MLflow experiment name (created when missing)."""


@dataclass
class LocalRayConfig:
    """Used only when ``pipeline.run`` starts its own Ray (no ``RAY_ADDRESS`` / ``ray_address``)."""

    num_cpus: Optional[int] = None
    """CPUs of the local Ray (default: all)."""
    include_dashboard: bool = True
    """Start the dashboard. Only its web UI listens on 127.0.0.1; Ray's other ports (GCS, raylet,
    object manager, workers, dashboard agent) listen on all interfaces whether or not the
    dashboard runs, protected by Ray's token authentication, which Ray 2.60 turns on for the
    local Ray that ``ray.init`` starts unless ``RAY_AUTH_MODE`` is set (``RAY_AUTH_MODE=disabled``
    leaves those ports open to anyone who can reach the machine)."""


@dataclass
class PipelineConfig:
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    variants: int = 1
    """Assets per prompt; each variant has its own reference-image seed."""
    seed: int = 0
    """Base seed; every asset's reference and optimiser seeds are derived from it."""
    method_preset: MethodPreset = MethodPreset.paper
    """Defaults the ``method`` keys start from: ``paper`` (OptimizeConfig()) | ``tiny``
    (OptimizeConfig.tiny(): CPU-sized scene, 32² renders, small exports)."""
    method: OptimizeConfig = field(default_factory=OptimizeConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    output: str = "outputs/dataset"
    """Dataset root: a local path or a pyarrow filesystem URI (``file://``, ``s3://``, ...)."""
    work_dir: Optional[str] = None
    """Checkpoints of unfinished assets (must be reachable from every node); default
    ``<output>/.work`` for local outputs."""
    job_output_root: str = "~/modedreamer-ray"
    """Where a relative ``output`` / ``work_dir`` goes when the driver runs in a Ray job's temporary
    working-dir copy (``ray job submit --working-dir``), which is deleted with the cluster:
    ``<job_output_root>/<output>`` on the driver's node. Outside a Ray job, relative paths are
    relative to the current directory."""
    ray_address: Optional[str] = None
    """Ray cluster to join; ``RAY_ADDRESS`` wins when set; neither: start a local Ray."""
    ray_connect_timeout_s: float = 30.0
    """How long to wait for ``RAY_ADDRESS`` / ``ray_address`` to answer before giving up."""
    local_ray: LocalRayConfig = field(default_factory=LocalRayConfig)
    retry_failed: bool = False
    """Redo assets recorded as failed (also ``--retry-failed``)."""
    progress_every_s: float = 5.0
    """Seconds between the driver's progress lines (assets done / failed / in flight, it/s, ETA)."""
    gallery: bool = True
    """Write ``<output>/gallery`` (static pages of every asset) at the end of a run, and log it
    as an artifact of the dataset's parent MLflow run; ``python -m pipeline.gallery`` does it on demand."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def build_config(
    base: Any | None = None, overrides: Sequence[str] = (), source: str = "<config>"
) -> DictConfig:
    """Merge ``base`` (dict or DictConfig) and dotlist ``overrides`` onto the schema whose
    ``method`` starts from the ``method_preset`` they name."""
    base = base if base is not None else {}
    preset = OmegaConf.from_dotlist(list(overrides)).get("method_preset", None) or OmegaConf.create(base).get("method_preset", None)
    preset = MethodPreset.parse(preset or MethodPreset.paper, "method_preset")
    method = OptimizeConfig.tiny() if preset == MethodPreset.tiny else OptimizeConfig()
    return merge_config(PipelineConfig(method=method), base, overrides=overrides, source=source)


def load_config(path: str | Path, overrides: Sequence[str] = (), check_models: bool = True) -> PipelineConfig:
    """Read a YAML config, apply dotlist overrides, validate, and return the typed config.

    Relative prompt paths become absolute (against the YAML's directory); the prompt files
    are read once here so a missing or empty one fails before any work starts.
    ``check_models=False`` leaves the model checks to the caller (``--dry-run`` names a missing
    model beside the plan).
    """
    path = Path(path)
    config: PipelineConfig = to_object(build_config(read_yaml(path), overrides, source=str(path)), str(path))
    for source in config.prompts.sources:
        source.path = _resolve_prompt_path(source.path, path.parent)
    config.models.toyworld = resolve_world_path(config.models.toyworld, path.parent)
    validate_config(config, None if check_models else ())
    return config


def _resolve_prompt_path(value: str, base: Path) -> str:
    if "://" in value or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def _check_fraction(value: float, key: str) -> None:
    # Ray accepts fractional resources only below 1; above 1 they must be whole numbers.
    require(value >= 0, key, f"must be >= 0, got {value}")
    require(value < 1 or float(value).is_integer(), key, f"must be < 1 or a whole number, got {value}")


def validate_config(config: PipelineConfig, actors: Sequence[str] | None = None) -> None:
    """Checks that need no cluster; reads the prompt files (so their errors surface now).
    ``actors``: the model actors whose models are checked (default: those the method uses;
    ``()`` for tools that load no model, such as ``pipeline.export``)."""
    require(config.variants >= 1, "variants", f"must be >= 1, got {config.variants}")
    require(config.progress_every_s > 0, "progress_every_s", "must be > 0")
    require(bool(config.output.strip()), "output", "must not be empty")
    remote = "://" in config.output and not config.output.startswith("file://")
    require(not remote or config.work_dir is not None, "work_dir", f"required when output is not a local path ({config.output})")
    try:
        config.method.validate()
    except ValueError as error:
        raise ConfigError(f"config key {error}") from None
    res = config.resources
    require(res.tasks_in_flight >= 1, "resources.tasks_in_flight", f"must be >= 1, got {res.tasks_in_flight}")
    require(res.task_max_retries >= -1, "resources.task_max_retries", "must be >= -1 (-1: forever)")
    _check_fraction(res.task_num_cpus, "resources.task_num_cpus")
    _check_fraction(res.task_num_gpus, "resources.task_num_gpus")
    require(res.gpu_memory_gib is None or res.gpu_memory_gib > 0, "resources.gpu_memory_gib", f"must be > 0 or null, got {res.gpu_memory_gib}")
    require(0 <= res.gpu_memory_headroom < 1, "resources.gpu_memory_headroom", f"must be in [0, 1), got {res.gpu_memory_headroom}")
    for name in ("reference", "ip", "mvd"):
        actor: ActorResources = getattr(res, name)
        key = f"resources.{name}"
        require(actor.replicas >= 1, f"{key}.replicas", f"must be >= 1, got {actor.replicas}")
        require(actor.max_batch >= 1, f"{key}.max_batch", f"must be >= 1, got {actor.max_batch}")
        require(actor.max_wait_ms >= 0, f"{key}.max_wait_ms", f"must be >= 0, got {actor.max_wait_ms}")
        require(actor.max_restarts >= -1, f"{key}.max_restarts", "must be >= -1 (-1: forever)")
        require(actor.max_batch_views >= 0, f"{key}.max_batch_views", f"must be >= 0 (0: no bound), got {actor.max_batch_views}")
        require(actor.vae_chunk >= 1, f"{key}.vae_chunk", f"must be >= 1, got {actor.vae_chunk}")
        require(actor.unet_rows >= 1, f"{key}.unet_rows", f"must be >= 1, got {actor.unet_rows}")
        _check_fraction(actor.num_cpus, f"{key}.num_cpus")
        _check_fraction(actor.num_gpus, f"{key}.num_gpus")
    for index, source in enumerate(config.prompts.sources):
        require(source.limit is None or source.limit >= 1, f"prompts.sources[{index}].limit", "must be >= 1 or null")
    require(config.ray_connect_timeout_s > 0, "ray_connect_timeout_s", "must be > 0")
    needed = models_needed(config.method) if actors is None else tuple(actors)
    check_gpu_visibility(config, needed)
    read_prompts(config.prompts)
    check_toyworld(config, needed)
    preflight(config, needed)


def to_yaml(config: PipelineConfig) -> str:
    """The resolved config as YAML (logged with the MLflow parent run)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_container(node: Any) -> Any:
    """A dataclass config (or part of one) as plain dicts/lists, for hashing and logging."""
    return OmegaConf.to_container(OmegaConf.structured(node), resolve=True, enum_to_str=True)
