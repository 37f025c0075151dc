"""benchmarks.full: the quick CPU run against the paper schedule, the peak table and the FLOP counter's scaling."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import full
from stages.optimize.config import OptimizeConfig


def test_quick_run_says_tiny_cpu_and_its_derived_numbers_add_up(tmp_path, capsys):
    out = tmp_path / "full.json"
    full.main(["--quick", "--device", "cpu", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["size"] == "tiny-cpu" and "TINY" in results["note"]
    assert "tiny-cpu" in capsys.readouterr().out
    assert results["card"] is None and results["peak_tflops"] is None and results["peak_memory_gb"] is None
    phases = results["iteration"]
    assert [(p["views"], p["render"]) for p in phases] == [(8, 16), (4, 32)]
    # the per-asset figure weights each timed phase by its iterations in the paper schedule,
    # counted here from OptimizeConfig's schedule step by step (not from the benchmark's constant)
    method = OptimizeConfig()
    views_per_step = [method.schedule.batch_size(step, method.iterations) for step in range(method.iterations)]
    steps = [views_per_step.count(8), views_per_step.count(4)]
    assert sum(steps) == method.iterations
    expected = sum(n * p["seconds_per_iteration"] for n, p in zip(steps, phases))
    assert results["seconds_per_asset"] == pytest.approx(expected)
    assert {(r["guidance"], r["assets"]) for r in results["batching"]} == {("ip", 1), ("ip", 2), ("mvd", 1), ("mvd", 2)}
    assert all(r["batched_s"] > 0 and r["separate_s"] > 0 for r in results["batching"])
    flops = results["flops"]
    assert (flops["views"], flops["render"]) == (4, 32) and flops["ip_flops"] > 0 and flops["mvd_flops"] > 0
    assert flops["fraction_of_peak"] is None


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Some Future GPU", None),
        (None, None),
    ],
)
def test_peak_lookup_by_device_name(name, peak):
    assert full.peak_tflops(name) == peak


def test_module_flop_breakdown_equals_the_counted_guidance_calls():
    """The per-module count used at full size on meta (VAE encode + backward, one UNet forward
    of 4·views ISD rows / 2·views MVDream rows) equals FlopCounterMode around the real
    ``IPGuidance.grad`` + ``MVDreamGuidance.grad`` calls (tiny models, renders at each
    guidance's own resolution so nothing is resized)."""
    cpu = torch.device("cpu")
    ip = full.build_ip_guidance(False, cpu, torch.float32)
    mvd = full.build_mvd_guidance(False, cpu, torch.float32)
    sizes = {"ip_resolution": ip.render_resolution, "mvd_resolution": mvd.render_resolution}
    counted = full.count_flops(ip, mvd, views=4, **sizes)
    modules = full.guidance_flops_by_module(ip, mvd, views=4, **sizes)
    assert modules["isd_vae_encode_backward"] + modules["isd_unet"] == counted["ip_flops"]
    assert modules["mvd_vae_encode_backward"] + modules["mvd_unet"] == counted["mvd_flops"]


def test_full_size_configs_match_the_published_architectures():
    """Parameter counts of the real-size models (built on meta: no memory) against the released
    checkpoints: SD1.5 UNet 859,520,964; SD VAE 83,653,863; CLIP-L text 123,060,480;
    ip-adapter_sd15 22.3M; SD2.1-base UNet 865,910,724 (+ MVDream's camera MLP 16→1280→1280);
    SD2.1 OpenCLIP-H text (23 layers) 340,387,840; ViT-H/14 image encoder 632,076,800."""
    meta = torch.device("meta")
    ip = full.build_ip_guidance(True, meta, torch.float32)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    ip_params = sum(p.numel() for n, p in ip.sd.unet.named_parameters() if "encoder_hid_proj" in n or "to_k_ip" in n or "to_v_ip" in n)
    assert count(ip.sd.unet) - ip_params == 859_520_964
    assert count(ip.sd.vae) == 83_653_863
    assert count(ip.sd.text_encoder) == 123_060_480
    assert count(ip.ip.image_encoder) == 632_076_800
    assert ip_params == pytest.approx(22.3e6, rel=0.01)
    mvd = full.build_mvd_guidance(True, meta, torch.float32)
    assert count(mvd.models.unet) == 865_910_724 + (16 * 1280 + 1280) + (1280 * 1280 + 1280)
    assert count(mvd.models.text_encoder) == 340_387_840


@pytest.mark.gpu
def test_quick_run_on_cuda_reports_the_card_and_memory(tmp_path):
    out = tmp_path / "full.json"
    full.main(["--quick", "--device", "cuda", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["size"] == "tiny" and results["card"] == torch.cuda.get_device_name(0)
    assert results["peak_memory_gb"] > 0
    assert results["peak_tflops"] == full.peak_tflops(results["card"])


@pytest.mark.slow
def test_flops_per_asset_add_up_and_ip_null_saves_half_the_isd_unet_rows():
    """Tiny models (the same code as the full-size count on meta): per asset = Σ phase iterations ×
    (IP + MVDream call); ``ip_null`` runs 2 UNet rows per view instead of 4, so per iteration it
    saves exactly the UNet FLOPs of 2·views rows, counted independently on the module."""
    result = full.flops_per_asset(full=False)
    phases = result["phases"]
    assert [(p["views"], p["render"], p["iterations"]) for p in phases] == [(8, 64, 3000), (4, 256, 3000)]
    rows = {(r["sd_branch"], r["representation"]): r for r in result["rows"]}
    assert set(rows) == {(b, r) for b in ("vanilla", "ip_null") for r in ("nerf", "splats")}
    for row in rows.values():
        per_asset = sum(p["iterations"] * t for p, t in zip(phases, row["guidance_tflop_per_iteration"])) / 1e3
        assert row["guidance_pflop_per_asset"] == pytest.approx(per_asset)
        assert row["scene_pflop_per_asset_bound"] is None  # the NeRF bound is computed at full size only
    cpu = torch.device("cpu")
    ip, mvd = full.build_ip_guidance(False, cpu, torch.float32), full.build_mvd_guidance(False, cpu, torch.float32)
    for index, phase in enumerate(phases):
        modules = full.guidance_flops_by_module(ip, mvd, views=phase["views"], ip_resolution=32, mvd_resolution=32)
        saved = rows[("vanilla", "nerf")]["guidance_tflop_per_iteration"][index] - rows[("ip_null", "nerf")]["guidance_tflop_per_iteration"][index]
        assert saved * 1e12 == pytest.approx(modules["isd_unet"] / 2, rel=1e-6)
        assert result["mvd_tflop_per_iteration"][index] * 1e12 == pytest.approx(modules["mvd_vae_encode_backward"] + modules["mvd_unet"], rel=1e-6)
