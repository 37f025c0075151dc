"""Full-size benchmark: SD1.5 + IP-Adapter (ISD) and MVDream guidance built from their configs.

    python -m benchmarks.full [--quick] [--out benchmarks/out/full.json] [--device auto] [--compile]

No weights are downloaded: every model is its real architecture with seeded random weights
(timings and FLOPs do not depend on the weights). On CUDA it measures, at the paper's settings
(ISD at 512 px = 64² latents, MVDream at 256 px = 32² latents, 4 views, NeRF renders 8 views
at 64² then 4 views at 256² from half-way):

- seconds per optimisation iteration of the real loop (``optimize_asset``: render, both
  guidance terms, backward, Adam) in each phase; assets per GPU-hour at 6000 iterations;
  peak GPU memory;
- batching gain: k assets' requests answered by ONE ``grad`` call vs k calls (k = 1, 2, 4, 8);
- dtype (fp32 / fp16 / bf16), SDPA backend and ``torch.compile`` effects on the ISD UNet forward;
- FLOPs per iteration (``torch.utils.flop_counter.FlopCounterMode``: both guidance calls, UNets +
  VAE encoder forward/backward + text/image encoders not included since they run once per
  asset) and the fraction of the card's peak dense bf16/fp16 throughput that this reaches;
- FLOPs per asset for each ``isd.sd_branch`` (``vanilla``: 4 UNet rows per view, ``ip_null``: 2)
  and representation, the real ``grad`` calls of the full-size models counted on ``meta``.

On CPU everything runs at tiny size (``"size": "tiny-cpu"``) and says so; the FLOPs of the
full-size guidance are still counted there on the ``meta`` device (no memory, no compute).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image

from benchmarks.common import environment, format_table, synchronize, time_call, write_json
from stages.guidance.ip_guidance import IPComponents, IPGuidance
from stages.guidance.mvdream_guidance import MVDreamGuidance
from stages.guidance.protocol import GuidanceRequest, IPSettings, MVDreamSettings
from stages.guidance.runtime import GuidanceRuntime
from stages.models.architecture import MVDREAM_SD21_4VIEW, SD15_IP_BASE, TINY_IP, TINY_MVDREAM, build_ip, build_mvdream
from stages.models.device import resolve_device
from stages.models.tiny import TINY_RENDER_RESOLUTION
from stages.optimize.config import OptimizeConfig
from stages.scene.cameras import CameraConfig, sample_cameras

DEFAULT_OUT = Path("benchmarks/out/full.json")
ITERATIONS_PER_ASSET = 6000

PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM / HBM3
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)
"""Dense bf16/fp16 tensor-core peak (TFLOP/s) by device-name substring, first match wins."""


def peak_tflops(device_name: str | None) -> float | None:
    """Spec-sheet dense bf16 peak of a card by name; None when unknown (or CPU)."""
    if not device_name:
        return None
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


# ----------------------------------------------------------------------------- models
def build_ip_guidance(
    full: bool,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int = 0,
    runtime: GuidanceRuntime | None = None,
) -> IPGuidance:
    """SD1.5 + ``ip-adapter_sd15`` + ViT-H/14 at real size with random weights (``full``), or the tiny preset."""
    sd, ip = build_ip(SD15_IP_BASE if full else TINY_IP, device, dtype, seed)
    resolution = 512 if full else TINY_RENDER_RESOLUTION
    return IPGuidance(IPComponents(sd, ip), render_resolution=resolution, runtime=runtime)


def build_mvd_guidance(full: bool, device: torch.device | str, dtype: torch.dtype, seed: int = 0, runtime: GuidanceRuntime | None = None) -> MVDreamGuidance:
    """MVDream (SD2.1-base 4-view UNet with camera embedding) guidance, real size or tiny."""
    parts = build_mvdream(MVDREAM_SD21_4VIEW if full else TINY_MVDREAM, device, dtype, seed)
    resolution = 256 if full else TINY_RENDER_RESOLUTION
    return MVDreamGuidance(parts, render_resolution=resolution, runtime=runtime)


# ----------------------------------------------------------------------------- requests
def register_assets(ip: IPGuidance | None, mvd: MVDreamGuidance | None, count: int, sd_branch: str = "vanilla") -> list[str]:
    """``count`` assets registered as the loop registers them: the method's defaults (ISD with
    view prompts; MVDream recon loss at CFG 50), ``sd_branch`` on the IP side."""
    ids = [f"bench-{k}" for k in range(count)]
    for k, asset_id in enumerate(ids):
        reference = Image.new("RGB", (64, 64), (40 * k % 256, 90, 160))
        if ip is not None:
            ip.register(asset_id, f"a ceramic teapot number {k}", reference, IPSettings(sd_branch=sd_branch))
        if mvd is not None:
            mvd.register(asset_id, f"a ceramic teapot number {k}", None, MVDreamSettings())
    return ids


def make_request(asset_id: str, kind: str, views: int, resolution: int, seed: int) -> GuidanceRequest:
    """A request as the loop builds it: ``ip`` (ISD, one t per view) or ``mvd`` (one t per 4 views)."""
    g = torch.Generator().manual_seed(seed)
    cameras = sample_cameras(g, views, CameraConfig())
    rgb = torch.rand(views, 3, resolution, resolution, generator=g)
    common = dict(
        asset_id=asset_id, rgb=rgb, seed=seed, c2w=cameras.c2w, elevation=cameras.elevation, azimuth=cameras.azimuth,
        fovy=cameras.fovy,
    )
    if kind == "ip":
        t = torch.randint(20, 980, (views,), generator=g)
        return GuidanceRequest(timesteps=t, family="ip", **common)
    t = torch.randint(20, 980, (views // 4,), generator=g).repeat_interleave(4)
    return GuidanceRequest(timesteps=t, family="mvd", **common)


# ----------------------------------------------------------------------------- measurements
def iteration_seconds(
    ip: IPGuidance, mvd: MVDreamGuidance, full: bool, device: torch.device, iterations: int
) -> list[dict[str, Any]]:
    """Seconds per iteration of the real loop in both resolution phases (median after warm-up)."""
    from stages.optimize.schedules import ScheduleConfig
    from stages.guidance.set import GuidanceSet
    from stages.optimize.config import OptimizeConfig
    from stages.optimize.loop import optimize_asset

    phases = [(8, 64), (4, 256)] if full else [(8, 16), (4, 32)]
    rows = []
    reference = Image.new("RGB", (64, 64), (200, 120, 40))
    for batch, resolution in phases:
        config = OptimizeConfig() if full else OptimizeConfig.tiny()
        config.iterations = iterations
        config.device = str(device)
        config.checkpoint_every = 0
        config.schedule = ScheduleConfig(milestones=[0.5], resolutions=[resolution, resolution], batch_sizes=[batch, batch])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row: dict[str, Any] = {"views": batch, "render": resolution, "scene": f"{config.representation} ({'paper' if full else 'tiny'} config)"}
        try:
            with tempfile.TemporaryDirectory() as work:
                result = optimize_asset(config, GuidanceSet(ip=ip, mvd=mvd), reference, 0, Path(work), "a ceramic teapot", f"iter-{resolution}")
        except torch.OutOfMemoryError as error:  # reported; the next phase and sections still run
            row.update(seconds_per_iteration=None, peak_memory_gb=None, error=f"OutOfMemoryError: {str(error).splitlines()[0][:200]}")
            torch.cuda.empty_cache()
            rows.append(row)
            continue
        seconds = [h["seconds"] for h in result.history[1:]] or [result.history[0]["seconds"]]
        row["seconds_per_iteration"] = statistics.median(seconds)
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        if full:
            row["memory_model_gb"] = in_process_memory_model(config, ip, mvd, batch, resolution)
        rows.append(row)
    return rows


def in_process_memory_model(config: OptimizeConfig, ip: IPGuidance, mvd: MVDreamGuidance, views: int, render: int) -> dict[str, Any]:
    """What the memory plan predicts for this process (both guidance models and one optimiser task
    in one process, one request at a time): every weight, the larger guidance call's activations
    (the calls run one after the other), the task's peak when ``task_memory`` is present."""
    from pipeline.memory_plan import default_task_memory
    from stages.guidance.memory import ActorSpec, actor_memory

    dtype = str(ip.sd.dtype).replace("torch.", "")
    common = dict(dtype=dtype, requests=1, views=views, render=render)
    ip_memory, _ = actor_memory(ActorSpec("ip", SD15_IP_BASE, model_resolution=512, vae_chunk=ip.runtime.vae_chunk, unet_rows=ip.runtime.unet_rows, **common))
    mvd_memory, _ = actor_memory(ActorSpec("mvd", MVDREAM_SD21_4VIEW, model_resolution=256, vae_chunk=mvd.runtime.vae_chunk, unet_rows=mvd.runtime.unet_rows, **common))
    task_fn = default_task_memory()
    task = max(int(p.peak_bytes) for p in task_fn(config)) if task_fn is not None else None
    guidance = ip_memory.weights + mvd_memory.weights + max(ip_memory.activations, mvd_memory.activations)
    return {
        "guidance_gb": guidance / 2**30,
        "task_gb": None if task is None else task / 2**30,
        "total_gb": None if task is None else (guidance + task) / 2**30,
    }


def batching_gain(guidance: Any, kind: str, counts: Sequence[int], views: int, resolution: int, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """k assets' requests in ONE ``grad`` call vs k separate calls; gain = separate / batched."""
    ids = [f"bench-{k}" for k in range(max(counts))]
    rows = []
    for count in counts:
        requests = [make_request(ids[k], kind, views, resolution, seed=100 + k) for k in range(count)]
        batched = time_call(lambda: guidance.grad(requests), repeats=repeats, warmup=1, device=device)
        separate = time_call(lambda: [guidance.grad([r]) for r in requests], repeats=repeats, warmup=0, device=device)
        rows.append({"guidance": kind, "assets": count, "batched_s": batched, "separate_s": separate, "gain": separate / batched})
    return rows


def _isd_unet_inputs(unet: UNet2DConditionModel, views: int, latent: int, embed_dim: int, device, dtype) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    rows = 4 * views  # IP-cond, IP-uncond, SD-cond, SD-uncond per view
    return {
        "sample": torch.randn(rows, 4, latent, latent, generator=g).to(device, dtype),
        "timestep": torch.randint(20, 980, (rows,), generator=g).to(device),
        "encoder_hidden_states": torch.randn(rows, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype),
        "added_cond_kwargs": {"image_embeds": [torch.randn(rows, 1, embed_dim, generator=g).to(device, dtype)]},
    }


def unet_variants(full: bool, device: torch.device, dtypes: Sequence[torch.dtype], compile_unet: bool, repeats: int) -> dict[str, Any]:
    """The ISD UNet forward (4 views · 4 evaluations, per-sample IP scale) by dtype, SDPA backend
    and ``torch.compile``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks.guidance import build_unet
    from stages.models.ip_adapter import per_sample_ip_scale

    latent = 64 if full else 8
    scales = torch.tensor([0.5] * 8 + [0.0] * 8)
    out: dict[str, Any] = {"latent": latent, "rows": 16, "dtype": [], "sdpa": [], "compile": None}
    fastest = None
    for dtype in dtypes:
        unet, embed_dim = build_unet(full, device, dtype)
        inputs = _isd_unet_inputs(unet, 4, latent, embed_dim, device, dtype)

        def forward(model=unet, inputs=inputs, base=unet) -> None:
            # the scale processors live on the eager UNet's modules, which a compiled UNet shares
            with torch.no_grad(), per_sample_ip_scale(base, scales):
                model(**inputs)

        seconds = time_call(forward, repeats=repeats, warmup=1, device=device)
        out["dtype"].append({"dtype": str(dtype).replace("torch.", ""), "seconds": seconds})
        if dtype == dtypes[-1]:
            backends = [("default", None), ("math", SDPBackend.MATH)]
            if device.type == "cuda":
                backends += [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]
            for name, backend in backends:
                context = contextlib.nullcontext() if backend is None else sdpa_kernel(backend)
                try:
                    with context:
                        value = time_call(forward, repeats=repeats, warmup=1, device=device)
                except RuntimeError as error:  # backend not available for this dtype / card
                    out["sdpa"].append({"backend": name, "dtype": str(dtype).replace("torch.", ""), "seconds": None, "note": str(error).splitlines()[0][:120]})
                    continue
                out["sdpa"].append({"backend": name, "dtype": str(dtype).replace("torch.", ""), "seconds": value, "note": ""})
            if compile_unet:
                out["compile"] = _compile_effect(unet, forward, seconds, dtype, device, repeats)
            fastest = seconds
        del unet
    out["reference_s"] = fastest
    return out


def _compile_effect(unet: UNet2DConditionModel, forward: Callable[..., None], eager_s: float, dtype: torch.dtype, device: torch.device, repeats: int) -> dict[str, Any]:
    """``torch.compile`` of the UNet: first-call (compile) time and steady-state speed-up; a
    compile failure is reported, not raised."""
    name = str(dtype).replace("torch.", "")
    try:
        compiled = torch.compile(unet)
        start = time.perf_counter()
        forward(compiled)
        synchronize(device)
        first = time.perf_counter() - start
        value = time_call(lambda: forward(compiled), repeats=repeats, warmup=1, device=device)
    except Exception as error:  # noqa: BLE001 - inductor / dynamo failures end up in the JSON
        return {"dtype": name, "eager_s": eager_s, "compiled_s": None, "speedup": None, "first_call_s": None, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    return {"dtype": name, "eager_s": eager_s, "compiled_s": value, "speedup": eager_s / value, "first_call_s": first, "error": ""}


def count_flops(ip: IPGuidance, mvd: MVDreamGuidance, views: int, ip_resolution: int, mvd_resolution: int) -> dict[str, float]:
    """FLOPs of one iteration's two guidance calls (one asset, ``views`` views), by counter."""
    from torch.utils.flop_counter import FlopCounterMode

    register_assets(ip, mvd, 1)
    result = {}
    for name, guidance, kind, resolution in (("ip", ip, "ip", ip_resolution), ("mvd", mvd, "mvd", mvd_resolution)):
        request = make_request("bench-0", kind, views, resolution, seed=7)
        counter = FlopCounterMode(display=False)
        with counter:
            guidance.grad([request])
        result[f"{name}_flops"] = float(counter.get_total_flops())
    result["total_flops"] = result["ip_flops"] + result["mvd_flops"]
    return result


def guidance_flops_by_module(ip: IPGuidance, mvd: MVDreamGuidance, views: int = 4, ip_resolution: int = 512, mvd_resolution: int = 256) -> dict[str, float]:
    """FLOPs of the model work of one iteration, module by module (works on ``meta``):

    - ISD: VAE encode of ``views`` renders at ``ip_resolution`` + its backward; one UNet forward
      of 4·views rows (IP-cond, IP-uncond, SD-cond, SD-uncond) with the IP-Adapter attention;
    - MVDream: VAE encode at ``mvd_resolution`` + backward; one multi-view UNet forward of
      2·views rows (cond / uncond, CFG) with camera embeddings.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from stages.models.mvdream import mvdream_forward

    sd_unet, sd_vae = ip.sd.unet, ip.sd.vae
    embed_dim = int(ip.ip.image_encoder.config.projection_dim)  # ViT-H: 1024
    device, dtype = next(sd_unet.parameters()).device, next(sd_unet.parameters()).dtype

    def count(fn: Callable[[], Any]) -> float:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return float(counter.get_total_flops())

    def vae_encode_backward(vae: AutoencoderKL, resolution: int) -> None:
        x = torch.rand(views, 3, resolution, resolution, device=device, dtype=dtype, requires_grad=True)
        latents = vae.encode(x).latent_dist.mean
        latents.backward(torch.ones_like(latents))

    def isd_unet() -> None:
        rows, latent = 4 * views, ip_resolution // 8
        with torch.no_grad():
            sd_unet(
                torch.rand(rows, 4, latent, latent, device=device, dtype=dtype),
                torch.full((rows,), 500, device=device),
                encoder_hidden_states=torch.rand(rows, 77, sd_unet.config.cross_attention_dim, device=device, dtype=dtype),
                added_cond_kwargs={"image_embeds": [torch.rand(rows, 1, embed_dim, device=device, dtype=dtype)]},
            )

    mv_unet = mvd.models.unet

    def mvd_unet() -> None:
        rows, latent = 2 * views, mvd_resolution // 8
        with torch.no_grad():
            mvdream_forward(
                mv_unet,
                torch.rand(rows, 4, latent, latent, device=device, dtype=dtype),
                torch.full((rows,), 500, device=device),
                torch.rand(rows, 77, mv_unet.config.cross_attention_dim, device=device, dtype=dtype),
                torch.rand(rows, 16, device=device, dtype=dtype),
            )

    out = {
        "isd_vae_encode_backward": count(lambda: vae_encode_backward(sd_vae, ip_resolution)),
        "isd_unet": count(isd_unet),
        "mvd_vae_encode_backward": count(lambda: vae_encode_backward(mvd.models.vae, mvd_resolution)),
        "mvd_unet": count(mvd_unet),
    }
    out["total_flops"] = sum(out.values())
    return out


def full_size_flops_on_meta() -> dict[str, Any]:
    """FLOPs per iteration of the full-size guidance in both phases of the paper's schedule
    (8 views, then 4 views; renders resized to 512² for ISD and 256² for MVDream either way),
    counted on the ``meta`` device: nothing is materialised. Also FLOPs per asset (6000 its)."""
    meta = torch.device("meta")
    try:
        ip = build_ip_guidance(True, meta, torch.float32)
        mvd = build_mvd_guidance(True, meta, torch.float32)
        phases = {views: guidance_flops_by_module(ip, mvd, views=views, ip_resolution=512, mvd_resolution=256) for views in (8, 4)}
    except Exception as error:  # noqa: BLE001 - reported, the rest of the benchmark still runs
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    half = ITERATIONS_PER_ASSET // 2
    return {
        "phase1_8_views": phases[8],
        "phase2_4_views": phases[4],
        "per_asset_flops": half * (phases[8]["total_flops"] + phases[4]["total_flops"]),
        "note": "model work of both guidance terms (ISD at 512², MVDream at 256²); NeRF render/backward, "
        "Adam and the once-per-asset text/image encoders not counted",
    }


def phase_iterations(config: OptimizeConfig) -> list[tuple[int, int, int]]:
    """(views, render resolution, iterations) of each phase of ``config``'s schedule."""
    total, schedule = config.iterations, config.schedule
    bounds = [0, *schedule.milestone_steps(total), total]
    return [
        (int(views), int(res), max(0, end - start))
        for views, res, start, end in zip(schedule.batch_sizes, schedule.resolutions, bounds[:-1], bounds[1:])
    ]


def guidance_call_flops(guidance: Any, kind: str, views: int, render: int) -> float:
    """FLOPs of one real ``grad`` call (one asset, ``views`` renders at ``render``²), counted by
    ``FlopCounterMode``; on meta, host reads are answered by the memory tracker's shim."""
    from torch.utils.flop_counter import FlopCounterMode

    from stages.models.memory import LiveBytes

    request = make_request("bench-0", kind, views, render, seed=7)
    counter = FlopCounterMode(display=False)
    with LiveBytes("meta"), counter:
        guidance.grad([request])
    return float(counter.get_total_flops())


def nerf_field_flops_per_sample(config: Any, samples: int = 4096) -> dict[str, float]:
    """Counted FLOPs per sample of the NeRF field (hash-grid features → density and albedo MLPs):
    forward, and forward + backward to the parameters. Only matmuls count (FlopCounterMode); the
    hash-grid lookups and interpolation are memory work, not FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from stages.scene.nerf.field import NeRFField

    cfg = copy.deepcopy(config)
    cfg.backend = "torch"
    field = NeRFField(cfg, torch.Generator().manual_seed(0))
    points = torch.rand(samples, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            field(points)
    with FlopCounterMode(display=False) as both:
        out = field(points)
        (out["density"].sum() + out["albedo"].sum()).backward()
    return {"forward": forward.get_total_flops() / samples, "forward_backward": both.get_total_flops() / samples}


def flops_per_asset(full: bool = True) -> dict[str, Any]:
    """FLOPs of one asset at the paper's method (``OptimizeConfig()``), for each ``isd.sd_branch``
    and representation: both guidance calls of every iteration counted on the real ``grad`` code
    (full-size models on meta; ``full=False``: the tiny models, for tests) phase by phase, plus the
    scene's render: NeRF field FLOPs per sample × every sample of every ray (the renderer's
    ``num_samples_per_ray``, before occupancy pruning: an upper bound), forward + backward, and one
    more forward where the render is deferred (``method.backprop``); splats: gsplat's CUDA
    rasteriser is not counted (elementwise and sort work, no matmuls)."""
    from stages.guidance.losses import SD_BRANCHES
    from stages.optimize.config import Representation

    device = torch.device("meta") if full else torch.device("cpu")
    method = OptimizeConfig()
    phases = phase_iterations(method)
    mvd = build_mvd_guidance(full, device, torch.float32)
    register_assets(None, mvd, 1)
    mvd_calls = [guidance_call_flops(mvd, "mvd", views, render) for views, render, _ in phases]
    per_sample = nerf_field_flops_per_sample(method.nerf) if full else None
    samples = sum(its * views * render * render * method.nerf.renderer.num_samples_per_ray for views, render, its in phases)
    rows = []
    for branch in SD_BRANCHES:
        ip = build_ip_guidance(full, device, torch.float32)
        register_assets(ip, None, 1, sd_branch=branch)
        ip_calls = [guidance_call_flops(ip, "ip", views, render) for views, render, _ in phases]
        guidance = sum(its * (a + b) for (_, _, its), a, b in zip(phases, ip_calls, mvd_calls))
        for representation in Representation.values():
            scene = None
            if representation == "nerf" and per_sample is not None:
                scene = samples * (per_sample["forward_backward"] + per_sample["forward"])
            rows.append({
                "sd_branch": branch,
                "representation": representation,
                "unet_rows_per_view": 4 if branch == "vanilla" else 2,
                "guidance_tflop_per_iteration": [(a + b) / 1e12 for a, b in zip(ip_calls, mvd_calls)],
                "guidance_pflop_per_asset": guidance / 1e15,
                "scene_pflop_per_asset_bound": None if scene is None else scene / 1e15,
                "total_pflop_per_asset": (guidance + (scene or 0.0)) / 1e15,
            })
    return {
        "phases": [{"views": v, "render": r, "iterations": i} for v, r, i in phases],
        "mvd_tflop_per_iteration": [b / 1e12 for b in mvd_calls],
        "nerf_field_flops_per_sample": per_sample,
        "rows": rows,
        "note": "guidance: VAE encode + input-gradient backward and the UNet forwards of both guidance calls per "
        "iteration (text/image encoders run once per asset: not counted); scene: NeRF upper bound (every sample "
        "of every ray, deferred render's extra forward included), splats not counted; Adam not counted",
    }


# ----------------------------------------------------------------------------- driver
def run(device: torch.device, quick: bool, compile_unet: bool, out: Path | None = None) -> dict[str, Any]:
    """Every section in order of importance, the JSON rewritten to ``out`` after each."""
    full = device.type == "cuda" and not quick
    size = "full" if full else ("tiny-cpu" if device.type == "cpu" else "tiny")
    iterations = 2 if quick else (8 if full else 3)
    repeats = 1 if quick else (3 if full else 2)
    counts = (1, 2) if quick else ((1, 2, 4, 8) if full else (1, 2, 4))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    results: dict[str, Any] = {
        "benchmark": "full",
        "size": size,
        "note": "real architectures, random weights" if full else "TINY models on CPU: not representative of GPU speed",
        "environment": environment(device),
        "dtype": str(dtype).replace("torch.", ""),
    }
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    results["card"] = card
    results["peak_tflops"] = peak_tflops(card)

    def save() -> None:  # after every section: a step killed by its timeout keeps what it measured
        if out is not None:
            write_json(results, out)

    ip = build_ip_guidance(full, device, dtype)
    mvd = build_mvd_guidance(full, device, dtype)
    register_assets(ip, mvd, max(counts))
    results["iteration"] = iteration_seconds(ip, mvd, full, device, iterations)
    half = ITERATIONS_PER_ASSET // 2
    timed = [row["seconds_per_iteration"] for row in results["iteration"]]
    seconds_per_asset = sum(half * s for s in timed) if None not in timed else None
    results["seconds_per_asset"] = seconds_per_asset
    results["assets_per_gpu_hour"] = 3600.0 / seconds_per_asset if seconds_per_asset else None
    memories = [row["peak_memory_gb"] for row in results["iteration"] if row["peak_memory_gb"] is not None]
    results["peak_memory_gb"] = max(memories) if memories else None
    save()
    if not quick:
        results["flops_per_asset"] = flops_per_asset(full=True)
        save()

    ip_res, mvd_res = (256, 256) if full else (32, 32)
    results["batching"] = batching_gain(ip, "ip", counts, 4, ip_res, device, repeats) + batching_gain(mvd, "mvd", counts, 4, mvd_res, device, repeats)
    save()

    flops = count_flops(ip, mvd, 4, ip_res, mvd_res)
    phase2 = results["iteration"][-1]["seconds_per_iteration"]
    achieved = flops["total_flops"] / phase2 / 1e12 if phase2 else None
    flops.update(views=4, render=mvd_res, achieved_tflops=achieved)
    flops["fraction_of_peak"] = achieved / results["peak_tflops"] if results["peak_tflops"] and achieved else None
    results["flops"] = flops
    save()
    del ip, mvd
    if device.type == "cuda":
        torch.cuda.empty_cache()

    dtypes = [torch.float32, torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.bfloat16]
    if quick:
        dtypes = dtypes[-1:]
    results["unet"] = unet_variants(full, device, dtypes, compile_unet, repeats)
    save()
    if not full and not quick:
        results["full_size_flops_meta"] = full_size_flops_on_meta()
        save()
    return results


def print_flops_per_asset(flops: dict[str, Any]) -> None:
    phases = ", ".join(f"{p['iterations']} its of {p['views']} views at {p['render']}²" for p in flops["phases"])
    print(f"\nFLOPs per asset, full size, counted on meta (paper schedule: {phases})")
    rows = [
        {
            "sd_branch": r["sd_branch"],
            "representation": r["representation"],
            "UNet rows/view": r["unet_rows_per_view"],
            "guidance TFLOP/it": " / ".join(f"{v:.2f}" for v in r["guidance_tflop_per_iteration"]),
            "guidance PFLOP": r["guidance_pflop_per_asset"],
            "scene PFLOP (bound)": "not counted" if r["scene_pflop_per_asset_bound"] is None else r["scene_pflop_per_asset_bound"],
            "total PFLOP": r["total_pflop_per_asset"],
        }
        for r in flops["rows"]
    ]
    print(format_table(rows))
    print(f"({flops['note']})")


def print_report(results: dict[str, Any]) -> None:
    print(f"benchmarks.full — size: {results['size']} ({results['note']}); card: {results['card'] or 'none'}; dtype {results['dtype']}")
    rows = [{**row, "model_gb": (row.get("memory_model_gb") or {}).get("total_gb") or (row.get("memory_model_gb") or {}).get("guidance_gb")} for row in results["iteration"]]
    print(format_table(rows, ["views", "render", "seconds_per_iteration", "peak_memory_gb", "model_gb", "scene"]))
    print("(model_gb: the memory plan's figure for this process; without task_memory, its guidance part only)")
    for row in results["iteration"]:
        if row.get("error"):
            print(f"  {row['views']} views at {row['render']}²: {row['error']}")
    rate = results["assets_per_gpu_hour"]
    print(f"assets per GPU-hour at {ITERATIONS_PER_ASSET} iterations: {rate:.4g}" if rate else "assets per GPU-hour: not measured")
    print("\nbatching (k assets in one grad call)")
    print(format_table(results["batching"], ["guidance", "assets", "batched_s", "separate_s", "gain"]))
    f = results["flops"]
    peak = results["peak_tflops"]
    achieved = f"{f['achieved_tflops']:.4g}" if f["achieved_tflops"] else "-"
    print(f"\nFLOPs per iteration (guidance, 4 views): {f['total_flops']:.4g}; achieved {achieved} TFLOP/s; peak {peak if peak else 'unknown'}")
    print("\nISD UNet forward by dtype")
    print(format_table(results["unet"]["dtype"], ["dtype", "seconds"]))
    print(format_table(results["unet"]["sdpa"], ["backend", "dtype", "seconds", "note"]))
    if results["unet"]["compile"]:
        print(format_table([results["unet"]["compile"]]))
    if "full_size_flops_meta" in results:
        meta = results["full_size_flops_meta"]
        if "error" in meta:
            print(f"\nfull-size FLOPs on meta: {meta['error']}")
        else:
            print(
                f"\nfull-size FLOPs per iteration (meta device): phase 1 (8 views) {meta['phase1_8_views']['total_flops']:.4g}, "
                f"phase 2 (4 views) {meta['phase2_4_views']['total_flops']:.4g}; per asset {meta['per_asset_flops']:.4g}"
            )
    if "flops_per_asset" in results:
        print_flops_per_asset(results["flops_per_asset"])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.full", description=__doc__.splitlines()[0],
        epilog="examples:\n  python -m benchmarks.full                  # full-size models on CUDA\n  python -m benchmarks.full --quick --device cpu\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--quick", action="store_true", help="tiny models, fewest points (for tests)")
    parser.add_argument("--compile", dest="compile_unet", action="store_true", default=None, help="measure torch.compile (default: on CUDA)")
    parser.add_argument("--no-compile", dest="compile_unet", action="store_false")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    compile_unet = args.compile_unet if args.compile_unet is not None else (device.type == "cuda" and not args.quick)
    results = run(device, args.quick, compile_unet, args.out)
    print_report(results)
    path = write_json(results, args.out)
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
