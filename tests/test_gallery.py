"""Gallery: built from a synthetic dataset, checked as files and data, then in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import trimesh

from gallery_fixtures import (
    BOX_EXTENTS, FAILED_ERROR, FLAG_PROMPT, SPLATS, XSS_PROMPT, console_errors, make_dataset, row, start_browser,
    write_asset, write_shard,
)
from pipeline.gallery import (
    PAGE_CARDS, SPLAT_RECORD, STATIC_DIR, VIEWER_SCRIPT, build_gallery, json_for_script, log_gallery_to_mlflow, main,
    read_manifest, splat_bytes,
)

ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", Path(__file__).parent / "artifacts")) / "gallery"


class _Scripts(HTMLParser):
    """Independent reader of the generated HTML: the <script> blocks with their type and text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.scripts: list[dict] = []
        self.tags: list[str] = []
        self._in: dict | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "script":
            self._in = {"attrs": dict(attrs), "text": ""}
            self.scripts.append(self._in)

    def handle_endtag(self, tag):
        if tag == "script":
            self._in = None

    def handle_data(self, data):
        if self._in is not None:
            self._in["text"] += data


def _parse(path: Path) -> _Scripts:
    parser = _Scripts()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def _data(gallery: Path) -> dict:
    (data,) = [s for s in _parse(gallery / "index.html").scripts if s["attrs"].get("type") == "application/json"]
    return json.loads(data["text"])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    expected = make_dataset(root)
    gallery = build_gallery(root)
    return root, gallery, expected


def test_manifest_latest_row_wins(built):
    root, _, expected = built
    records = {r.asset_id: r for r in read_manifest(root)}
    assert set(records) == set(expected)
    assert records["retry0"].status == "succeeded" and records["retry0"].error is None
    assert records["late0"].status == "succeeded"
    assert records["flag0"].error == FAILED_ERROR
    assert records["boxa0"].metrics["loss"] == 0.125


def test_index_is_one_page_with_the_data_and_shared_viewers(built):
    root, gallery, expected = built
    assert gallery == root.resolve() / "gallery"
    page = _parse(gallery / "index.html")
    assert [s["attrs"].get("type") for s in page.scripts] == ["application/json", None]
    # nothing of the dataset is markup: no <b>/<img> from prompts, no inlined media or viewer
    assert "b" not in page.tags and "img" not in page.tags and "video" not in page.tags
    text = (gallery / "index.html").read_text()
    assert "data:" not in text and "customElements.define" not in text and "alert(1)" not in page.scripts[1]["text"]
    assert (gallery / "index.html").stat().st_size < 60_000
    data = _data(gallery)
    assets = {a["id"]: a for a in data["assets"]}
    assert set(assets) == set(expected)
    # variants of a prompt are adjacent, prompts in prompt order, the latest row of each asset
    assert [a["id"] for a in data["assets"]] == ["boxa0", "boxa1", "xss0", "flag0", "retry0", "late0"]
    assert assets["xss0"]["prompt"] == XSS_PROMPT and assets["flag0"]["error"] == FAILED_ERROR
    assert assets["boxa0"]["metrics"]["note"] == json.loads(expected["boxa0"]["metrics"])["note"]
    assert assets["retry0"]["status"] == "succeeded" and assets["late0"]["status"] == "succeeded"
    # every file the page names exists, relative to the dataset (dataset base ".." from gallery/)
    assert data["dataset"] == ".."
    for asset in assets.values():
        for rel in asset["files"].values():
            assert (gallery / data["dataset"] / rel).is_file(), rel
        for rel in asset["thumbs"].values():
            assert (gallery / rel).is_file(), rel
    assert set(assets["boxa0"]["files"]) >= {"reference", "preview", "turntable", "mesh", "mesh_obj"}
    assert assets["flag0"]["files"] == {} and "model" not in assets["flag0"]
    # the viewers are shared files, once
    assert (gallery / "static" / VIEWER_SCRIPT).read_bytes() == (STATIC_DIR / VIEWER_SCRIPT).read_bytes()
    assert "Apache License" in (gallery / "static" / "model-viewer.LICENSE.txt").read_text()


def test_model_scripts_carry_the_asset_files(built):
    root, gallery, _ = built
    assets = {a["id"]: a for a in _data(gallery)["assets"]}
    model = assets["boxa0"]["model"]
    assert model["kind"] == "glb"
    script = (gallery / model["script"]).read_text()
    prefix = 'window.galleryModel("boxa0","glb","'
    assert script.startswith(prefix)
    glb = base64.b64decode(script[len(prefix):].split('"')[0])
    assert glb == (root / "assets" / "boxa0" / "mesh.glb").read_bytes()
    np.testing.assert_allclose(trimesh.load(__import__("io").BytesIO(glb), file_type="glb", force="mesh").extents, BOX_EXTENTS, atol=1e-6)
    splat = assets["xss0"]["model"]
    assert splat["kind"] == "splat" and splat["camera"] == {"elevation": 15.0, "distance": 3.0, "fovy": 40.0}
    assert (gallery / splat["script"]).is_file()


def test_splat_records_match_the_ply():
    """32 bytes per Gaussian: activated scale, RGB from SH band 0, sigmoid opacity, unit quaternion."""
    import tempfile

    from gallery_fixtures import write_splats_ply

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.ply"
        write_splats_ply(path)
        data = splat_bytes(path)
    records = [SPLAT_RECORD.unpack_from(data, i * SPLAT_RECORD.size) for i in range(len(data) // SPLAT_RECORD.size)]
    assert len(records) == 3 and SPLAT_RECORD.size == 32
    by_position = {tuple(round(v, 5) for v in r[:3]): r for r in records}
    for mean, rgb, scale, opacity, quat in zip(SPLATS["means"], SPLATS["rgb"], SPLATS["scales"], SPLATS["opacity"], SPLATS["quats"]):
        record = by_position[tuple(round(v, 5) for v in mean)]
        np.testing.assert_allclose(record[3:6], scale, rtol=1e-5)
        np.testing.assert_allclose(np.array(record[6:9]) / 255, rgb, atol=1 / 255)
        assert abs(record[9] / 255 - opacity) <= 1 / 255
        unit = np.array(quat) / np.linalg.norm(quat)
        np.testing.assert_allclose((np.array(record[10:14]) - 128) / 128, unit, atol=1 / 128)


def test_rebuild_rewrites_only_what_changed_and_drops_what_is_gone(tmp_path):
    write_shard(tmp_path, "part-0.parquet", [
        row("one", "a cup", 0, 0, "succeeded", None, write_asset(tmp_path, "one", glb=True, turntable="gif", color=(1, 2, 3)), {}),
        row("two", "a pot", 1, 0, "succeeded", None, write_asset(tmp_path, "two", glb=True, turntable="gif", color=(4, 5, 6)), {}),
    ])
    gallery = build_gallery(tmp_path)
    thumb = gallery / "thumbs" / "one-preview.jpg"
    stamp = thumb.stat().st_mtime_ns
    time.sleep(0.02)
    build_gallery(tmp_path)
    assert thumb.stat().st_mtime_ns == stamp  # unchanged source: not redone
    write_shard(tmp_path, "part-0.parquet", [row("one", "a cup", 0, 0, "succeeded", None, {"preview": "assets/one/preview.png"}, {})])
    build_gallery(tmp_path)
    assert sorted(p.name for p in (gallery / "thumbs").iterdir()) == ["one-preview.jpg", "one-reference.jpg"]
    assert sorted(p.name for p in (gallery / "models").iterdir()) == ["one.glb.js"]


def test_json_for_script_cannot_close_the_block():
    text = json_for_script({"a": "</script><!-- \u2028 & >", "b": [float("nan"), 1.5]})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text, parse_constant=pytest.fail) == {"a": "</script><!-- \u2028 & >", "b": ["nan", 1.5]}


def test_vendored_viewer_matches_its_notice():
    """The shipped model-viewer bundle is the file the notice names (hash), with its licence beside it."""
    import hashlib
    import re

    from pipeline.gallery import LICENSE_FILES

    notice = (STATIC_DIR / "THIRD_PARTY_NOTICES.md").read_text()
    digest = hashlib.sha256((STATIC_DIR / VIEWER_SCRIPT).read_bytes()).hexdigest()
    assert re.search(rf"copied byte for byte\s*\(sha256 `{digest}`\)", notice)
    assert all((STATIC_DIR / name).is_file() for name in LICENSE_FILES)
    assert "Apache License" in (STATIC_DIR / "model-viewer.LICENSE.txt").read_text()


def test_bad_manifests_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        build_gallery(tmp_path)
    write_shard(tmp_path, "part-1-x.parquet", [{"asset_id": "a", "status": "succeeded"}])
    from pipeline.gallery import read_manifest as read

    with pytest.raises(ValueError, match=r"part-1-x\.parquet.*prompt"):
        read(tmp_path)
    write_shard(tmp_path, "part-1-x.parquet", [{"asset_id": "a", "prompt": "p", "status": "succeeded", "metrics": "{oops"}])
    with pytest.raises(ValueError, match="'metrics'"):
        read(tmp_path)
    write_shard(tmp_path, "part-1-x.parquet", [{"asset_id": "../evil", "prompt": "p", "status": "failed"}])
    with pytest.raises(ValueError, match="evil"):
        build_gallery(tmp_path)


def test_uri_dataset_other_gallery_dir_and_cli(built, tmp_path, capsys):
    root, _, expected = built
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("gallery"))
    local = build_gallery(copy.as_uri())  # URI path: built locally, then copied next to the dataset
    assert local != copy / "gallery" and (local / "index.html").is_file()
    assert (copy / "gallery" / "index.html").read_bytes() == (local / "index.html").read_bytes()
    assert {p.name for p in (copy / "gallery" / "models").iterdir()} == {f"{a}.glb.js" for a in ("boxa0", "boxa1", "retry0", "late0")} | {"xss0.splat.js"}
    main([str(copy), "--gallery-dir", str(tmp_path / "elsewhere" / "g")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "elsewhere" / "g" / "index.html")
    data = _data(tmp_path / "elsewhere" / "g")
    assert data["dataset"] == "../../copy"  # relative, so the pair of directories can move together
    assert all((tmp_path / "elsewhere" / "g" / data["dataset"] / rel).is_file() for a in data["assets"] for rel in a["files"].values())


def test_log_gallery_to_mlflow_logs_the_one_page(built, tmp_path, monkeypatch):
    import mlflow

    _, gallery, _ = built
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store keeps the test fast
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "elsewhere").as_uri())  # the explicit URI must win
    uri = (tmp_path / "mlruns").as_uri()
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("gallery-test"))
    log_gallery_to_mlflow(gallery, run.info.run_id, tracking_uri=uri)
    assert {f.path for f in client.list_artifacts(run.info.run_id, "gallery")} == {"gallery/index.html"}
    with pytest.raises(FileNotFoundError, match="index.html"):
        log_gallery_to_mlflow(tmp_path, run.info.run_id, tracking_uri=uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # without a URI, MLflow's own setting is used
    main([str(gallery.parent), "--gallery-dir", str(tmp_path / "cli"), "--mlflow-run-id", run.info.run_id])
    assert "gallery/index.html" in {f.path for f in client.list_artifacts(run.info.run_id, "gallery")}


def test_help_shows_usage_and_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: python -m pipeline.gallery") and "examples:" in out


# ---------------------------------------------------------------- headless Chromium (skipped without it)


@pytest.fixture(scope="module")
def browser():
    driver = start_browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def _screenshot(driver, name: str) -> Path:
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def _assert_no_script_ran(driver) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text
    assert driver.execute_script("return window.__xss === undefined")


def _wait(driver, script: str, timeout_s: float = 180.0):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(lambda d: d.execute_script(script))
    return driver.execute_script(script)


def _open(driver, gallery: Path, fragment: str = "") -> None:
    driver.get("about:blank")  # a fresh document: hash-only changes would not reload the page
    driver.get((gallery / "index.html").as_uri() + fragment)


@pytest.mark.slow
def test_browser_index_cards_filters_and_turntable_on_hover(built, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _, gallery, expected = built
    _open(browser, gallery)
    _assert_no_script_ran(browser)
    cards = {c.get_attribute("data-asset-id"): c for c in browser.find_elements(By.CSS_SELECTOR, "article.asset")}
    assert set(cards) == set(expected) and all(c.is_displayed() for c in cards.values())
    assert cards["flag0"].find_element(By.CSS_SELECTOR, "pre.error").text == FAILED_ERROR
    headings = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "h2.prompt")]
    assert XSS_PROMPT in headings and FLAG_PROMPT in headings  # shown as text
    assert not browser.find_elements(By.CSS_SELECTOR, "main b")
    _wait(browser, "return [...document.images].every(i => i.complete && i.naturalWidth > 0)", 30)
    # no turntable has been fetched yet; hovering a card's slot plays its turntable
    assert browser.execute_script("return document.querySelectorAll('video, img.turntable').length") == 0
    ActionChains(browser).move_to_element(cards["boxa0"].find_element(By.CSS_SELECTOR, ".turntable-slot")).perform()
    assert _wait(browser, "const v = document.querySelector('#asset-boxa0 video.turntable'); return v && v.readyState >= 2 && !v.paused && v.videoWidth", 60) == 64
    _screenshot(browser, "index.png")

    browser.find_element(By.ID, "filter-text").send_keys("RED BOX")
    shown = lambda: {c.get_attribute("data-asset-id") for c in browser.find_elements(By.CSS_SELECTOR, "article.asset")}  # noqa: E731
    assert shown() == {"boxa0", "boxa1"}
    browser.find_element(By.ID, "filter-text").clear()
    browser.find_element(By.ID, "filter-text").send_keys(" ")  # fires input after clear()
    Select(browser.find_element(By.ID, "filter-status")).select_by_value("failed")
    assert shown() == {"flag0"} and browser.find_element(By.ID, "shown-count").text == "1 shown"
    assert "status=failed" in browser.current_url  # the view is a link
    _assert_no_script_ran(browser)
    assert console_errors(browser) == []


@pytest.mark.slow
def test_browser_pages_keep_prompt_groups_together(tmp_path, browser):
    from selenium.webdriver.common.by import By

    rows = []
    for index in range(PAGE_CARDS + 10):  # groups of 4 variants, more than one page
        asset_id = f"a{index:03d}"
        rows.append(row(asset_id, f"prompt {index // 4}", index // 4, index % 4, "failed", "x", {}, {}))
    write_shard(tmp_path, "part-0.parquet", rows)
    gallery = build_gallery(tmp_path)
    _open(browser, gallery)
    first = browser.find_elements(By.CSS_SELECTOR, "article.asset")
    assert len(first) == PAGE_CARDS and browser.find_element(By.CSS_SELECTOR, ".page-of").text == "page 1 of 2"
    browser.find_element(By.CSS_SELECTOR, "#pager-top a[data-page='2']").click()
    _wait(browser, "return document.querySelector('.page-of').textContent.includes('page 2 of 2')", 30)
    second = [c.get_attribute("data-asset-id") for c in browser.find_elements(By.CSS_SELECTOR, "article.asset")]
    assert second == [f"a{i:03d}" for i in range(PAGE_CARDS, PAGE_CARDS + 10)]
    browser.back()
    _wait(browser, "return document.querySelector('.page-of').textContent.includes('page 1 of 2')", 30)
    assert len(browser.find_elements(By.CSS_SELECTOR, "article.asset")) == PAGE_CARDS


@pytest.mark.slow
def test_browser_asset_detail_loads_orbits_and_links_downloads(built, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    root, gallery, _ = built
    _open(browser, gallery)
    browser.find_element(By.CSS_SELECTOR, "#asset-boxa0 a.asset-link").click()
    assert _wait(browser, "return document.body.dataset.modelState || null") == "loaded"
    assert browser.current_url.endswith("#asset=boxa0")  # the detail is a link
    loaded, *dims = browser.execute_script(
        "const v = document.getElementById('viewer'); const d = v.getDimensions(); return [v.loaded, d.x, d.y, d.z]")
    assert loaded is True
    np.testing.assert_allclose(dims, BOX_EXTENTS, atol=1e-4)  # the GLB's box, as the component measured it
    assert browser.execute_script("return document.querySelectorAll('script[src$=\"model-viewer-umd.min.js\"]').length") == 1
    _wait(browser, "const v = document.querySelector('.detail video.turntable'); return v && (v.error !== null || v.videoWidth > 0)", 60)
    assert browser.execute_script("const v = document.querySelector('.detail video.turntable'); return [v.error === null, v.videoWidth]") == [True, 64]
    links = {a.get_attribute("data-role"): a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "ul.downloads a")}
    assert set(links) == {"mesh", "mesh_obj"}
    for href in links.values():
        assert Path(__import__("urllib.parse").parse.unquote(href.removeprefix("file://"))).resolve().parent == (root / "assets" / "boxa0").resolve()
    viewer = browser.find_element(By.ID, "viewer")
    _screenshot(browser, "asset-boxa0.png")
    theta = "return document.getElementById('viewer').getCameraOrbit().theta"
    before = browser.execute_script(theta)
    ActionChains(browser).move_to_element(viewer).click_and_hold().move_by_offset(150, 0).pause(0.3).release().perform()
    assert abs(browser.execute_script(theta) - before) > 0.1  # dragging orbits the camera
    browser.find_element(By.ID, "close-detail").click()
    _wait(browser, "return document.getElementById('detail').classList.contains('hidden')", 30)
    assert browser.find_element(By.ID, "detail").get_attribute("class").split() == ["detail", "hidden"]
    assert console_errors(browser) == []


@pytest.mark.slow
def test_browser_splat_view_matches_the_project_rasteriser(built, browser):
    """The splat asset opens in the WebGL splat viewer, whose picture matches the project's own
    rasteriser (stages.scene.splats.rasterize_torch) for the same Gaussians and camera."""
    import torch
    from selenium.webdriver.common.by import By

    from stages.scene.cameras import orbit_cameras
    from stages.scene.splats.cameras import intrinsics_from_fovy, viewmats_from_c2w
    from stages.scene.splats.rasterize_torch import rasterize_torch

    _, gallery, _ = built
    _open(browser, gallery, "#asset=xss0")
    _assert_no_script_ran(browser)
    assert browser.find_element(By.CSS_SELECTOR, ".detail h1.prompt").text == XSS_PROMPT
    assert _wait(browser, "return document.body.dataset.splatState || null", 60) == "rendered"
    assert "splats.ply" in browser.find_element(By.CSS_SELECTOR, "ul.downloads a[data-role='splats']").get_attribute("href")
    _screenshot(browser, "asset-xss0-splats.png")
    width, height, camera = 160, 120, {"elevation": 20.0, "azimuth": 30.0, "distance": 2.5, "fovy": 40.0}
    pixels = browser.execute_script(
        """
        const [w, h, camera] = arguments;
        const canvas = document.createElement('canvas');
        canvas.style.cssText = `width:${w}px;height:${h}px;position:fixed;left:0;top:0`;
        document.body.appendChild(canvas);
        const script = document.querySelector('script[src$="splat.js"]');
        return new Promise(resolve => {
          window.galleryModel = (id, kind, b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const viewer = window.SplatViewer.create(canvas, bytes, camera);
            resolve(Array.from(viewer.pixels()));
          };
          const again = document.createElement('script'); again.src = 'models/xss0.splat.js'; document.head.appendChild(again);
        });
        """, width, height, camera)
    got = np.array(pixels, dtype=np.float32).reshape(height, width, 4)[::-1, :, :3] / 255  # GL rows are bottom-up
    cams = orbit_cameras(1, camera["elevation"], camera["distance"], camera["fovy"], azimuth_start=camera["azimuth"])
    quats = torch.tensor(SPLATS["quats"])
    render, alpha, _ = rasterize_torch(
        torch.tensor(SPLATS["means"]), quats / quats.norm(dim=1, keepdim=True), torch.tensor(SPLATS["scales"]),
        torch.tensor(SPLATS["opacity"]), torch.tensor(SPLATS["rgb"]),
        viewmats_from_c2w(cams.c2w), intrinsics_from_fovy(cams.fovy, height, width), width, height,
    )
    background = torch.tensor([0.914, 0.925, 0.945])
    want = (render[0, ..., :3] + (1 - alpha[0]) * background).numpy()
    assert np.abs(want - background.numpy()).max() > 0.5  # the Gaussians are in view
    from PIL import Image

    Image.fromarray((np.concatenate([got, want], axis=1) * 255).clip(0, 255).astype(np.uint8)).save(ARTIFACTS / "splat-viewer-vs-rasteriser.png")
    difference = np.abs(got - want)
    print(f"splat viewer vs rasterize_torch: mean |diff| {difference.mean():.4f}, 99th pct {np.percentile(difference, 99):.4f}")
    assert difference.mean() < 0.01 and np.percentile(difference, 99) < 0.08


@pytest.mark.slow
def test_browser_index_inside_a_sandboxed_blob_iframe(built, browser):
    """How MLflow's artifact view shows an HTML artifact: a blob: URL in <iframe sandbox="allow-scripts">.
    The page renders its cards, its links open details in place (no blocked navigation), and it
    asks MLflow (not the dataset) for thumbnails."""
    _, gallery, _ = built
    _open(browser, gallery)
    browser.set_script_timeout(60)
    state = browser.execute_async_script(
        """
        const [html, done] = arguments;
        const frame = document.createElement('iframe');
        frame.setAttribute('sandbox', 'allow-scripts');
        frame.style.cssText = 'width: 900px; height: 700px';
        frame.src = URL.createObjectURL(new Blob([html], {type: 'text/html'}));
        frame.onload = () => done(true);
        document.body.prepend(frame);
        """,
        (gallery / "index.html").read_text(encoding="utf-8"),
    )
    assert state is True
    from selenium.webdriver.common.by import By

    browser.switch_to.frame(browser.find_element(By.TAG_NAME, "iframe"))
    try:
        cards = browser.find_elements(By.CSS_SELECTOR, "article.asset")
        assert len(cards) == 6 and browser.find_element(By.ID, "mlflow-note").is_displayed()
        assert browser.execute_script("return document.querySelectorAll('.turntable-slot').length") == 0
        link = browser.find_element(By.CSS_SELECTOR, "#asset-flag0 a.asset-link")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", link)
        link.click()
        assert browser.find_element(By.CSS_SELECTOR, ".detail h1.prompt").text == FLAG_PROMPT
        assert browser.execute_script("return location.protocol") == "blob:"  # still this page, not a blocked frame
        assert FAILED_ERROR in browser.find_element(By.CSS_SELECTOR, ".detail pre.error").text
        _assert_no_script_ran(browser)
    finally:
        browser.switch_to.default_content()
    _screenshot(browser, "index-in-blob-iframe.png")


@pytest.mark.slow
def test_browser_gallery_of_a_generated_dataset(tmp_path, browser):
    """The gallery of a dataset written by the real code path (optimiser loop, export_asset,
    DatasetWriter commit + manifest), with one failed asset, opened in Chromium."""
    from evaluate_fixtures import build_dataset, tiny_method
    from selenium.webdriver.common.by import By

    from pipeline.jobs import Job
    from pipeline.manifest import ManifestRow, utc_now
    from pipeline.writer import DatasetWriter

    method = tiny_method(iterations=2)
    method.export.mesh, method.export.mesh_resolution = True, 24  # the 3D view needs mesh.glb
    rows = build_dataset(tmp_path, [("a blue ball", 0, 1, 0.4), ("a blue ball", 1, 2, 0.6)], method)
    failed_job = Job("a_red_box-v0-x", "a red <b>box</b>", 1, 0, 3, 3, "tinydigest01")
    now = utc_now()
    DatasetWriter(str(tmp_path)).write_manifest(
        [ManifestRow.for_job(failed_job, method, status="failed", error="NonFiniteLossError: nan at 7", started_at=now, finished_at=now)]
    )
    gallery = build_gallery(tmp_path)

    _open(browser, gallery)
    cards = {c.get_attribute("data-asset-id"): c for c in browser.find_elements(By.CSS_SELECTOR, "article.asset")}
    assert set(cards) == {r["asset_id"] for r in rows} | {failed_job.asset_id}
    assert "NonFiniteLossError: nan at 7" in cards[failed_job.asset_id].find_element(By.CSS_SELECTOR, "pre.error").text
    _wait(browser, "return [...document.images].every(i => i.complete && i.naturalWidth > 0)", 30)
    _screenshot(browser, "generated-index.png")
    assert all("mesh" in r["files"] for r in rows)
    _open(browser, gallery, f"#asset={rows[0]['asset_id']}")
    assert _wait(browser, "return document.body.dataset.modelState || null") == "loaded"
    _screenshot(browser, "generated-asset.png")
    assert console_errors(browser) == []


def _toy_scored_dataset(tmp_path: Path) -> Path:
    """The synthetic dataset plus evaluation shards with toy-world scores: recovered and faithful,
    recovered but below the faithful PSNR, another object; an older score row that loses."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.evaluate import SCORES_SCHEMA, TOY_COLUMNS
    from stages.toyworld.fidelity import FAITHFUL_PSNR

    root = tmp_path / "ds"
    root.mkdir()
    make_dataset(root)
    rows = [
        {"asset_id": "boxa0", "status": "succeeded", "evaluated_at": "2", "toy_identity": 3.0, "toy_reference": 3.0,
         "toy_identity_correct": 1.0, "toy_psnr_reference": FAITHFUL_PSNR + 5, "toy_consistency": 1.0, "toy_iou": 0.8},
        {"asset_id": "boxa0", "status": "succeeded", "evaluated_at": "1", "toy_identity": 4.0, "toy_reference": 3.0,
         "toy_identity_correct": 0.0, "toy_psnr_reference": 11.0, "toy_consistency": 0.5, "toy_iou": 0.1},
        {"asset_id": "retry0", "status": "succeeded", "evaluated_at": "1", "toy_identity": 5.0, "toy_reference": 5.0,
         "toy_identity_correct": 1.0, "toy_psnr_reference": FAITHFUL_PSNR - 2, "toy_consistency": 1.0, "toy_iou": 0.3},
        {"asset_id": "late0", "status": "succeeded", "evaluated_at": "1", "toy_identity": 0.0, "toy_reference": 7.0,
         "toy_identity_correct": 0.0, "toy_psnr_reference": 12.0, "toy_consistency": 0.25, "toy_iou": 0.0},
    ]
    (root / "scores").mkdir()
    columns = {name: [row.get(name) for row in rows] for name in ("asset_id", "status", "evaluated_at", *TOY_COLUMNS)}
    schema = pa.schema([SCORES_SCHEMA.field(name) for name in columns])
    pq.write_table(pa.table(columns, schema=schema), root / "scores" / "part-1.parquet")
    return root


def test_toy_world_scores_put_a_verdict_on_each_card(tmp_path):
    """✓ recovered and faithful, ≈ recovered but below the faithful PSNR, ✗ another object; the
    latest succeeded score row wins; one line over the page counts them."""
    gallery = build_gallery(_toy_scored_dataset(tmp_path))
    index = (gallery / "index.html").read_text()
    assert "Toy world: 2 of 3 scored assets became their reference's object, 1 faithfully" in index
    assets = {item["id"]: item for item in _data(gallery)["assets"]}
    verdicts = {asset_id: assets[asset_id]["verdict"] for asset_id in ("boxa0", "retry0", "late0")}
    assert verdicts["boxa0"]["kind"] == "ok" and "became its reference's object (3)" in verdicts["boxa0"]["text"]
    assert "mesh IoU 0.80" in verdicts["boxa0"]["text"]
    assert verdicts["retry0"]["kind"] == "weak" and "nearest to its reference's object (5) but below" in verdicts["retry0"]["text"]
    assert verdicts["late0"]["kind"] == "bad" and "became object 0; the reference shows object 7" in verdicts["late0"]["text"]
    assert assets["boxa0"]["scores"]["toy_psnr_reference"] > assets["retry0"]["scores"]["toy_psnr_reference"]
    assert all(item["verdict"] is None for asset_id, item in assets.items() if asset_id not in verdicts)


@pytest.mark.slow
def test_browser_shows_the_toy_world_verdicts(tmp_path, browser):
    from selenium.webdriver.common.by import By

    gallery = build_gallery(_toy_scored_dataset(tmp_path))
    _open(browser, gallery)
    verdict = lambda asset_id: browser.find_element(By.CSS_SELECTOR, f"#asset-{asset_id} p.verdict")  # noqa: E731
    assert "ok" in verdict("boxa0").get_attribute("class") and "reference's object (3)" in verdict("boxa0").text
    assert "bad" in verdict("late0").get_attribute("class") and "reference shows object 7" in verdict("late0").text
    _open(browser, gallery, "#asset=retry0")
    detail = browser.find_element(By.ID, "detail")
    assert "below" in detail.find_element(By.CSS_SELECTOR, "p.verdict.weak").text
    assert "Evaluation scores" in detail.text
    _screenshot(browser, "toy-verdicts.png")
    assert console_errors(browser) == []
