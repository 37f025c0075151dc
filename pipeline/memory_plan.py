"""The GPU memory plan of a dataset run: every process, the GPU Ray puts it on, the sum per GPU.

Processes (each with its own CUDA context):

- each optimiser task, phase by phase of the method's schedule, from
  ``stages.optimize.memory.task_memory(method)`` (one row per phase: parameter, gradient,
  optimiser, frame and graph bytes and the peak; measured on CPU with the real shapes); a task
  may be in any phase, so it counts at its largest peak;
- each replica of each model actor the method uses, at the biggest call its bounds allow
  (``max_batch`` requests, at most ``max_batch_views`` views, no more than the tasks in flight;
  answered in passes of ``vae_chunk`` images and UNet forwards of ``unet_rows`` rows): weights at
  their dtype plus the peak of live tensors, measured on the meta device with the real code
  (:mod:`stages.guidance.memory`, cached in its shipped table).

Placement: on a node, Ray gives a fractional GPU request the GPU it fits best (the least share
left after it), a whole number untouched GPUs; actors are created before the tasks, in the order
reference, IP, MVDream. The plan packs in that order on one node of as many GPUs as needed (or
the cluster's count): as dense as Ray packs, the worst case for memory (across nodes Ray may
spread processes, which only lowers a GPU's sum). The plan needs no weights and no GPU, so
``--dry-run`` prints it anywhere; the run refuses, before any model loads, a plan whose sum on a
GPU passes its memory minus ``resources.gpu_memory_headroom``, naming the keys to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence, TextIO

from pipeline.components import models_needed
from pipeline.config import ActorResources, ConfigError, PipelineConfig
from stages.models.factory import uses_toyworld
from stages.optimize.config import OptimizeConfig

if TYPE_CHECKING:  # stages.guidance.memory imports diffusers: loaded when a plan is made, not with pipeline.run
    from stages.guidance.memory import ActorSpec

GIB = 2**30
CONTEXT_BYTES = 512 * 2**20
"""Allowance per process for its CUDA context and cuBLAS/cuDNN handles (CUDA 12 with lazy module
loading: a few hundred MiB on an H100; not measurable on CPU, so an assumption that
benchmarks/RESULTS.md §3 checks against nvidia-smi)."""
SHARE_UNITS = 10_000
"""Ray counts GPU fractions in 1/10000."""
TaskMemoryFn = Callable[[OptimizeConfig], Sequence[Any]]
ACTOR_ORDER = ("reference", "ip", "mvd")
"""Creation order of the actor kinds in ``pipeline.graph.build_graph``."""
ACTOR_NAMES = {"reference": "reference sampler", "ip": "IP guidance", "mvd": "MVDream guidance"}


def default_task_memory() -> TaskMemoryFn | None:
    """``stages.optimize.memory.task_memory`` (the optimiser task's measured memory), when present."""
    try:
        from stages.optimize.memory import task_memory
    except ImportError:
        return None
    return task_memory


TASK_FIELDS = ("parameter_bytes", "gradient_bytes", "optimizer_bytes", "frame_bytes", "graph_bytes", "peak_bytes")
"""What the plan reads from each row of ``task_memory`` (``stages.optimize.memory.TaskMemory``)."""


@dataclass(frozen=True)
class TaskPhase:
    """Bytes of one optimiser task in one phase of its schedule (a ``task_memory`` row)."""

    label: str
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    frame_bytes: int
    graph_bytes: int
    peak_bytes: int


@dataclass
class Process:
    """One process of the plan: a task or an actor replica."""

    name: str
    kind: str
    share: float
    peak: int | None
    """Peak device bytes including the CUDA context; None when unknown (task memory not modelled)."""
    parts: dict[str, int] = field(default_factory=dict)
    detail: str = ""

    @property
    def known_bytes(self) -> int:
        return self.peak if self.peak is not None else sum(self.parts.values())


@dataclass
class MemoryPlan:
    """Processes, their placement (``gpus[i]``: what runs on GPU i) and the task phases."""

    processes: list[Process]
    gpus: list[list[Process]]
    on_cpu: list[Process]
    task_phases: list[TaskPhase] | None
    dtype: str
    notes: list[str] = field(default_factory=list)
    task_keys: tuple[str, ...] = ()
    """Method keys that lower one optimiser task's peak (its render chunk)."""

    def gpu_totals(self) -> list[int]:
        """Bytes per GPU (a lower bound where a process' peak is unknown: its known parts)."""
        return [sum(p.known_bytes for p in gpu) for gpu in self.gpus]

    @property
    def complete(self) -> bool:
        return all(p.peak is not None for gpu in self.gpus for p in gpu)


# ---------------------------------------------------------------------------------- the plan


def plan_memory(
    config: PipelineConfig,
    task_memory: TaskMemoryFn | None | Literal["default"] = "default",
    gpus: int | None = None,
    table: Path | None | Literal["default"] = "default",
) -> MemoryPlan:
    """The memory plan of ``config``. ``task_memory``: the task model (``"default"``: the real
    one when present; None: tasks unknown). ``gpus``: GPUs to place on (None: as many as needed).
    ``table``: the measured actor figures (``"default"``: the shipped table; None: measure).
    Raises :class:`ConfigError` naming the key of a model source that cannot be resolved."""
    from stages.guidance.memory import TABLE
    from stages.models.sources import ModelSourceError

    task_fn = default_task_memory() if task_memory == "default" else task_memory
    table_path = TABLE if table == "default" else table
    try:
        return _plan(config, task_fn, gpus, table_path)
    except ModelSourceError as error:  # e.g. a local path that does not exist: its key is in the message
        raise ConfigError(f"memory plan: {error}") from None


def _plan(config: PipelineConfig, task_fn: TaskMemoryFn | None, gpus: int | None, table_path: Path | None) -> MemoryPlan:
    res, needed = config.resources, models_needed(config.method)
    dtype = _gpu_dtype(config.models.dtype)
    notes: list[str] = []
    processes: list[Process] = []
    for kind in ACTOR_ORDER:
        if kind not in needed:
            continue
        actor: ActorResources = getattr(res, kind)
        toy = uses_toyworld(config.models, kind)  # exact closed forms over renders: no weights to plan
        process = _actor_process(config, kind, actor, dtype, table_path, notes) if actor.num_gpus > 0 and not toy else None
        for replica in range(actor.replicas):
            if process is None:
                detail = "the toy world (no model weights)" if toy else "on the CPU (num_gpus 0)"
                processes.append(Process(f"{kind} {replica}", kind, 0.0, None, detail=detail))
            else:
                processes.append(replace(process, name=f"{kind} {replica}"))

    phases = _task_phases(config.method, task_fn) if res.task_num_gpus > 0 and task_fn is not None else None
    if res.task_num_gpus > 0 and task_fn is None:
        notes.append(
            "optimiser tasks: memory not modelled (stages.optimize.memory.task_memory is missing), "
            "only their CUDA contexts are counted: GPU sums are lower bounds"
        )
    task_bytes = max(p.peak_bytes for p in phases) if phases else None
    for index in range(res.tasks_in_flight):
        if res.task_num_gpus <= 0:
            processes.append(Process(f"task {index}", "task", 0.0, None, detail="on the CPU (task_num_gpus 0)"))
            continue
        parts = {"context": CONTEXT_BYTES} if task_bytes is None else {"task": task_bytes, "context": CONTEXT_BYTES}
        processes.append(
            Process(
                f"task {index}",
                "task",
                res.task_num_gpus,
                None if task_bytes is None else task_bytes + CONTEXT_BYTES,
                parts=parts,
                detail="its largest phase" if phases else "task_memory missing",
            )
        )
    placed, unplaced = _pack([p for p in processes if p.share > 0], gpus)
    if unplaced:
        notes.append(
            f"{len(unplaced)} processes do not fit the {gpus} GPUs by their shares; Ray queues them "
            "(not in the sums)"
        )
    task_keys = (RENDER_CHUNK_KEYS[config.method.representation],) if config.method.representation in RENDER_CHUNK_KEYS else ()
    return MemoryPlan(processes, placed, [p for p in processes if p.share <= 0], phases, dtype, notes, task_keys)


def _gpu_dtype(name: str) -> str:
    """``models.dtype`` as the actors resolve it on a GPU (``auto``: float16)."""
    import torch

    from stages.models.device import resolve_dtype

    return str(resolve_dtype(name, torch.device("cuda"))).replace("torch.", "")


def _task_phases(method: OptimizeConfig, task_fn: TaskMemoryFn) -> list[TaskPhase]:
    schedule = method.schedule
    labels = [f"phase {i + 1}: {b} views at {r}²" for i, (b, r) in enumerate(zip(schedule.batch_sizes, schedule.resolutions))]
    rows = list(task_fn(method))
    if len(rows) != len(labels):
        raise ValueError(f"task_memory returned {len(rows)} phases for a schedule of {len(labels)}")
    return [TaskPhase(label, *(int(_field(row, name)) for name in TASK_FIELDS)) for label, row in zip(labels, rows)]


def _field(row: Any, name: str) -> Any:
    if not hasattr(row, name):
        raise AttributeError(f"task_memory rows need a {name!r} field (bytes); got {type(row).__name__}")
    return getattr(row, name)


def actor_specs(config: PipelineConfig, kind: str, dtype: str | None = None) -> list[ActorSpec]:
    """The biggest call of actor ``kind`` in each phase of the schedule (one spec per distinct load)."""
    from stages.guidance.ip_guidance import ip_render_resolution
    from stages.guidance.memory import ActorSpec
    from stages.guidance.mvdream_guidance import mvd_render_resolution
    from stages.models.architecture import ip_architecture, mvdream_architecture, sd_architecture

    models, method, res = config.models, config.method, config.resources
    actor: ActorResources = getattr(res, kind)
    dtype = dtype or _gpu_dtype(models.dtype)
    callers = min(actor.max_batch, res.tasks_in_flight)  # a task has one request in flight per actor
    if kind == "reference":
        arch = sd_architecture(models.reference, "models.reference")
        size = int(arch.unet["sample_size"]) * 2 ** (len(arch.vae["block_out_channels"]) - 1)
        return [ActorSpec("reference", arch, dtype, requests=callers, model_resolution=size)]
    if kind == "ip":
        arch, resolution = ip_architecture(models), ip_render_resolution(models)
    else:
        arch, resolution = mvdream_architecture(models), mvd_render_resolution(models)
    specs: list[ActorSpec] = []
    for views, render in dict.fromkeys(zip(method.schedule.batch_sizes, method.schedule.resolutions)):
        requests = callers if not actor.max_batch_views else max(1, min(callers, actor.max_batch_views // views))
        spec = ActorSpec(
            kind, arch, dtype, requests=requests, views=int(views), render=int(render), model_resolution=resolution,
            vae_chunk=actor.vae_chunk, unet_rows=actor.unet_rows, loss=method.loss if kind == "ip" else "sds_mvd",
            sd_branch=method.isd.sd_branch,
        )
        specs.append(spec)
    return specs


LOWER_KEYS = {
    "reference": ("resources.reference.max_batch",),
    "ip": ("resources.ip.vae_chunk", "resources.ip.unet_rows"),
    "mvd": ("resources.mvd.vae_chunk", "resources.mvd.unet_rows"),
    "task": ("resources.tasks_in_flight",),
}
"""Keys whose smaller value lowers a process' peak (or, for tasks, their number)."""
RAISE_KEYS = {
    "reference": ("resources.reference.num_gpus",),
    "ip": ("resources.ip.num_gpus",),
    "mvd": ("resources.mvd.num_gpus",),
    "task": ("resources.task_num_gpus",),
}
"""Keys whose larger value leaves fewer processes beside it on a GPU."""
RENDER_CHUNK_KEYS = {"nerf": "method.nerf.renderer.chunk_samples", "splats": "method.splats.chunk_views"}
"""The key that bounds an optimiser task's deferred render chunk (its autograd graph), by representation."""


def _actor_process(config: PipelineConfig, kind: str, actor: ActorResources, dtype: str, table: Path | None, notes: list[str]) -> Process:
    from stages.guidance.memory import actor_memory

    best: tuple[Any, ActorSpec] | None = None
    for spec in actor_specs(config, kind, dtype):
        memory, source = actor_memory(spec, table)
        if source != "table":
            how = "measured now" if source == "measured" else "measured earlier on this machine"
            notes.append(f"{ACTOR_NAMES[kind]}: {how}, not in the shipped table ({spec.key()})")
        if best is None or memory.total > best[0].total:
            best = (memory, spec)
    assert best is not None
    memory, spec = best
    return Process(
        kind,
        kind,
        actor.num_gpus,
        memory.total + CONTEXT_BYTES,
        parts={"weights": memory.weights, "activations": memory.activations, "context": CONTEXT_BYTES},
        detail=spec.key().split("|", 3)[-1],
    )


def _pack(processes: list[Process], gpus: int | None) -> tuple[list[list[Process]], list[Process]]:
    """Ray's placement of GPU shares on one node (``NodeResourceInstanceSet::TryAllocate``): a
    fraction goes on the GPU it fits best (least share left after it; the lowest index on a tie),
    a whole number takes that many untouched GPUs, lowest indices first (its memory counted on
    the first). ``gpus`` None: a new GPU whenever none fits. Returns (per GPU, unplaced)."""
    free: list[int] = [SHARE_UNITS] * (gpus or 0)
    placed: list[list[Process]] = [[] for _ in free]
    unplaced: list[Process] = []

    def new_gpu() -> int:
        free.append(SHARE_UNITS)
        placed.append([])
        return len(free) - 1

    for process in processes:
        units = int(round(process.share * SHARE_UNITS))
        if process.share >= 1:
            count = int(process.share)
            empty = [i for i, left in enumerate(free) if left == SHARE_UNITS]
            while len(empty) < count and gpus is None:
                empty.append(new_gpu())
            if len(empty) < count:
                unplaced.append(process)
                continue
            for i in empty[:count]:
                free[i] = 0
            placed[empty[0]].append(process)
            continue
        fits = [i for i, left in enumerate(free) if left >= units]
        target = min(fits, key=lambda i: (free[i] - units, i)) if fits else (new_gpu() if gpus is None else None)
        if target is None:
            unplaced.append(process)
            continue
        free[target] -= units
        placed[target].append(process)
    return placed, unplaced


# ---------------------------------------------------------------------------------- checking


def check_plan(plan: MemoryPlan, capacity: int, headroom: float, source: str = "") -> None:
    """Raise :class:`ConfigError` naming the keys to change when a GPU's sum passes its budget."""
    budget = capacity * (1.0 - headroom)
    for index, (gpu, total) in enumerate(zip(plan.gpus, plan.gpu_totals())):
        if total <= budget:
            continue
        groups = sorted(_groups(gpu), key=lambda g: -g[2])
        listing = ", ".join(f"{count} x {ACTOR_NAMES.get(kind, 'optimiser task')} {each / GIB:.1f} GiB" for kind, count, _, each in groups)
        lower = [key for kind, *_ in groups for key in (*LOWER_KEYS[kind], *(plan.task_keys if kind == "task" else ()))]
        more = [key for kind, *_ in groups for key in RAISE_KEYS[kind]]
        if plan.dtype == "float32":
            lower.append("models.dtype (float16)")
        bound = "" if plan.complete else " at least (task memory not modelled)"
        raise ConfigError(
            f"memory plan: GPU {index} needs {total / GIB:.1f} GiB{bound} but has {capacity / GIB:.1f} GiB"
            f"{' (' + source + ')' if source else ''}, {budget / GIB:.1f} GiB after resources.gpu_memory_headroom="
            f"{headroom:g}: {listing}. To fit, lower {', '.join(lower)}, or raise {', '.join(more)} (fewer "
            "processes per GPU), or set resources.gpu_memory_gib if the card is bigger; "
            "`python -m benchmarks.memory CONFIG` prints the whole plan"
        )


def _groups(gpu: list[Process]) -> list[tuple[str, int, int, int]]:
    """(kind, count, bytes of all, bytes of one) per kind on one GPU."""
    out: dict[str, list[int]] = {}
    for p in gpu:
        out.setdefault(p.kind, []).append(p.known_bytes)
    return [(kind, len(v), sum(v), max(v)) for kind, v in out.items()]


def format_plan(plan: MemoryPlan, capacity: int | None = None, headroom: float = 0.1) -> str:
    """The plan as a table: processes grouped by kind per GPU, the task phases, the sums."""
    lines = [f"memory plan ({plan.dtype} models; GPU shares packed best-fit, as Ray does on a node; GiB):"]
    header = f"  {'GPU':>3}  {'process':<22} {'count':>5} {'share':>8} {'weights':>8} {'activ.':>8} {'context':>8} {'peak':>8} {'all':>8}  call"
    lines.append(header)
    totals = plan.gpu_totals()
    for first, last in _alike_gpus(plan.gpus):
        gpu, label = plan.gpus[first], str(first) if first == last else f"{first}-{last}"
        seen: dict[str, list[Process]] = {}
        for p in gpu:
            seen.setdefault(p.kind, []).append(p)
        for kind, group in seen.items():
            p = group[0]
            weights = p.parts.get("weights", p.parts.get("task"))
            name = ACTOR_NAMES.get(kind, "optimiser task")
            unknown = "?" if p.peak is None else ""
            peak = f"{p.known_bytes / GIB:.2f}{unknown}"
            total = f"{len(group) * p.known_bytes / GIB:.2f}{unknown}"
            lines.append(
                f"  {label:>3}  {name:<22} {len(group):>5} {p.share:>8.4g} {_gib(weights):>8} "
                f"{_gib(p.parts.get('activations')):>8} {_gib(p.parts.get('context')):>8} {peak:>8} {total:>8}  {p.detail}"
            )
        total = totals[first]
        verdict = ""
        if capacity is not None:
            budget = capacity * (1 - headroom)
            verdict = f" of {capacity / GIB:.1f} (budget {budget / GIB:.1f} with {headroom:.0%} headroom): " + ("fits" if total <= budget else "DOES NOT FIT")
        bound = "" if plan.complete else " (lower bound)"
        each = "" if first == last else " each"
        lines.append(f"  GPU {label}: {total / GIB:.2f} GiB{each}{bound}{verdict}")
    if plan.on_cpu:
        kinds = sorted({ACTOR_NAMES.get(p.kind, "optimiser task") for p in plan.on_cpu})
        lines.append(f"  on the CPU (no GPU share, not planned): {len(plan.on_cpu)} processes ({', '.join(kinds)})")
    if plan.task_phases:
        lines.append("  optimiser task by phase (task_memory): parameters / gradients / optimiser state / frame buffers / graph / peak")
        for ph in plan.task_phases:
            lines.append(
                f"    {ph.label}: {_gib(ph.parameter_bytes)} / {_gib(ph.gradient_bytes)} / {_gib(ph.optimizer_bytes)} / "
                f"{_gib(ph.frame_bytes)} / {_gib(ph.graph_bytes)} / {_gib(ph.peak_bytes)}"
            )
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)


def _alike_gpus(gpus: list[list[Process]]) -> list[tuple[int, int]]:
    """Runs of consecutive GPUs holding the same processes, as (first, last) indices."""
    def signature(gpu: list[Process]) -> tuple:
        return tuple((p.kind, p.share, p.known_bytes) for p in gpu)

    runs: list[tuple[int, int]] = []
    for index, gpu in enumerate(gpus):
        if runs and signature(gpus[runs[-1][0]]) == signature(gpu):
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    return runs


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


# ---------------------------------------------------------------------------------- the driver


def gpu_capacity(config: PipelineConfig, ask_cluster: bool = False) -> tuple[int | None, str]:
    """(bytes of one GPU, where the figure comes from): ``resources.gpu_memory_gib``, else the
    smallest GPU NVML reports here, else (``ask_cluster``) on each GPU node of the Ray cluster."""
    if config.resources.gpu_memory_gib is not None:
        return int(config.resources.gpu_memory_gib * GIB), "resources.gpu_memory_gib"
    local = _nvml_smallest_gpu()
    if local is not None:
        return local, "NVML on this machine"
    if ask_cluster:
        remote = _cluster_smallest_gpu()
        if remote is not None:
            return remote, "NVML on the cluster's GPU nodes"
    return None, ""


def _nvml_smallest_gpu() -> int | None:
    """Total memory of the smallest GPU NVML sees (no CUDA context is created), or None."""
    try:
        import ray._private.thirdparty.pynvml as pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no NVML: no GPU here
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        sizes = [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total for i in range(count)]
        return int(min(sizes)) if sizes else None
    finally:
        pynvml.nvmlShutdown()


def _cluster_smallest_gpu(timeout_s: float = 60.0) -> int | None:
    """One zero-resource task on each alive node that has GPUs asks NVML there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0]
    probe = ray.remote(num_cpus=0)(_nvml_smallest_gpu)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote() for node in nodes]
    try:
        sizes = [s for s in ray.get(refs, timeout=timeout_s) if s is not None]
    except Exception:  # noqa: BLE001 - a node that does not answer: no figure
        return None
    return min(sizes) if sizes else None


def _uses_gpus(config: PipelineConfig) -> bool:
    res = config.resources
    return res.task_num_gpus > 0 or any(getattr(res, kind).num_gpus > 0 for kind in models_needed(config.method))


def check_memory_plan(config: PipelineConfig, cluster: dict[str, float], stream: TextIO) -> MemoryPlan | None:
    """Before any model loads: plan the cluster's GPUs and refuse (:class:`ConfigError`) a plan
    that cannot fit. No GPU share or no GPU in the cluster: nothing to plan."""
    gpus = int(cluster.get("GPU", 0))
    if gpus <= 0 or not _uses_gpus(config):
        return None
    capacity, source = gpu_capacity(config, ask_cluster=True)
    plan = plan_memory(config, gpus=gpus)
    totals = plan.gpu_totals()
    if capacity is None:
        print(f"[pipeline] note: GPU memory unknown (set resources.gpu_memory_gib): plan needs up to "
              f"{max(totals, default=0) / GIB:.1f} GiB per GPU, not checked", file=stream, flush=True)
        return plan
    check_plan(plan, capacity, config.resources.gpu_memory_headroom, source)
    bound = "" if plan.complete else " (tasks not modelled: lower bound)"
    print(f"[pipeline] memory plan: up to {max(totals, default=0) / GIB:.1f} GiB{bound} per GPU of "
          f"{capacity / GIB:.1f} GiB ({source})", file=stream, flush=True)
    for note in plan.notes:
        print(f"[pipeline] note: {note}", file=stream, flush=True)
    return plan


def describe_memory_plan(config: PipelineConfig, stream: TextIO) -> MemoryPlan | None:
    """``--dry-run``: print the plan; check it when the GPU memory is known here (the key or a
    local GPU). Needs no weights, no Ray and no GPU."""
    if not _uses_gpus(config):
        print("  memory plan: no task or model actor has a GPU share: nothing on a GPU", file=stream, flush=True)
        return None
    capacity, source = gpu_capacity(config, ask_cluster=False)
    plan = plan_memory(config)
    headroom = config.resources.gpu_memory_headroom
    print("  " + format_plan(plan, capacity, headroom).replace("\n", "\n  "), file=stream, flush=True)
    if capacity is None:
        print("  memory plan not checked: no GPU here and resources.gpu_memory_gib is null", file=stream, flush=True)
        return plan
    check_plan(plan, capacity, headroom, source)
    return plan
