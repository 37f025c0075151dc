"""``benchmarks.hotpath`` at smoke-test size: its counting rules on a real iteration."""

from __future__ import annotations

import pytest
import torch

from benchmarks.hotpath import SyncCounter, main, measure_phase


@pytest.mark.parametrize("backprop", ["deferred", "direct"])
def test_an_iteration_moves_to_the_host_three_times_and_puts_the_render_once(backprop):
    row = measure_phase(1, "nerf", False, [f"backprop={backprop}"], tiny=True)
    # the render plan's sizes, the render for the guidance, the metrics: nothing per chunk
    assert row["explicit_moves"] == {"d2h::plan": 1, "d2h::render": 1, "d2h::metrics": 1}
    assert row["sync_sites"] == {} and row["device_to_host_syncs"] == 3
    assert row["syncs_render_pickled"] == 0
    render = 4 * 3 * 32 * 32 * 4  # float32
    assert render <= row["object_store_bytes_by_kind"]["put"] < render + 2000
    assert row["object_store_bytes_by_kind"]["grad_args"] < render / 2  # the requests carry a ref
    assert row["kernel_ops"] < row["aten_leaf_ops"] and row["chunks"] >= 1


def test_sync_counter_finds_device_reads_and_skips_host_draws():
    x = torch.rand(100)
    with SyncCounter() as counter:
        x[x > 0.5].sum().item()  # boolean mask (nonzero) and a scalar read: 2 syncs
        torch.repeat_interleave(torch.tensor([1, 2]))  # tensor repeats: 1 sync
        torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 2]), output_size=4)  # sized: none
        from stages.scene.cameras import CameraConfig, sample_cameras

        sample_cameras(torch.Generator().manual_seed(0), 4, CameraConfig())  # host draws: not counted
    assert sum(counter.sites.values()) == 3 and sum(counter.host.values()) >= 1


def test_cli_writes_json(tmp_path):
    out = tmp_path / "hotpath.json"
    results = main(["--tiny", "--phases", "2", "--out", str(out)])
    assert out.is_file() and results["rows"][0]["phase"] == 2 and results["rows"][0]["resolution"] == 32


def test_fp16_wire_halves_the_bytes():
    full = measure_phase(2, "nerf", False, (), tiny=True)
    half = measure_phase(2, "nerf", False, (), tiny=True, wire_dtype="float16")
    for kind in ("put", "grad_result"):
        ratio = half["object_store_bytes_by_kind"][kind] / full["object_store_bytes_by_kind"][kind]
        assert 0.45 < ratio < 0.55, kind
