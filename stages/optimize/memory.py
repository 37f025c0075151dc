"""Device memory of one optimiser task, per schedule phase, measured on the CPU.

:func:`task_memory` gives, for each phase of ``method.schedule`` (views × resolution), the
bytes an optimiser task holds at its peak: parameters, their gradients, the optimiser state,
the iteration's frame buffers (render maps, the image gradient, the render plan) and the
largest working set on top of them (the autograd graph: one render chunk with deferred
back-propagation, every chunk in direct mode, plus that moment's temporaries).

Everything is measured on real objects, not counted by hand:

- parameters, gradients and AdamW state come from the real scene and optimiser (full size);
- per-sample, per-ray, per-pixel and per-candidate bytes come from real CPU runs at a few small
  sizes, through ``torch.profiler``'s allocation events (peak live bytes, temporaries included)
  and saved-tensor hooks (the graph). Every term is linear in those counts by construction
  (each tensor of a chunk is sized by its samples or rays), so two sizes fit it exactly and a
  third checks it; the fit is then evaluated at the real sizes.

What depends on the scene's occupancy is bounded by construction where the code bounds it: a
deferred chunk holds at most ``nerf.renderer.chunk_samples`` samples and the render plan at
most every candidate (rays × ``num_samples_per_ray``). Direct back-propagation keeps every kept
sample's graph, which no construction bounds: it is given at the kept-sample count of the
initial scene (the density blob), measured on a 32² plan of the phase's cameras. Splat scenes
are modelled at ``densify.max_gaussians``, their graph for the per-(view, Gaussian) projection
that every backend saves (gsplat's tile buffers need CUDA to measure and are left out).

Figures are for the pure-torch NeRF backend (tiny-cuda-nn saves fp16 activations only: less).
CUDA's caching allocator rounds blocks up and keeps freed blocks; allow ~10 % on top.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from stages.optimize.config import OptimizeConfig

GiB = float(1 << 30)


@dataclass(frozen=True)
class TaskMemory:
    """Peak device memory of one optimiser task in one schedule phase (bytes)."""

    phase: int
    """Index of the phase in ``method.schedule`` (0: before the first milestone)."""
    views: int
    resolution: int
    representation: str
    backprop: str
    """``deferred`` or ``direct`` (``method.backprop`` resolved for the scene)."""
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    frame_bytes: int
    """Buffers alive through an iteration: render maps, image gradients, the render plan."""
    graph_bytes: int
    """Saved tensors of the autograd graph at its largest (one chunk / the whole render)."""
    working_bytes: int
    """Largest working set above the frame: planning the render's samples, or the gradients
    plus the render's graph and that moment's temporaries, whichever is larger."""
    peak_bytes: int
    """parameters + optimiser state + frame + working set."""
    breakdown: str
    """One line: the terms in GiB and what bounds them."""


# ----------------------------------------------------------------------------- measuring helpers
@contextmanager
def _without_profiler_trace() -> Iterator[None]:
    """Drop the ``USDT: … profiler_start/stop`` lines torch's profiler writes to fd 2 for every
    session (a dry run measures dozens); anything else written to stderr meanwhile is kept."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True) if not line.startswith("USDT:")]
            if kept:
                sys.stderr.write("".join(kept))


def peak_live_bytes(fn: Callable[[], Any]) -> tuple[int, int, Any]:
    """(peak, net) bytes of CPU allocations while ``fn()`` runs, above what was live before it,
    from ``torch.profiler`` allocation events (temporaries included); and ``fn``'s result."""
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_trace(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted(
        ((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda item: item[0],
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live, result


class SavedTensors:
    """Bytes of the distinct storages the autograd graph saves while active (views counted once;
    storages in ``exclude``, e.g. the parameters', left out)."""

    def __init__(self, exclude: set[int] = frozenset()) -> None:
        self.bytes = 0
        self._seen: set[int] = set(exclude)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda packed: packed)

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedTensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def parameter_storages(module: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def fit_linear(points: Sequence[tuple[Sequence[float], float]]) -> list[float]:
    """Exact coefficients [c0, c1, …] of value = c0 + Σ ci·xi through len(x) + 1 points."""
    a = torch.tensor([[1.0, *x] for x, _ in points], dtype=torch.float64)
    b = torch.tensor([v for _, v in points], dtype=torch.float64)
    return torch.linalg.solve(a, b).tolist()


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    return 0


# ----------------------------------------------------------------------------- the model
@dataclass
class _Persistent:
    parameters: int
    gradients: int
    optimizer: int

    def phase(
        self, index: int, views: int, resolution: int, representation: str, mode: str,
        frame: float, graph: float, working: float, breakdown: str,
    ) -> TaskMemory:
        """The phase's :class:`TaskMemory`: peak = parameters + optimiser state + frame + working
        (``breakdown``: the terms, the peak is appended)."""
        peak = int(self.parameters + self.optimizer + frame + working)
        return TaskMemory(
            phase=index, views=views, resolution=resolution, representation=representation, backprop=mode,
            parameter_bytes=self.parameters, gradient_bytes=self.gradients, optimizer_bytes=self.optimizer,
            frame_bytes=int(frame), graph_bytes=int(graph), working_bytes=int(working),
            peak_bytes=peak, breakdown=f"{breakdown} = {_gib(peak)} GiB",
        )


def _persistent(scene: torch.nn.Module) -> _Persistent:
    """Parameters and buffers, gradients, and AdamW state of the real modules. AdamW keeps two
    moments shaped like each trained parameter (its step counter lives on the host unless
    ``capturable``); ``tests/test_optimize_memory.py`` checks this against a real step."""
    trained = [p for p in scene.parameters() if p.requires_grad]
    parameter_bytes = sum(p.nbytes for p in scene.parameters()) + sum(b.nbytes for b in scene.buffers())
    gradient_bytes = sum(p.nbytes for p in trained)
    return _Persistent(parameter_bytes, gradient_bytes, 2 * gradient_bytes)


def task_memory(method: OptimizeConfig) -> list[TaskMemory]:
    """Peak device memory of one optimiser task for each schedule phase of ``method``."""
    method = copy.deepcopy(method)
    method.validate()
    if method.representation == "nerf":
        return _NeRFModel(method).phases()
    return _SplatModel(method).phases()


def _phases(method: OptimizeConfig) -> list[tuple[int, int, int]]:
    s = method.schedule
    return [(i, int(b), int(r)) for i, (b, r) in enumerate(zip(s.batch_sizes, s.resolutions))]


def _backprop(method: OptimizeConfig) -> str:
    return "direct" if method.backprop == "direct" else "deferred"


def _gib(value: float) -> str:
    return f"{value / GiB:.2f}"


class _NeRFModel:
    """Measures the NeRF scene's terms once, then evaluates them for every phase."""

    def __init__(self, method: OptimizeConfig) -> None:
        from stages.scene.nerf import NeRFScene

        self.method = method
        cfg = method.nerf
        cfg.backend = "torch"
        self.config = cfg
        self.scene = NeRFScene(cfg, seed=0).train()
        self.persistent = _persistent(self.scene)
        self.samples_per_ray = cfg.renderer.num_samples_per_ray
        self.normals = cfg.shading.compute_normals or method.shading.diffuse > 0 or method.shading.textureless > 0
        self.chunk = self._measure_chunks()
        self.plan = self._measure_planning()

    # --- measurements at small sizes ---------------------------------------------------------
    def _synthetic_plan(self, n_samples: int, n_rays: int) -> Any:
        """A NeRF render plan of ``n_rays`` rays through the blob with ``n_samples`` kept samples
        in one chunk (shapes as a real plan's; the values only have to be plausible)."""
        from stages.scene.nerf.renderer import SamplePlan
        from stages.scene.nerf.scene import NeRFRenderPlan

        s = self.samples_per_ray
        per_ray = max(1, min(s, n_samples // n_rays))
        g = torch.Generator().manual_seed(0)
        origins = torch.tensor([0.0, 0.0, 2.5]).expand(n_rays, 3).contiguous()
        dirs = torch.nn.functional.normalize(torch.randn(n_rays, 3, generator=g) * 0.1 + torch.tensor([0.0, 0.0, -1.0]), dim=-1)
        ray = torch.sort(torch.arange(n_samples) // per_ray % n_rays).values
        counts = torch.bincount(ray, minlength=n_rays)
        first = torch.cumsum(counts, 0) - counts
        delta = torch.full((n_rays,), 2.0 / s)
        t = 1.5 + (torch.arange(n_samples) - first[ray] + 0.5) * delta[ray]
        plan = SamplePlan(s, ray.int(), t, first, delta, chunks=[(0, n_rays, 0, n_samples)])
        shading = "diffuse" if self.normals else "albedo"
        maps = ("rgb", "opacity", "depth", "background") + (("normal",) if self.normals else ())
        return NeRFRenderPlan(
            batch=1, height=1, width=n_rays, shading=shading, with_normals=self.normals, origins=origins, dirs=dirs,
            samples=plan, lights=torch.tensor([[0.0, 2.0, 2.0]]), augmentation=torch.rand(1, 3, generator=g),
            sample_outputs=False, map_keys=maps, sum_keys=("orient_sum",) if self.normals else (),
        )

    def _chunk_point(self, n_samples: int, n_rays: int) -> dict[str, float]:
        """Peak working bytes of one chunk: (a) rendered without autograd (first pass), (b) with
        autograd and back-propagated (deferred pass), (c) its saved graph."""
        scene = self.scene
        plan = self._synthetic_plan(n_samples, n_rays)
        for p in scene.parameters():  # gradients exist already (they are counted apart)
            p.grad = torch.zeros_like(p)

        def first_pass() -> None:
            with torch.no_grad():
                for _ in scene.render_chunks(plan, {}, 0):
                    pass

        def deferred_pass() -> None:
            for chunk in scene.render_chunks(plan, {}, 0):
                loss = sum((rows * 1e-3).sum() for rows in chunk.maps.values())
                loss.backward()

        no_grad_peak, _, _ = peak_live_bytes(first_pass)
        grad_peak, _, _ = peak_live_bytes(deferred_pass)
        graph = self._graph_bytes(plan)
        for p in scene.parameters():
            p.grad = None
        return {"no_grad": no_grad_peak, "grad": grad_peak, "graph": graph}

    def _graph_bytes(self, plan: Any) -> int:
        with SavedTensors(parameter_storages(self.scene)) as saved:
            for chunk in self.scene.render_chunks(plan, {}, 0):
                del chunk
        return saved.bytes

    def _measure_chunks(self) -> dict[str, list[float]]:
        sizes = [(2048, 128), (4096, 128), (2048, 256)]
        points = [((s, r), self._chunk_point(s, r)) for s, r in sizes]
        return {key: fit_linear([(x, m[key]) for x, m in points]) for key in ("no_grad", "grad", "graph")}

    def _measure_planning(self) -> dict[str, float]:
        """Per ray and per candidate: the plan's persistent tensors and the planning peak; the
        initial scene's kept samples per ray (on a 32² plan of the phase's cameras); the render
        maps per pixel."""
        from stages.scene.cameras import sample_cameras

        cams = sample_cameras(torch.Generator().manual_seed(0), self.method.cameras.n_view, self.method.cameras)
        side = 32
        rays = len(cams) * side * side
        cfg = self.config.renderer
        saved_block = cfg.march_block_samples
        cfg.march_block_samples = rays * self.samples_per_ray  # one block: the planning peak of a full block
        try:
            peak, _, plan = peak_live_bytes(lambda: self.scene.plan_render(cams, side, side))
        finally:
            cfg.march_block_samples = saved_block
        kept = plan.samples.n_kept
        per_ray_tensors = sum(_tensor_bytes(t) for t in (plan.origins, plan.dirs, plan.samples.first, plan.samples.delta))
        with torch.no_grad():
            shading = "diffuse" if self.normals else "albedo"
            out = self.scene.render(cams[:1], 2, 2, shading=shading)
        pixel_bytes = sum(v.nbytes for v in out.values() if v.dim() == 4) / 4
        candidates = rays * self.samples_per_ray
        index_bytes = plan.samples.ray.element_size() + plan.samples.t.element_size()
        return {
            "per_ray": per_ray_tensors / rays,
            "per_sample": index_bytes,
            # planning temporaries of a block of candidates, beside the plan and the bool keep mask
            "per_candidate": (peak - per_ray_tensors - kept * index_bytes - candidates) / candidates,
            "kept_per_ray": kept / rays,
            "pixel": pixel_bytes,
        }

    # --- evaluation ----------------------------------------------------------------------------
    def phases(self) -> list[TaskMemory]:
        return [self._phase(*p) for p in _phases(self.method)]

    def _phase(self, index: int, views: int, resolution: int) -> TaskMemory:
        rays = views * resolution * resolution
        s = self.samples_per_ray
        cfg = self.config.renderer
        mode = _backprop(self.method)
        p, c = self.plan, self.chunk
        candidates = rays * s
        kept_initial = p["kept_per_ray"] * rays
        kept_bound = min(candidates, 1 << 62)
        grad_maps = 2 * 3 * 4 * rays  # the image gradient and its rows copy
        regularized = any(float(w) > 0 for w in self.method.regularizers.values())
        reg_maps = p["pixel"] * rays if regularized else 0  # dR/dmap of every map
        kept_for_plan = kept_bound if mode == "deferred" else kept_initial
        plan_bytes = p["per_ray"] * rays + p["per_sample"] * kept_for_plan
        frame = p["pixel"] * rays + grad_maps + reg_maps + plan_bytes
        block = min(candidates, cfg.march_block_samples)
        planning = p["per_candidate"] * block + candidates  # block temporaries + the bool keep mask

        def at(coefficients: list[float], samples: float, n_rays: float) -> float:
            return coefficients[0] + coefficients[1] * samples + coefficients[2] * n_rays

        chunk_samples = max(cfg.chunk_samples, s)
        if mode == "deferred":
            # a chunk holds at most chunk_samples samples; its rays are at most all rays
            graph = at(c["graph"], chunk_samples, rays)
            rendering = max(at(c["grad"], chunk_samples, rays), at(c["no_grad"], chunk_samples, rays), graph)
            bound = f"one chunk of ≤ {chunk_samples:,} samples"
        else:
            graph = at(c["graph"], kept_initial, rays)
            last_chunk = at(c["grad"], chunk_samples, rays) - at(c["graph"], chunk_samples, rays)
            rendering = graph + max(0.0, last_chunk)
            bound = f"all {kept_initial:,.0f} kept samples of the initial scene ({p['kept_per_ray']:.1f}/ray; bound: {candidates:,})"
        persistent = self.persistent
        # gradients exist from the first backward to the optimiser step, i.e. not while planning
        working = max(planning, persistent.gradients + rendering)
        breakdown = (
            f"{views}×{resolution}² {mode}: params {_gib(persistent.parameters)} + AdamW {_gib(persistent.optimizer)}"
            f" + frame {_gib(frame)} (plan for ≤ {kept_for_plan:,.0f} samples) + max(planning {_gib(planning)},"
            f" grads {_gib(persistent.gradients)} + render {_gib(rendering)} (graph {_gib(graph)}: {bound}))"
        )
        return persistent.phase(index, views, resolution, "nerf", mode, frame, graph, working, breakdown)


class _SplatModel:
    """Splats at ``densify.max_gaussians`` (the initial count without densification).

    Parameters, gradients and Adam state are exact at the cap. The graph is measured for what
    every backend saves per (view, Gaussian): activations, covariances and the projection
    (saved-tensor hooks on the torch implementation, at two small counts, linear in N); gsplat's
    rasterisation adds its tile lists and per-pixel indices, which only CUDA can measure and
    this model leaves out. The torch rasteriser's dense tile evaluation (CPU preset) is larger."""

    def __init__(self, method: OptimizeConfig) -> None:
        from stages.scene.splats import SplatScene

        self.method = method
        cfg = copy.deepcopy(method.splats)
        cfg.backend = "torch"
        self.max_gaussians = cfg.densify.max_gaussians if cfg.densify.enabled else cfg.init_num_points
        self.per_view = []
        for n in (256, 512):
            scene_cfg = copy.deepcopy(cfg)
            scene_cfg.init_num_points, scene_cfg.init_ply = n, None
            scene_cfg.densify.enabled = False
            scene = SplatScene(scene_cfg, seed=0).train()
            self.per_view.append((n, self._projection_graph(scene)))
            if n == 256:
                persistent = _persistent(scene)
                fixed = scene.background.nbytes
        scale = self.max_gaussians / 256
        self.persistent = _Persistent(
            int((persistent.parameters - fixed) * scale + fixed),
            int((persistent.gradients - fixed) * scale + fixed),
            int((persistent.optimizer - 2 * fixed) * scale + 2 * fixed),
        )

    @staticmethod
    def _projection_graph(scene: Any) -> int:
        """Saved bytes of one view's activations + projection of the scene's Gaussians."""
        from stages.scene.cameras import orbit_cameras
        from stages.scene.splats.cameras import intrinsics_from_fovy, viewmats_from_c2w
        from stages.scene.splats.rasterize_torch import covariances, project

        cams = orbit_cameras(1, 15.0, 3.0, 40.0)
        with SavedTensors(parameter_storages(scene)) as saved:
            g = scene.gaussians()
            viewmats = viewmats_from_c2w(cams.c2w.float())
            project(g["means"], covariances(g["quats"], g["scales"]), g["opacities"], viewmats,
                    intrinsics_from_fovy(cams.fovy.float(), 64, 64), 64, 64)
        return saved.bytes

    def phases(self) -> list[TaskMemory]:
        return [self._phase(*p) for p in _phases(self.method)]

    def _phase(self, index: int, views: int, resolution: int) -> TaskMemory:
        mode = _backprop(self.method)
        chunk_views = views if mode == "direct" else min(views, self.method.splats.chunk_views)
        (n0, g0), (n1, g1) = self.per_view
        per_gaussian_view = (g1 - g0) / (n1 - n0)
        pixels = views * resolution * resolution
        chunk_pixels = chunk_views * resolution * resolution
        maps = 4 * (3 + 1 + 1 + 3)  # rgb, opacity, depth, normal
        graph = per_gaussian_view * self.max_gaussians * chunk_views + 2 * maps * chunk_pixels
        frame = pixels * maps + 2 * 3 * 4 * pixels
        persistent = self.persistent
        working = persistent.gradients + graph
        breakdown = (
            f"{views}×{resolution}² {mode} at {self.max_gaussians:,} Gaussians: params {_gib(persistent.parameters)}"
            f" + Adam {_gib(persistent.optimizer)} + frame {_gib(frame)} + grads {_gib(persistent.gradients)}"
            f" + graph {_gib(graph)} ({chunk_views} view(s); projection only, gsplat's tile buffers not modelled)"
        )
        return persistent.phase(index, views, resolution, "splats", mode, frame, graph, working, breakdown)


def format_task_memory(phases: Sequence[TaskMemory]) -> str:
    """One line per phase."""
    return "\n".join(f"phase {m.phase}: {m.breakdown}" for m in phases)


if __name__ == "__main__":  # pragma: no cover - a quick look: python -m stages.optimize.memory [key=value ...]
    import time

    from stages.optimize.config import load_optimize_config

    tick = time.perf_counter()
    result = task_memory(load_optimize_config(None, sys.argv[1:]))
    print(format_task_memory(result))
    print(f"({time.perf_counter() - tick:.1f} s)")
