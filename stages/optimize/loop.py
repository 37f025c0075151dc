"""The per-asset optimisation loop: render → guidance gradients → backward → step → checkpoint.

Every iteration renders ONE batch of views (groups of ``cameras.n_view``) and uses that same
render for both terms: the IP side (one t per image) and MVDream (one t per view group). The
renders receive ``α·grad_ip + β·grad_mvd`` (docs/ARCHITECTURE.md "The method"), plus the weighted
scene regularisers. The asset is registered once with each guidance family's settings
(``OptimizeConfig.guidance_settings``); each request carries only the step's renders, timesteps,
noise seed and cameras.

Back-propagation (``method.backprop``): a :class:`~stages.scene.base.DeferredScene` renders from
a per-iteration plan. In deferred mode the render runs without autograd, the guidance answers,
and the plan is rendered again chunk by chunk with autograd, each chunk back-propagated with its
slice of dL/d(image) at once, so the peak graph is one chunk's; direct mode keeps one graph of
the whole render. Both give the same gradients up to float rounding. An iteration moves device
values to the host once, at its end (the metrics, stacked).

Determinism: all randomness of iteration ``i`` comes from generators seeded by ``(seed, i,
stream)`` (cameras, shading, timesteps, the guidance noise seeds), and the global torch RNG
(used by scene internals such as sample jitter or background augmentation) is re-seeded
from ``(seed, i)`` inside :func:`torch.random.fork_rng`, so the caller's RNG is untouched and
a run resumed from a checkpoint repeats an uninterrupted run exactly.
"""

from __future__ import annotations

import hashlib
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.profiler import record_function

from stages.guidance.losses import loss_spec
from stages.guidance.protocol import Family, GuidanceRequest, GuidanceResponse
from stages.guidance.set import GuidanceSet
from stages.models.device import resolve_device
from stages.optimize.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, to_cpu
from stages.optimize.config import MVDREAM_ONLY, OptimizeConfig
from stages.optimize.schedules import sample_timesteps
from stages.scene.base import SHADINGS, Cameras, DeferredScene, image_rows
from stages.scene.cameras import preview_cameras, sample_cameras
from stages.scene.factory import build_scene
from stages.scene.views import render_views

NORMAL_REGULARIZERS = ("orient", "normal_smooth")
"""Terms a scene offers only for renders with normals (non-albedo shading, or NeRF
``shading.compute_normals``); skipped on renders without them."""

Callback = Callable[[int, dict[str, float], "Tensor | None"], None]
"""``callback(step, metrics, previews)``: ``previews`` is (V, 3, H, W) in [0, 1] every
``preview_every`` iterations, else ``None``. An exception raised here stops the run (the last
checkpoint stays valid)."""


class NonFiniteLossError(FloatingPointError):
    """An iteration's loss is NaN or infinite: the run stops before checkpointing it (the last
    checkpoint stays valid)."""


@dataclass
class OptimizeResult:
    scene: torch.nn.Module
    iterations: int
    """Iterations completed (== config.iterations on success)."""
    metrics: dict[str, float]
    """Final metrics: means of the last iterations' loss terms, timings, peak memory."""
    history: list[dict[str, float]] = field(default_factory=list)
    """One dict of scalars per iteration (restored from the checkpoint on resume)."""
    seconds: float = 0.0
    """Wall time of this call (not counting iterations done before a resume)."""
    resumed_from: int = 0
    """Iteration the run resumed from (0: fresh start)."""


def derive_seed(seed: int, iteration: int, stream: str) -> int:
    """A 63-bit seed for one random stream of one iteration (stable across processes)."""
    digest = hashlib.blake2b(f"{int(seed)}/{int(iteration)}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(seed: int, iteration: int, stream: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, iteration, stream))


def choose_shading(config: OptimizeConfig, step: int, generator: torch.Generator) -> str:
    """``albedo`` during ``albedo_only_fraction`` of the run, then drawn by the shading weights."""
    cfg = config.shading
    if step < cfg.albedo_only_fraction * config.iterations:
        return "albedo"
    weights = torch.tensor([cfg.albedo, cfg.diffuse, cfg.textureless], dtype=torch.float64)
    return SHADINGS[int(torch.multinomial(weights / weights.sum(), 1, generator=generator))]


def make_optimizer(scene: torch.nn.Module, config: OptimizeConfig) -> torch.optim.Optimizer:
    """AdamW over ``scene.param_groups(lr)`` with the configured betas / eps / weight decay
    (``param_groups`` fills learning rates missing from ``optimizer.lr`` with the scene's defaults)."""
    opt = config.optimizer
    groups = scene.param_groups(dict(opt.lr))
    return torch.optim.AdamW(
        groups, betas=(float(opt.betas[0]), float(opt.betas[1])), eps=float(opt.eps), weight_decay=config.weight_decay()
    )


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory on ``device``, or the process' peak RSS on the CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def check_guidance(config: OptimizeConfig, guidance: GuidanceSet, reference: Any | None) -> None:
    """Raise ``ValueError`` when the configured loss needs a guidance (or reference) that is missing."""
    if config.uses_ip and guidance.ip is None:
        raise ValueError(f"method.loss={config.loss!r} needs the IP / SD1.5 guidance, but GuidanceSet.ip is None")
    if config.uses_mvd and guidance.mvd is None:
        hint = "set method.mvd.enabled=false to drop the MVDream term" if config.loss not in MVDREAM_ONLY else ""
        raise ValueError(
            f"method.loss={config.loss!r} with the MVDream term needs GuidanceSet.mvd, but it is None; {hint}".rstrip("; ")
        )
    if config.uses_ip and loss_spec(config.loss, config.isd.sd_branch).uses_image_prompt and reference is None:
        raise ValueError(f"method.loss={config.loss!r} uses the image prompt and needs a reference image, got None")


def _term_weights(config: OptimizeConfig, step: int) -> tuple[float, float]:
    """(α, β) of this step: α on the IP side, β on MVDream."""
    if config.loss in MVDREAM_ONLY:
        return 0.0, float(config.mvd.weight)
    alpha, beta = config.schedule.weights(step, config.iterations)
    return float(alpha), float(beta) if config.mvd.enabled else 0.0


def use_deferred_backprop(config: OptimizeConfig, scene: torch.nn.Module) -> bool:
    """``method.backprop`` resolved for ``scene``: deferred needs a :class:`DeferredScene`."""
    supported = isinstance(scene, DeferredScene)
    if config.backprop == "deferred" and not supported:
        raise ValueError(
            f"method.backprop=deferred: {type(scene).__name__} cannot render in chunks (no plan_render / "
            "render_chunks); use method.backprop=auto or direct"
        )
    return supported and config.backprop != "direct"


def to_host_floats(values: dict[str, Tensor]) -> dict[str, float]:
    """Device scalars as Python floats, moved to the host in ONE transfer (one sync)."""
    if not values:
        return {}
    with record_function("d2h::metrics"):
        host = torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()
    return dict(zip(values, host))


def _timestep_metrics(asks: dict[str, GuidanceRequest]) -> dict[str, float]:
    """Mean t per slot (request timesteps live on the host)."""
    return {f"t_{slot}": float(request.timesteps.float().mean()) for slot, request in asks.items()}


def _response_metrics(asks: dict[str, GuidanceRequest], responses: dict[str, GuidanceResponse]) -> dict[str, float]:
    metrics = _timestep_metrics({slot: asks[slot] for slot in responses})
    for slot, response in responses.items():
        metrics[f"loss_{slot}"] = float(response.loss)
        metrics[f"grad_norm_{slot}"] = float(response.grad_norm)
    return metrics


class _Run:
    """State of one optimisation call (kept small: everything persistent is in the checkpoint)."""

    def __init__(self, config: OptimizeConfig, guidance: GuidanceSet, seed: int, asset_id: str, prompt: str, reference: Any | None, scene: torch.nn.Module, device: torch.device) -> None:
        self.config, self.guidance, self.seed, self.asset_id = config, guidance, int(seed), asset_id
        self.prompt, self.reference = prompt, reference
        self.scene, self.device = scene, device
        self.optimizer = make_optimizer(scene, config)
        self.deferred = use_deferred_backprop(config, scene)

    def register(self) -> None:
        """Register the asset once with each guidance family's settings."""
        self.guidance.register(self.asset_id, self.prompt, self.reference, self.config.guidance_settings())

    def _request(self, family: Family, rgb: Tensor, cameras: Cameras, timesteps: Tensor, step: int) -> GuidanceRequest:
        return GuidanceRequest(
            asset_id=self.asset_id,
            rgb=rgb,
            timesteps=timesteps,
            seed=derive_seed(self.seed, step, f"noise_{family}"),
            family=family,
            c2w=cameras.c2w,
            elevation=cameras.elevation,
            azimuth=cameras.azimuth,
            fovy=cameras.fovy,
        )

    def close(self) -> None:
        """Stop the guidance set's helper thread (if one was started)."""
        self.guidance.close()

    def _regularizer_loss(self, out: dict[str, Tensor], values: dict[str, Tensor]) -> Tensor | None:
        """Σ weight · term over the configured regularisers; their values go to ``values``."""
        weights = {k: float(v) for k, v in self.config.regularizers.items() if float(v) > 0}
        if not weights:
            return None
        terms = self.scene.regularizers(out)
        missing = sorted(set(weights) - set(terms) - set(NORMAL_REGULARIZERS))
        if missing:
            raise ValueError(
                f"method.regularizers.{missing[0]}: {type(self.scene).__name__} has no regulariser "
                f"{missing[0]!r} (it offers {sorted(terms)})"
            )
        total = None
        for name, weight in weights.items():
            if name not in terms:  # a normal-based term of a render without normals
                continue
            values[f"reg_{name}"] = terms[name].detach()
            total = weight * terms[name] if total is None else total + weight * terms[name]
        if total is not None:
            values["loss_reg"] = total.detach()
        return total

    def _render(self, cameras: Cameras, resolution: int, shading: str) -> tuple[Any, dict[str, Tensor]]:
        """(plan, render): with deferred back-propagation the render is made without autograd."""
        if not isinstance(self.scene, DeferredScene):
            return None, self.scene.render(cameras, resolution, resolution, shading=shading)
        plan = self.scene.plan_render(cameras, resolution, resolution, shading)
        if self.deferred:
            with torch.no_grad():
                return plan, self.scene.render_planned(plan)
        return plan, self.scene.render_planned(plan)

    def _backward_direct(self, step: int, out: dict[str, Tensor], grad: Tensor, values: dict[str, Tensor]) -> None:
        # d/dθ of Σ rgb·grad is exactly rgb.backward(grad)
        surrogate = (out["rgb"] * grad.to(out["rgb"].dtype)).sum()
        regularizer = self._regularizer_loss(out, values)
        if regularizer is not None:
            surrogate = surrogate + regularizer
        self.scene.step_pre_backward(step, out)
        surrogate.backward()

    def _backward_deferred(self, step: int, plan: Any, out: dict[str, Tensor], grad: Tensor, values: dict[str, Tensor]) -> None:
        """Chunk by chunk: each chunk's maps get dL/dmap at once, L = Σ rgb·grad + regularisers.

        The regularisers are differentiated on the whole (detached) render first: terms of the
        parameters alone reach θ directly, and terms of the images leave dR/dmap on leaf copies
        of the maps and sums, which the chunks then carry back with the guidance gradient. So
        every regulariser, pixel-separable or not (``normal_smooth``), keeps its exact value."""
        keys = [k for k in (*plan.map_keys, *plan.sum_keys) if k in out]
        leaves = {k: out[k].detach().requires_grad_(True) for k in keys}
        regularizer = self._regularizer_loss({**out, **leaves}, values)
        self.scene.step_pre_backward(step, out)
        if regularizer is not None and regularizer.requires_grad:
            regularizer.backward()
        grad_maps = {k: leaves[k].grad for k in plan.map_keys if k in leaves and leaves[k].grad is not None}
        grad_maps["rgb"] = grad.to(out["rgb"].dtype) + grad_maps.get("rgb", 0.0)
        rows = {k: image_rows(g) for k, g in grad_maps.items()}
        sums = {k: leaves[k].grad for k in plan.sum_keys if k in leaves and leaves[k].grad is not None}
        for chunk in self.scene.render_chunks(plan, out, step):
            parts = [(chunk.maps[k] * g[chunk.start : chunk.stop]).sum() for k, g in rows.items()]
            parts += [chunk.sums[k] * g for k, g in sums.items()]
            loss = torch.stack(parts).sum() if len(parts) > 1 else parts[0]
            if loss.requires_grad:
                loss.backward()

    def iteration(self, step: int) -> dict[str, float]:
        cfg, total = self.config, self.config.iterations
        resolution = cfg.schedule.resolution(step, total)
        batch = cfg.schedule.batch_size(step, total)
        cameras = sample_cameras(_generator(self.seed, step, "cameras"), batch, cfg.cameras)
        shading = choose_shading(cfg, step, _generator(self.seed, step, "shading"))
        plan, out = self._render(cameras.to(self.device), resolution, shading)
        alpha, beta = _term_weights(cfg, step)
        t_min, t_max = cfg.schedule.timestep_range(step, total)
        metrics: dict[str, float] = {
            "step": float(step), "alpha": alpha, "beta": beta, "t_min": t_min, "t_max": t_max,
            "resolution": float(resolution), "batch": float(batch), "shading": float(SHADINGS.index(shading)),
        }
        rgb_detached = out["rgb"].detach()
        asks: dict[Family, GuidanceRequest] = {}
        if alpha > 0:
            timesteps = sample_timesteps(_generator(self.seed, step, "t_ip"), batch, t_min, t_max, group=1)
            asks["ip"] = self._request("ip", rgb_detached, cameras, timesteps, step)
        if beta > 0:
            timesteps = sample_timesteps(_generator(self.seed, step, "t_mvd"), batch, t_min, t_max, group=cfg.cameras.n_view)
            asks["mvd"] = self._request("mvd", rgb_detached, cameras, timesteps, step)
        responses = self.guidance.ask(asks)
        grad = torch.zeros_like(rgb_detached, dtype=torch.float32)
        for slot, weight in (("ip", alpha), ("mvd", beta)):
            if slot in responses:
                grad += weight * responses[slot].grad_rgb.to(grad.device, torch.float32)
        metrics.update(_response_metrics(asks, responses))
        metrics["loss"] = alpha * metrics.get("loss_ip", 0.0) + beta * metrics.get("loss_mvd", 0.0)
        values: dict[str, Tensor] = {"grad_norm_rgb": grad.norm()}
        if plan is not None and self.deferred:
            self._backward_deferred(step, plan, out, grad, values)
        else:
            self._backward_direct(step, out, grad, values)
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if cfg.optimizer.grad_clip > 0 and params:
            values["grad_norm_params"] = torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # after the step, as gsplat's trainer: refined (cloned / split / pruned) Gaussians have had
        # this iteration's update, and their Adam moments move with them
        self.scene.step_post_backward(step, out, self.optimizer)
        values["opacity_mean"] = out["opacity"].detach().float().mean()
        metrics.update(to_host_floats(values))
        return metrics

    def state(self, iteration: int, history: list[dict[str, float]]) -> dict[str, Any]:
        return {
            "iteration": iteration,
            "scene": to_cpu(self.scene.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"seed": self.seed, "scheme": "derive_seed(seed, iteration, stream)", "torch_cpu": torch.get_rng_state()},
            "seed": self.seed,
            "asset_id": self.asset_id,
            "config_digest": self.config.resume_digest(),
            "history": history,
        }

    def restore(self, state: dict[str, Any], where: Path) -> tuple[int, list[dict[str, float]]]:
        expected = {"seed": self.seed, "asset_id": self.asset_id, "config_digest": self.config.resume_digest()}
        for key, value in expected.items():
            if state.get(key) != value:
                raise CheckpointError(
                    f"checkpoint in {where} was written with {key}={state.get(key)!r}, this run has {value!r}; "
                    "use another checkpoint_dir or delete it"
                )
        self.scene.load_state_dict(state["scene"])
        self.scene.to(self.device)
        self.optimizer = make_optimizer(self.scene, self.config)  # the scene may have resized
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["iteration"]), [dict(h) for h in state.get("history", [])]


def _final_metrics(history: list[dict[str, float]], seconds: float, iterations_run: int, device: torch.device) -> dict[str, float]:
    tail = history[-max(1, len(history) // 10):] if history else []
    keys = sorted({k for h in tail for k in h if k.startswith(("loss", "grad_norm", "reg_", "opacity"))})
    metrics = {k: float(sum(h[k] for h in tail if k in h) / max(1, sum(k in h for h in tail))) for k in keys}
    metrics.update(
        iterations=float(len(history)),
        seconds=seconds,
        iterations_per_second=iterations_run / seconds if seconds > 0 and iterations_run else 0.0,
        peak_memory_mb=peak_memory_mb(device),
    )
    return metrics


def optimize_asset(
    config: OptimizeConfig,
    guidance: GuidanceSet,
    reference: Any | None,
    seed: int,
    checkpoint_dir: Path | str,
    prompt: str,
    asset_id: str,
    callback: Callback | None = None,
    *,
    scene: torch.nn.Module | None = None,
) -> OptimizeResult:
    """Optimise one asset's scene for ``config.iterations`` steps; resume from ``checkpoint_dir``.

    ``reference`` is the PIL reference image for the IP side (``None`` for losses without
    image prompt). ``scene`` overrides the scene built from ``config`` (tests, benchmarks).
    Registers the asset with each guidance family's settings once. Stops with
    :class:`NonFiniteLossError` (naming the iteration) when the loss is NaN or infinite, before
    that iteration is checkpointed.
    """
    config.validate()
    check_guidance(config, guidance, reference)
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    checkpoint_dir = Path(checkpoint_dir)
    scene = (build_scene(config, seed) if scene is None else scene).to(device)
    scene.train()
    run = _Run(config, guidance, seed, asset_id, prompt, reference, scene, device)
    start, history = 0, []
    state = load_checkpoint(checkpoint_dir)
    if state is not None:
        start, history = run.restore(state, checkpoint_dir)
    run.register()
    total = config.iterations
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    progress = _progress_bar(config.progress, start, total, asset_id)
    began = time.perf_counter()
    try:
        for step in range(start, total):
            tick = time.perf_counter()
            with torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(derive_seed(seed, step, "global"))
                metrics = run.iteration(step)  # ends with one device-to-host transfer: no extra sync needed
            check_finite_loss(metrics, step, asset_id)
            elapsed = time.perf_counter() - tick
            metrics.update(seconds=elapsed, its=1.0 / max(elapsed, 1e-9), peak_memory_mb=peak_memory_mb(device))
            history.append(metrics)
            done = step + 1
            if done == total or (config.checkpoint_every and done % config.checkpoint_every == 0):
                save_checkpoint(checkpoint_dir, run.state(done, history))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']:.4g}", refresh=False)
            if callback is not None:
                previews = None
                if config.preview_every and done % config.preview_every == 0:
                    previews = render_views(run.scene, preview_cameras(config.cameras), config.preview_resolution)["rgb"]
                callback(step, metrics, previews)
    finally:
        run.close()
        if progress is not None:
            progress.close()
    seconds = time.perf_counter() - began
    return OptimizeResult(
        scene=run.scene,
        iterations=total,
        metrics=_final_metrics(history, seconds, total - start, device),
        history=history,
        seconds=seconds,
        resumed_from=start,
    )


def check_finite_loss(metrics: dict[str, float], step: int, asset_id: str) -> None:
    """Raise :class:`NonFiniteLossError` naming the iteration and the loss terms when the loss is NaN / inf."""
    loss = metrics.get("loss")
    if loss is None or math.isfinite(loss):
        return
    terms = ", ".join(f"{k}={v}" for k, v in sorted(metrics.items()) if k.startswith("loss_"))
    raise NonFiniteLossError(f"asset {asset_id!r}: non-finite loss {loss} at iteration {step} ({terms})")


def _progress_bar(enabled: bool, start: int, total: int, asset_id: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=asset_id, unit="it", dynamic_ncols=True)


def psnr(a: Tensor, b: Tensor) -> float:
    """Peak signal-to-noise ratio (dB) of two images in [0, 1]."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return math.inf if mse == 0 else -10.0 * math.log10(mse)
