"""The dataset-run config: a structured OmegaConf schema with documented defaults.

``load_config(path, overrides)`` merges a YAML file and dotlist overrides
(``variants=4 method.iterations=3000``) onto :class:`PipelineConfig`, checks every value that
can be checked without a cluster, and raises :class:`ConfigError` naming the bad key or file.
Prompt files named in ``prompts.sources`` are resolved relative to the config file.
Checks that need the cluster (enough CPUs/GPUs) live in :func:`check_resources`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config_input import apply_overrides, check_top_level, name_the_keys
from stages.guidance.runtime import GuidanceRuntime
from stages.models.config import ModelsConfig
from stages.optimize.config import OptimizeConfig

METHOD_PRESETS = ("paper", "tiny")
PROMPT_FORMATS = ("auto", "txt", "jsonl", "json", "csv", "parquet")


class ConfigError(ValueError):
    """A config value, prompt file or resource request is invalid; the message names it."""


@dataclass
class PromptSource:
    """One prompt file. ``txt``: one prompt per line (blank lines and ``#`` comments skipped);
    ``jsonl`` / ``csv`` / ``parquet``: the ``column`` field of each record; ``json``: a list of
    strings or of records with ``column``. ``auto`` picks the format from the file suffix."""

    path: str = "???"
    """File path (relative paths are resolved against the config file's directory) or URI."""
    format: str = "auto"
    column: str = "prompt"
    limit: Optional[int] = None
    """Keep only the first ``limit`` prompts of this file."""


@dataclass
class PromptsConfig:
    sources: list[PromptSource] = field(default_factory=list)
    """Prompt files, each ``{path, format, column, limit}`` (see ``PromptSource``); read in order."""
    inline: list[str] = field(default_factory=list)
    """Prompts written in the config itself; they come after the files' prompts."""


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
    method_preset: str = "paper"
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


def _describe(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"config key '{key}': {first}" if key else first


def build_config(
    base: Any | None = None, overrides: Sequence[str] = (), source: str = "<config>"
) -> DictConfig:
    """Merge ``base`` (dict or DictConfig) and dotlist ``overrides`` onto the schema."""
    base = base if base is not None else {}
    dotlist = OmegaConf.from_dotlist(list(overrides))
    preset = dotlist.get("method_preset", None) or OmegaConf.create(base).get("method_preset", None) or "paper"
    if preset not in METHOD_PRESETS:
        raise ConfigError(f"{source}: config key 'method_preset' must be one of {METHOD_PRESETS}, got '{preset}'")
    method = OptimizeConfig.tiny() if preset == "tiny" else OptimizeConfig()
    schema = OmegaConf.structured(PipelineConfig(method=method))
    try:
        merged = OmegaConf.merge(schema, base)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {_describe(error)}") from None
    merged = apply_overrides(merged, overrides, _describe, ConfigError)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"{source}: config key '{missing[0]}' is required")
    return merged


def load_config(path: str | Path, overrides: Sequence[str] = (), check_models: bool = True) -> PipelineConfig:
    """Read a YAML config, apply dotlist overrides, validate, and return the typed config.

    Relative prompt paths become absolute (against the YAML's directory); the prompt files
    are read once here so a missing or empty one fails before any work starts.
    ``check_models=False`` leaves the model checks to the caller (``--dry-run`` names a missing
    model beside the plan).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as error:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: cannot parse YAML: {error}") from None
    check_top_level(raw, str(path), ConfigError)
    merged = build_config(raw, overrides, source=str(path))
    try:
        config: PipelineConfig = OmegaConf.to_object(merged)
    except (ValueError, OmegaConfBaseException) as error:  # a schema class refusing a value
        raise ConfigError(f"{path}: config key {name_the_keys(str(error), PipelineConfig)}") from None
    for source in config.prompts.sources:
        source.path = _resolve_prompt_path(source.path, path.parent)
    from pipeline.toyworld import resolve_world_path

    config.models.toyworld = resolve_world_path(config.models.toyworld, path.parent)
    validate_config(config, None if check_models else ())
    return config


def _resolve_prompt_path(value: str, base: Path) -> str:
    if "://" in value or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


def _check_fraction(value: float, key: str) -> None:
    # Ray accepts fractional resources only below 1; above 1 they must be whole numbers.
    _require(value >= 0, key, f"must be >= 0, got {value}")
    _require(value < 1 or float(value).is_integer(), key, f"must be < 1 or a whole number, got {value}")


def validate_config(config: PipelineConfig, actors: Sequence[str] | None = None) -> None:
    """Checks that need no cluster; reads the prompt files (so their errors surface now).
    ``actors``: the model actors whose models are checked (default: those the method uses;
    ``()`` for tools that load no model, such as ``pipeline.export``)."""
    from pipeline.components import models_needed
    from pipeline.preflight import preflight  # local: these import this module
    from pipeline.prompts import read_prompts
    from pipeline.toyworld import check_toyworld

    _require(config.variants >= 1, "variants", f"must be >= 1, got {config.variants}")
    _require(config.progress_every_s > 0, "progress_every_s", "must be > 0")
    _require(bool(config.output.strip()), "output", "must not be empty")
    remote = "://" in config.output and not config.output.startswith("file://")
    _require(not remote or config.work_dir is not None, "work_dir", f"required when output is not a local path ({config.output})")
    try:
        config.method.validate()
    except ValueError as error:
        raise ConfigError(f"config key {error}") from None
    res = config.resources
    _require(res.tasks_in_flight >= 1, "resources.tasks_in_flight", f"must be >= 1, got {res.tasks_in_flight}")
    _require(res.task_max_retries >= -1, "resources.task_max_retries", "must be >= -1 (-1: forever)")
    _check_fraction(res.task_num_cpus, "resources.task_num_cpus")
    _check_fraction(res.task_num_gpus, "resources.task_num_gpus")
    _require(res.gpu_memory_gib is None or res.gpu_memory_gib > 0, "resources.gpu_memory_gib", f"must be > 0 or null, got {res.gpu_memory_gib}")
    _require(0 <= res.gpu_memory_headroom < 1, "resources.gpu_memory_headroom", f"must be in [0, 1), got {res.gpu_memory_headroom}")
    for name in ("reference", "ip", "mvd"):
        actor: ActorResources = getattr(res, name)
        key = f"resources.{name}"
        _require(actor.replicas >= 1, f"{key}.replicas", f"must be >= 1, got {actor.replicas}")
        _require(actor.max_batch >= 1, f"{key}.max_batch", f"must be >= 1, got {actor.max_batch}")
        _require(actor.max_wait_ms >= 0, f"{key}.max_wait_ms", f"must be >= 0, got {actor.max_wait_ms}")
        _require(actor.max_restarts >= -1, f"{key}.max_restarts", "must be >= -1 (-1: forever)")
        _require(actor.max_batch_views >= 0, f"{key}.max_batch_views", f"must be >= 0 (0: no bound), got {actor.max_batch_views}")
        _require(actor.vae_chunk >= 1, f"{key}.vae_chunk", f"must be >= 1, got {actor.vae_chunk}")
        _require(actor.unet_rows >= 1, f"{key}.unet_rows", f"must be >= 1, got {actor.unet_rows}")
        _check_fraction(actor.num_cpus, f"{key}.num_cpus")
        _check_fraction(actor.num_gpus, f"{key}.num_gpus")
    for index, source in enumerate(config.prompts.sources):
        key = f"prompts.sources[{index}]"
        _require(source.format in PROMPT_FORMATS, f"{key}.format", f"must be one of {PROMPT_FORMATS}, got '{source.format}'")
        _require(source.limit is None or source.limit >= 1, f"{key}.limit", "must be >= 1 or null")
    _require(config.ray_connect_timeout_s > 0, "ray_connect_timeout_s", "must be > 0")
    needed = models_needed(config.method) if actors is None else tuple(actors)
    check_gpu_visibility(config, needed)
    read_prompts(config.prompts)
    check_toyworld(config, needed)
    preflight(config, needed)


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


def to_yaml(config: PipelineConfig) -> str:
    """The resolved config as YAML (logged with the MLflow parent run)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_container(node: Any) -> Any:
    """A dataclass config (or part of one) as plain dicts/lists, for hashing and logging."""
    return OmegaConf.to_container(OmegaConf.structured(node), resolve=True)
