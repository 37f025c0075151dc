"""Synthetic datasets in the dataset layout for the gallery tests, and the headless Chromium they use."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

XSS_PROMPT = '<script>alert(1)</script> "quotes" & <b>tags</b>'
FLAG_PROMPT = "<img src=x onerror=\"window.__xss='img'\"><script>window.__xss='script'</script> a mug"
BOX_EXTENTS = (1.0, 0.5, 0.25)
FAILED_ERROR = "RuntimeError: CUDA out of memory <while> rendering & \"exporting\""
SPLATS = {  # three Gaussians: red at the origin, green in front-above, blue behind-below (z-up world)
    "means": [[0.0, 0.0, 0.0], [0.4, 0.0, 0.2], [-0.4, 0.0, -0.2]],
    "rgb": [[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]],
    "scales": [[0.15, 0.15, 0.15], [0.2, 0.08, 0.12], [0.1, 0.25, 0.1]],
    "opacity": [0.95, 0.9, 0.8],
    "quats": [[1.0, 0.0, 0.0, 0.0], [0.9, 0.3, 0.1, 0.2], [0.7, 0.0, 0.7, 0.0]],
}


def png(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_splats_ply(path: Path, splats: dict = SPLATS) -> None:
    """A 3DGS-layout PLY (stages.export.ply's property order) of ``splats`` (activated values)."""
    from plyfile import PlyData, PlyElement

    from stages.export.ply import ply_property_names

    n = len(splats["means"])
    records = np.zeros(n, dtype=[(name, "<f4") for name in ply_property_names(0)])
    means, rgb = np.array(splats["means"]), np.array(splats["rgb"])
    for i, axis in enumerate("xyz"):
        records[axis] = means[:, i]
        records[f"f_dc_{i}"] = (rgb[:, i] - 0.5) / 0.28209479177387814
        records[f"scale_{i}"] = np.log(np.array(splats["scales"])[:, i])
    opacity = np.array(splats["opacity"])
    records["opacity"] = np.log(opacity / (1 - opacity))
    for i in range(4):
        records[f"rot_{i}"] = np.array(splats["quats"])[:, i]
    path.parent.mkdir(parents=True, exist_ok=True)
    PlyData([PlyElement.describe(records, "vertex")], text=False, byte_order="<").write(str(path))


def write_asset(root: Path, asset_id: str, *, glb: bool, turntable: str, color: tuple[int, int, int], splats: bool = False) -> dict[str, str]:
    import imageio.v3 as iio
    import trimesh

    folder = root / "assets" / asset_id
    folder.mkdir(parents=True)
    (folder / "reference.png").write_bytes(png(color, (64, 64)))
    (folder / "preview.png").write_bytes(png(color, (256, 64)))
    frames = np.zeros((8, 64, 64, 3), np.uint8)
    frames[..., :] = color
    frames[:, :, :, 1] = (np.arange(8) * 30)[:, None, None]
    if turntable == "mp4":
        iio.imwrite(folder / "turntable.mp4", frames, fps=8, codec="libx264")
    else:
        iio.imwrite(folder / "turntable.gif", frames, duration=100, loop=0)
    files = {"reference": "reference.png", "preview": "preview.png", "turntable": f"turntable.{turntable}"}
    if glb:
        box = trimesh.creation.box(extents=BOX_EXTENTS)
        box.visual.face_colors = [*color, 255]
        (folder / "mesh.glb").write_bytes(box.export(file_type="glb"))
        box.export(folder / "mesh.obj")
        files["mesh"], files["mesh_obj"] = "mesh.glb", "mesh.obj"
    if splats:
        write_splats_ply(folder / "splats.ply")
        files["splats"] = "splats.ply"
    # Manifest paths relative to the dataset root (the gallery also accepts paths relative to asset_dir).
    return {name: f"assets/{asset_id}/{rel}" for name, rel in files.items()}


def row(asset_id: str, prompt: str, prompt_index: int, variant: int, status: str, error, files, metrics, run=None) -> dict:
    return {
        "asset_id": asset_id, "prompt": prompt, "prompt_index": prompt_index, "variant": variant,
        "reference_seed": 10 + variant, "seed": 20 + variant, "method": "isd", "representation": "nerf",
        "config_digest": "abc123", "status": status, "error": error,
        "asset_dir": f"assets/{asset_id}" if files else None, "files": json.dumps(files),
        "metrics": json.dumps(metrics), "iterations": 100, "duration_s": 1.5,
        "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:01:00+00:00", "mlflow_run_id": run,
    }


def write_shard(root: Path, name: str, rows: list[dict]) -> None:
    (root / "manifest").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest" / name)


def make_dataset(root: Path) -> dict[str, dict]:
    """A small dataset in the contract layout; returns the expected latest row per asset_id."""
    rows = [
        row("boxa0", "a red box", 0, 0, "succeeded", None,
            write_asset(root, "boxa0", glb=True, turntable="mp4", color=(200, 30, 30)),
            {"loss": 0.125, "clip_score": 0.31, "note": "</script><script>window.__xss='metric'</script>"}),
        row("boxa1", "a red box", 0, 1, "succeeded", None,
            write_asset(root, "boxa1", glb=True, turntable="gif", color=(30, 30, 200)), {"loss": 0.25}),
        row("xss0", XSS_PROMPT, 1, 0, "succeeded", None,
            write_asset(root, "xss0", glb=False, turntable="gif", color=(30, 200, 30), splats=True), {"loss": 0.5}),
        row("flag0", FLAG_PROMPT, 2, 0, "failed", FAILED_ERROR, {}, {}),
    ]
    # "retry0" fails in the first shard and succeeds in the second (same finished_at): the later row wins.
    first = row("retry0", "a chair", 3, 0, "failed", "first attempt died", {}, {})
    retried = row("retry0", "a chair", 3, 0, "succeeded", None,
                  write_asset(root, "retry0", glb=True, turntable="mp4", color=(120, 120, 120)), {"loss": 1.0})
    # "late0" is in the older shard but finished later than its row in the newer shard: finished_at wins.
    late = row("late0", "a lamp", 4, 0, "succeeded", None,
               write_asset(root, "late0", glb=True, turntable="gif", color=(200, 200, 30)), {"loss": 2.0})
    late["finished_at"] = "2026-01-01T00:09:00+00:00"
    early = {**row("late0", "a lamp", 4, 0, "failed", "superseded failure", {}, {}),
             "finished_at": "2026-01-01T00:02:00+00:00"}
    write_shard(root, "part-20260101T000000-aaaa.parquet", rows[:2] + [first, late])
    write_shard(root, "part-20260101T000100-bbbb.parquet", rows[2:] + [retried, early])
    return {r["asset_id"]: r for r in rows + [retried, late]}


# ---------------------------------------------------------------- headless Chromium
def start_browser():
    """A Selenium Chrome driver on the system Chromium (skips the test without one)."""
    from benchmarks.gallery import chromium_paths, start_chromium

    binary, driver_path = chromium_paths()
    if binary is None or driver_path is None:
        pytest.skip("chromium and chromedriver not installed (apt-get install -y chromium chromium-driver)")
    pytest.importorskip("selenium.webdriver")
    return start_chromium(binary, driver_path)


def console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
