"""The gallery at dataset scale: build time, page bytes, and the index's first paint and memory.

    python -m benchmarks.gallery [--assets 2000] [--out benchmarks/out/gallery.json]

Writes a synthetic dataset of ``--assets`` assets in the dataset layout (4 variants per prompt,
one in 25 failed; every asset directory hard-links one small reference, preview, GIF turntable,
GLB and OBJ, so 2,000 directories take seconds), builds its gallery, opens ``index.html`` from
``file://`` in headless Chromium (``/usr/bin/chromium``) and reads the browser's own figures:
first contentful paint, DOMContentLoaded and load times, JS heap in use, DOM elements, cards on
the page, images in the page and loaded (lazy: those near the viewport), turntables and 3D
viewer scripts loaded (none until asked for). ``tests/test_gallery_scale.py`` runs the same at 2,000 assets and
checks the machine-independent ones.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

DEFAULT_OUT = Path("benchmarks/out/gallery.json")
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--window-size=1280,900",
    "--disable-dev-shm-usage",  # containers often have a 64 MB /dev/shm
    # WebGL without a GPU: SwiftShader, opted in explicitly (the silent fallback is deprecated).
    "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
    "--enable-precise-memory-info",  # performance.memory without its coarse bucketing
)


def chromium_paths() -> tuple[str | None, str | None]:
    """(chromium binary, chromedriver) found on this machine."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    driver = shutil.which("chromedriver") or next((p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None)
    return binary, driver


def start_chromium(binary: str, driver_path: str) -> Any:
    """A Selenium driver on the given Chromium (explicit driver: no Selenium Manager download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=options)


def _small_asset(folder: Path) -> None:
    import imageio.v3 as iio
    import numpy as np
    import trimesh
    from PIL import Image

    folder.mkdir(parents=True)
    for name, size in (("reference.png", (256, 256)), ("preview.png", (512, 256))):
        buffer = io.BytesIO()
        Image.new("RGB", size, (90, 140, 200)).save(buffer, format="PNG")
        (folder / name).write_bytes(buffer.getvalue())
    frames = np.full((12, 64, 64, 3), 120, np.uint8)
    iio.imwrite(folder / "turntable.gif", frames, duration=80, loop=0)
    box = trimesh.creation.box(extents=(1.0, 0.5, 0.25))
    (folder / "mesh.glb").write_bytes(box.export(file_type="glb"))
    box.export(folder / "mesh.obj")


def synthetic_dataset(root: Path, assets: int, variants: int = 4, failed_every: int = 25) -> list[dict[str, Any]]:
    """``assets`` assets in the dataset layout (see the module doc); returns the manifest rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    originals = Path(tempfile.mkdtemp(prefix="gallery-originals-", dir=root.parent))
    _small_asset(originals / "x")
    rows = []
    for index in range(assets):
        asset_id = f"asset{index:05d}-v{index % variants}"
        prompt = f"prompt number {index // variants}: a small object on a table"
        row = {
            "asset_id": asset_id, "prompt": prompt, "prompt_index": index // variants, "variant": index % variants,
            "reference_seed": index, "seed": index, "method": "isd", "representation": "nerf", "config_digest": "bench",
            "status": "succeeded", "error": None, "asset_dir": f"assets/{asset_id}", "files": "{}",
            "metrics": json.dumps({"loss": 0.1 + index * 1e-4, "clip_score": 0.3, "iterations_per_second": 12.5}),
            "iterations": 6000, "duration_s": 1800.0, "started_at": "2026-01-01T00:00:00+00:00",
            "finished_at": "2026-01-01T00:30:00+00:00", "mlflow_run_id": f"{index:032x}",
        }
        if failed_every and index % failed_every == failed_every - 1:
            row.update(status="failed", error="NonFiniteLossError: non-finite loss nan at iteration 812", asset_dir=None, metrics="{}")
        else:
            folder = root / "assets" / asset_id
            folder.mkdir(parents=True)
            for file in (originals / "x").iterdir():
                os.link(file, folder / file.name)
            row["files"] = json.dumps({p.stem if p.stem != "mesh" else ("mesh" if p.suffix == ".glb" else "mesh_obj"): f"assets/{asset_id}/{p.name}"
                                       for p in (originals / "x").iterdir()})
        rows.append(row)
    shutil.rmtree(originals)
    (root / "manifest").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest" / "part-20260101T000000000000-bench.parquet")
    return rows


def measure_index(driver: Any, index: Path) -> dict[str, Any]:
    """The browser's figures for ``index`` opened from ``file://`` (waits for the load event)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get("about:blank")
    began = time.perf_counter()
    driver.get(index.as_uri())
    WebDriverWait(driver, 120).until(lambda d: d.execute_script("return document.readyState") == "complete")
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "return [...document.images].filter(i => i.loading !== 'lazy' || i.getBoundingClientRect().top < innerHeight).every(i => i.complete)"))
    wall = time.perf_counter() - began
    figures = driver.execute_script(
        """
        const nav = performance.getEntriesByType('navigation')[0];
        const paint = Object.fromEntries(performance.getEntriesByType('paint').map(p => [p.name, p.startTime]));
        return {
          first_contentful_paint_ms: paint['first-contentful-paint'] ?? null,
          dom_content_loaded_ms: nav.domContentLoadedEventEnd,
          load_event_ms: nav.loadEventEnd,
          js_heap_used_mb: performance.memory ? performance.memory.usedJSHeapSize / 2**20 : null,
          dom_elements: document.getElementsByTagName('*').length,
          cards_on_page: document.querySelectorAll('article.asset').length,
          images_in_page: document.images.length,
          images_loaded: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
          videos_or_turntables: document.querySelectorAll('video, img.turntable').length,
          viewer_scripts: document.querySelectorAll('script[src]').length,
          shown_count: document.getElementById('shown-count').textContent,
        };
        """)
    figures["wall_to_images_s"] = wall
    return figures


def run(assets: int, root: Path | None = None) -> dict[str, Any]:
    """Dataset → gallery → browser figures."""
    from pipeline.gallery import build_gallery

    work = Path(tempfile.mkdtemp(prefix="gallery-bench-")) if root is None else root
    try:
        dataset = work / "dataset"
        dataset.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        synthetic_dataset(dataset, assets)
        made = time.perf_counter() - began
        began = time.perf_counter()
        gallery = build_gallery(dataset)
        built = time.perf_counter() - began
        began = time.perf_counter()
        build_gallery(dataset)
        rebuilt = time.perf_counter() - began
        sizes = {p.relative_to(gallery).parts[0]: 0 for p in gallery.rglob("*") if p.is_file()}
        for path in gallery.rglob("*"):
            if path.is_file():
                sizes[path.relative_to(gallery).parts[0]] += path.stat().st_size
        results: dict[str, Any] = {
            "assets": assets, "dataset_seconds": made, "build_seconds": built, "rebuild_seconds": rebuilt,
            "index_html_bytes": (gallery / "index.html").stat().st_size, "gallery_bytes_by_part": sizes,
        }
        binary, driver_path = chromium_paths()
        if binary and driver_path:
            driver = start_chromium(binary, driver_path)
            try:
                results["browser"] = measure_index(driver, gallery / "index.html")
                results["browser"]["chromium"] = driver.capabilities.get("browserVersion")
            finally:
                driver.quit()
        return results
    finally:
        if root is None:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from benchmarks.common import environment, write_json

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gallery", description=__doc__.splitlines()[0],
        epilog="examples:\n  python -m benchmarks.gallery\n  python -m benchmarks.gallery --assets 200 --out /tmp/gallery.json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--assets", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    results = {"environment": environment("cpu"), **run(args.assets)}
    print(json.dumps({k: v for k, v in results.items() if k != "environment"}, indent=2))
    write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
