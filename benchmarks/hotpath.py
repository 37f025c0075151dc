"""Waste on the optimiser's hot path: aten ops, device-to-host syncs and object-store bytes of ONE
iteration of one task, counted on the CPU with ``torch.profiler``.

    python -m benchmarks.hotpath [--phases 1,2] [--representation nerf] [--sparse-occupancy]
                                 [--out benchmarks/out/hotpath.json] [--quick]

Settings: the paper's method config (``OptimizeConfig()``: NeRF hash grid 16 levels × 2¹⁹,
512 samples per ray, occupancy grid 32³), phase 1 = 8 views at 64² (step 1 of 6000), phase 2 =
4 views at 256² (step 3001). Neither step refreshes the occupancy grid (every 16 steps), so the
numbers are those of a typical iteration. The scene is the fresh blob initialisation.

The guidance is a stand-in (``grad_rgb = 1e-3·(rgb − ½)``) behind the real Ray client
(``pipeline.clients.ActorGuidance``) whose ``ray`` is replaced by an in-process wire that
pickles every argument and return value exactly once, as Ray's object store would; the
stand-in's and the wire's own work is excluded from the counts (``benchmark::`` ranges).

Counting rules (per iteration, i.e. one ``_Run.iteration(step)``):

- **aten ops**: leaf ``aten::`` events of the profile (ops without aten children: what would
  launch work on a device), and **kernel ops**: the same without metadata-only ops (views,
  ``empty``, ``as_strided``, ``detach``, …) and without copies of 0-dim tensors (the CPU's
  wrapping of Python scalars for type promotion; CUDA passes them as kernel arguments): the
  kernel-launch proxy.
- **device-to-host syncs**: (a) every outermost aten op that reaches one of ``SYNC_OPS``
  (``nonzero``, ``_local_scalar_dense`` = ``.item()``/``float()``/``int()``/``bool()``, ``equal``,
  ``masked_select``, ``unique``): boolean-mask indexing (``index`` → ``nonzero``) and
  ``repeat_interleave`` with tensor repeats (→ ``item``) count once each; (b) every
  ``record_function`` range named ``d2h::…`` (the loop's and client's explicit moves of device
  tensors to the host: on a CPU they copy nothing, so they are instrumented); (c) every render
  that the wire serialises by value (pickling a CUDA tensor copies it to the host).
  Ops reached only from host-side functions (``HOST_FUNCTIONS``: camera, shading and timestep
  draws on CPU generators, request validation) read host tensors and are not syncs; every
  counted sync is listed with its Python call site in ``sync_sites`` so the rule can be checked.
- **object-store bytes**: the pickled size (protocol 5) of every argument and return value of
  the guidance calls and of every ``ray.put``; an ObjectRef inside an argument costs its id.

``--sparse-occupancy`` empties the occupancy grid but for one cell: the field is then evaluated
at almost no samples, so phase 2 of a direct-mode render fits a small machine. Op and sync counts
of a render whose chunks are fixed by ray count (the renderer before deferred back-propagation)
do not depend on the grid's content (``--check-sparse`` measures phase 1 both ways); counts of
the packed renderer do (its chunks are bounded by kept samples), so it is measured with the real
grid.
"""

from __future__ import annotations

import argparse
import collections
import pickle
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import environment, format_table, write_json

DEFAULT_OUT = Path("benchmarks/out/hotpath.json")
PHASE_STEPS = {1: 1, 2: 3001}
"""Step measured per phase of the default 6000-iteration schedule (milestone at 3000)."""

SYNC_OPS = frozenset({
    "aten::nonzero", "aten::_local_scalar_dense", "aten::equal", "aten::masked_select",
    "aten::_unique", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim",
})
METADATA_OPS = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::as_strided", "aten::as_strided_",
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::alias", "aten::detach",
    "aten::detach_", "aten::select", "aten::slice", "aten::narrow", "aten::expand", "aten::expand_as",
    "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::transpose", "aten::t", "aten::unbind",
    "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::resize_", "aten::set_", "aten::lift_fresh",
    "aten::view_as", "aten::flatten", "aten::unflatten", "aten::movedim", "aten::numpy_T", "aten::result_type",
    "aten::is_nonzero", "aten::resolve_conj", "aten::resolve_neg", "aten::_has_compatible_shallow_copy_type",
    "aten::unfold", "aten::diagonal", "aten::conj", "aten::requires_grad_", "aten::to", "aten::contiguous",
})
"""Leaf ops that only touch tensor metadata or allocate (no device kernel). ``aten::to`` /
``contiguous`` are leaves only when they return their input (a copy shows ``_to_copy``/``copy_``)."""
HOST_FUNCTIONS = frozenset({
    "sample_cameras", "make_cameras", "_uniform", "choose_shading", "sample_timesteps", "timestep_bounds",
    "validate_request", "derive_seed", "_generator", "_timestep_metrics", "request_noise", "_get_value",
    "draw_augmentation", "_draw_render_randomness", "_draw_background", "_light_positions",
})
"""Functions that only touch host tensors by construction: CPU generators, request fields, and
``torch.optim``'s ``_get_value`` (Adam keeps its step counter on the host unless ``capturable``)."""


# ----------------------------------------------------------------------------- the wire
class _Ref:
    """An ObjectRef of the in-process wire: pickles to its id, as a Ray ObjectRef does."""

    def __init__(self, wire: "Wire", key: int) -> None:
        self.wire, self.key = wire, key

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return (_lookup_ref, (self.key,))

    def __await__(self) -> Iterator[Any]:
        if False:  # pragma: no cover - makes this a generator
            yield
        return self.wire.get(self)


_WIRES: list["Wire"] = []


def _lookup_ref(key: int) -> _Ref:
    return _Ref(_WIRES[-1], key)


class Wire:
    """Stands in for the ``ray`` module inside ``pipeline.clients``: ``put``/``get``/``ObjectRef``,
    plus actor handles whose ``.remote`` pickles arguments and results through it."""

    ObjectRef = _Ref

    def __init__(self) -> None:
        self._objects: dict[int, bytes] = {}
        self.bytes: collections.Counter[str] = collections.Counter()
        self.renders_by_value = 0
        _WIRES.append(self)

    def _store(self, data: bytes) -> _Ref:
        key = len(self._objects)
        self._objects[key] = data
        return _Ref(self, key)

    def put(self, value: Any) -> _Ref:
        with excluded("wire"):
            data = pickle.dumps(value, protocol=5)
            self.bytes["put"] += len(data)
            return self._store(data)

    def get(self, ref: Any) -> Any:
        if isinstance(ref, list):
            return [self.get(r) for r in ref]
        with excluded("wire"):
            return pickle.loads(self._objects[ref.key])

    def handle(self, server: Any) -> Any:
        return _Handle(self, server)


class _Method:
    def __init__(self, wire: Wire, server: Any, name: str) -> None:
        self.wire, self.server, self.name = wire, server, name

    def remote(self, *args: Any) -> _Ref:
        with excluded("wire"):
            data = pickle.dumps(args, protocol=5)
            self.wire.bytes[f"{self.name}_args"] += len(data)
            if self.name == "grad":
                self.wire.renders_by_value += sum(
                    isinstance(r.rgb, torch.Tensor) for r in args[0] if hasattr(r, "rgb")
                )
            received = pickle.loads(data)
            result = getattr(self.server, self.name)(*received)
            out = pickle.dumps(result, protocol=5)
            self.wire.bytes[f"{self.name}_result"] += len(out)
            return self.wire._store(out)


class _Handle:
    def __init__(self, wire: Wire, server: Any) -> None:
        self.wire, self.server = wire, server

    def __getattr__(self, name: str) -> _Method:
        return _Method(self.wire, self.server, name)


class StandInGuidance:
    """Returns ``grad_rgb = 1e-3·(rgb − ½)`` for every request (the actor's side of the wire:
    resolves render refs as ``pipeline.actors.GuidanceServer`` does, when the client sends refs)."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.registered: set[str] = set()

    def register(self, asset_id: str, prompt: str, reference: Any = None, settings: Any = None) -> None:
        self.registered.add(asset_id)

    def release(self, asset_id: str) -> None:
        self.registered.discard(asset_id)

    def grad(self, requests: list[Any]) -> list[Any]:
        from stages.guidance.protocol import GuidanceResponse

        with excluded("guidance"):
            resolve = _resolver()
            if resolve is not None:
                requests = resolve(requests)
            return [
                GuidanceResponse(r.asset_id, (r.rgb.float() - 0.5).mul(1e-3).to(r.rgb.dtype), 0.1, 1.0, r.timesteps)
                for r in requests
            ]


def _resolver() -> Any:
    """The client module's actor-side ref resolver, when this version of it has one."""
    import pipeline.clients as clients

    fn = getattr(clients, "resolve_request_refs", None)
    if fn is None:
        return None
    wire = _WIRES[-1]
    return lambda requests: fn(requests, get=wire.get)


@contextmanager
def wire_as_ray() -> Iterator[Wire]:
    """``pipeline.clients.ray`` replaced by a fresh :class:`Wire` for the duration."""
    import pipeline.clients as clients

    wire = Wire()
    saved = clients.ray
    clients.ray = wire
    try:
        yield wire
    finally:
        clients.ray = saved
        _WIRES.remove(wire)


# ----------------------------------------------------------------------------- counting
_EXCLUDED = threading.local()


@contextmanager
def excluded(name: str) -> Iterator[None]:
    """Work of the benchmark itself: left out of op and sync counts."""
    depth = getattr(_EXCLUDED, "depth", 0)
    _EXCLUDED.depth = depth + 1
    try:
        with record_function(f"benchmark::{name}"):
            yield
    finally:
        _EXCLUDED.depth = depth


def _is_aten(name: str) -> bool:
    return name.startswith("aten::")


def _ancestors(event: Any) -> Iterator[Any]:
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def count_ops(events: Sequence[Any]) -> dict[str, Any]:
    """Leaf aten ops, kernel ops and explicit ``d2h::`` moves of one profiled iteration."""
    leaf_ops = kernel_ops = 0
    moves: collections.Counter[str] = collections.Counter()
    ops_by_name: collections.Counter[str] = collections.Counter()
    for event in events:
        name = event.name
        if name.startswith("benchmark::") or any(a.name.startswith("benchmark::") for a in _ancestors(event)):
            continue
        if name.startswith("d2h::"):
            moves[name] += 1
        if not _is_aten(name) or any(_is_aten(c.name) for c in event.cpu_children):
            continue
        leaf_ops += 1
        scalar_copy = name == "aten::copy_" and all(shape == [] for shape in (event.input_shapes or [[0]])[:2])
        if name not in METADATA_OPS and not scalar_copy:
            kernel_ops += 1
            ops_by_name[name] += 1
    return {"aten_leaf_ops": leaf_ops, "kernel_ops": kernel_ops, "explicit_moves": dict(moves),
            "top_kernel_ops": dict(ops_by_name.most_common(15))}


def _is_sync(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether an aten call (as a dispatch mode sees it: outermost, below autograd) waits for
    the device: a data-dependent output size or a scalar read."""
    name = func.overloadpacket.__name__
    if name in SYNC_OVERLOADS:
        return True
    if name == "repeat_interleave" and func._overloadname == "Tensor":
        return kwargs.get("output_size", args[2] if len(args) > 2 else None) is None
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
    return False


SYNC_OVERLOADS = frozenset({
    "nonzero", "_local_scalar_dense", "equal", "masked_select", "_unique", "_unique2", "unique_consecutive",
    "unique_dim",
})


class SyncCounter(TorchDispatchMode):
    """Counts sync-inducing aten calls by call site (the innermost project frame), skipping
    calls made from ``HOST_FUNCTIONS`` and from the benchmark's own ``excluded`` work."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()
        self.host: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(_EXCLUDED, "depth", 0) == 0 and _is_sync(func, args, kwargs):
            functions, site = [], None
            frame = sys._getframe(1)
            while frame is not None:
                functions.append(frame.f_code.co_name)
                path = frame.f_code.co_filename
                if site is None and ("/stages/" in path or "/pipeline/" in path):
                    site = f"{path.rsplit('/', 2)[-2]}/{path.rsplit('/', 1)[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
                frame = frame.f_back
            label = f"{site or '?'} -> {func.overloadpacket.__name__}"
            (self.host if HOST_FUNCTIONS.intersection(functions) else self.sites)[label] += 1
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- one iteration
def paper_config(representation: str, tiny: bool = False) -> Any:
    """The paper's method config (``tiny``: the CPU preset, for smoke tests) on the CPU."""
    from stages.optimize.config import OptimizeConfig

    cfg = OptimizeConfig.tiny(representation) if tiny else OptimizeConfig(representation=representation)
    cfg.schedule.milestones, cfg.iterations = [0.5], 6000
    cfg.device = "cpu"
    cfg.checkpoint_every = 0
    if representation == "nerf":
        cfg.nerf.backend = "torch"
    return cfg


def measure_phase(
    phase: int,
    representation: str,
    sparse_occupancy: bool,
    config_overrides: Sequence[str] = (),
    tiny: bool = False,
    wire_dtype: str | None = None,
) -> dict[str, Any]:
    """Count one iteration of phase ``phase`` twice from the same fresh state: once under the
    profiler (ops, explicit moves, wire bytes), once under :class:`SyncCounter` (a dispatch mode
    changes which ops the profiler sees, so the two never run together)."""
    step = PHASE_STEPS[phase]
    tick = time.perf_counter()
    args = (phase, representation, sparse_occupancy, config_overrides)
    ops, metrics, wire = _one_iteration(*args, "profile", tiny, wire_dtype)
    seconds = time.perf_counter() - tick
    syncs, _, _ = _one_iteration(*args, "syncs", tiny, wire_dtype)
    counts = {**ops, "sync_sites": dict(syncs.sites), "host_reads": dict(syncs.host)}
    counts["syncs_render_pickled"] = wire.renders_by_value
    counts["device_to_host_syncs"] = (
        sum(syncs.sites.values()) + sum(ops["explicit_moves"].values()) + wire.renders_by_value
    )
    counts["object_store_bytes"] = sum(wire.bytes.values())
    counts["object_store_bytes_by_kind"] = dict(wire.bytes)
    return {
        "phase": phase,
        "step": step,
        "views": int(metrics["batch"]),
        "resolution": int(metrics["resolution"]),
        "representation": representation,
        "sparse_occupancy": sparse_occupancy,
        "wire_dtype": wire_dtype or "float32",
        "seconds_profiled": seconds,
        "opacity_mean": metrics.get("opacity_mean"),
        "kept_samples": metrics.get("kept_samples"),
        "chunks": metrics.get("chunks"),
        **counts,
    }


def _one_iteration(
    phase: int,
    representation: str,
    sparse_occupancy: bool,
    config_overrides: Sequence[str],
    mode: str,
    tiny: bool,
    wire_dtype: str | None,
) -> tuple[Any, dict[str, float], Wire]:
    from pipeline.task import GuidanceHandles
    from stages.optimize.config import load_optimize_config
    from stages.optimize.loop import _Run, derive_seed
    from stages.scene.factory import build_scene

    cfg = load_optimize_config(None, list(config_overrides), base=paper_config(representation, tiny))
    step = PHASE_STEPS[phase]
    seed, asset_id = 0, "bench-hotpath"
    scene = build_scene(cfg, seed)
    if sparse_occupancy and hasattr(scene, "occupancy"):
        with torch.no_grad():
            scene.occupancy.zero_()
            middle = scene.occupancy.shape[0] // 2
            scene.occupancy[middle, middle, middle] = True
    scene.train()
    plans: list[Any] = []
    if hasattr(scene, "plan_render"):
        planner = scene.plan_render
        scene.plan_render = lambda *a, **k: plans.append(planner(*a, **k)) or plans[-1]  # type: ignore[method-assign]
    with wire_as_ray() as wire:
        ip, mvd = (wire.handle(StandInGuidance(wire)) for _ in range(2))
        handles = GuidanceHandles(ip=[ip], mvd=[mvd], **({"wire_dtype": wire_dtype} if wire_dtype else {}))
        guidance = handles.guidance_set(asset_id)
        for client in (guidance.ip, guidance.mvd):
            client.concurrent_calls = False  # one thread: counts do not depend on it
        run = _Run(cfg, guidance, seed, asset_id, "a red apple", None, scene, torch.device("cpu"))
        run.register()
        wire.bytes.clear()
        wire.renders_by_value = 0
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, step, "global"))
                if mode == "profile":
                    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                        metrics = run.iteration(step)
                    result: Any = count_ops(prof.events())
                else:
                    with SyncCounter() as result:
                        metrics = run.iteration(step)
        finally:
            run.close()
    samples = getattr(plans[-1], "samples", None) if plans else None
    if samples is not None:
        metrics = {**metrics, "kept_samples": float(samples.n_kept), "chunks": float(len(samples.chunks))}
    return result, metrics, wire


COLUMNS = (
    "phase", "views", "resolution", "sparse_occupancy", "chunks", "aten_leaf_ops", "kernel_ops",
    "device_to_host_syncs", "wire_dtype", "object_store_bytes", "seconds_profiled",
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--phases", default="1,2", help="comma list of 1 | 2")
    parser.add_argument("--representation", default="nerf", choices=("nerf", "splats"))
    parser.add_argument("--sparse-occupancy", action="store_true", help="empty the occupancy grid but one cell")
    parser.add_argument("--check-sparse", action="store_true", help="also measure phase 1 with the sparse grid")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method config override")
    parser.add_argument("--tiny", action="store_true", help="the tiny CPU preset instead of the paper's config (smoke test)")
    parser.add_argument("--wire-dtype", default=None, help="dtype renders travel in (GuidanceHandles.wire_dtype), e.g. float16")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for phase in [int(p) for p in args.phases.split(",") if p]:
        if phase not in PHASE_STEPS:
            parser.error(f"--phases: unknown phase {phase} (1 | 2)")
        rows.append(measure_phase(phase, args.representation, args.sparse_occupancy, args.set, args.tiny, args.wire_dtype))
        print(format_table([rows[-1]], COLUMNS).splitlines()[-1], flush=True)
        if args.check_sparse and phase == 1 and not args.sparse_occupancy:
            rows.append(measure_phase(phase, args.representation, True, args.set, args.tiny, args.wire_dtype))
            print(format_table([rows[-1]], COLUMNS).splitlines()[-1], flush=True)
    results = {
        "benchmark": "hotpath",
        "environment": environment("cpu"),
        "command": " ".join(["python -m benchmarks.hotpath", *(argv if argv is not None else sys.argv[1:])]),
        "rows": rows,
    }
    print()
    print(format_table(rows, COLUMNS))
    for row in rows:
        print(f"\nphase {row['phase']} (sparse occupancy: {row['sparse_occupancy']}) sync sites:")
        for site, count in row["sync_sites"].items():
            print(f"  {count:4d}  {site}")
        for site, count in row["explicit_moves"].items():
            print(f"  {count:4d}  {site}")
        print(f"  {row['syncs_render_pickled']:4d}  renders pickled by value")
        print(f"  object-store bytes: {row['object_store_bytes_by_kind']}")
    print(f"wrote {write_json(results, args.out)}")
    return results


if __name__ == "__main__":
    main()
