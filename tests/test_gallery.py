"""Gallery: pages built from a synthetic dataset, checked with an HTML parser and in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import trimesh
from PIL import Image

from pipeline.gallery import build_gallery, json_for_script, log_gallery_to_mlflow, main, read_manifest

XSS_PROMPT = '<script>alert(1)</script> "quotes" & <b>tags</b>'
FLAG_PROMPT = "<img src=x onerror=\"window.__xss='img'\"><script>window.__xss='script'</script> a mug"
BOX_EXTENTS = (1.0, 0.5, 0.25)
FAILED_ERROR = "RuntimeError: CUDA out of memory <while> rendering & \"exporting\""


def _png(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_asset(root: Path, asset_id: str, *, glb: bool, turntable: str, color: tuple[int, int, int]) -> dict[str, str]:
    import imageio.v3 as iio

    folder = root / "assets" / asset_id
    folder.mkdir(parents=True)
    (folder / "reference.png").write_bytes(_png(color, (64, 64)))
    (folder / "preview.png").write_bytes(_png(color, (256, 64)))
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
        files["mesh"] = "mesh.glb"
    else:
        (folder / "splats.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 0\nend_header\n")
        files["splats"] = "splats.ply"
    # Manifest paths relative to the dataset root (the gallery also accepts paths relative to asset_dir).
    return {name: f"assets/{asset_id}/{rel}" for name, rel in files.items()}


def _row(asset_id: str, prompt: str, prompt_index: int, variant: int, status: str, error, files, metrics) -> dict:
    return {
        "asset_id": asset_id, "prompt": prompt, "prompt_index": prompt_index, "variant": variant,
        "reference_seed": 10 + variant, "seed": 20 + variant, "method": "isd", "representation": "nerf",
        "config_digest": "abc123", "status": status, "error": error,
        "asset_dir": f"assets/{asset_id}" if files else None, "files": json.dumps(files),
        "metrics": json.dumps(metrics), "iterations": 100, "duration_s": 1.5,
        "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:01:00+00:00", "mlflow_run_id": None,
    }


def _write_shard(root: Path, name: str, rows: list[dict]) -> None:
    (root / "manifest").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest" / name)


def make_dataset(root: Path) -> dict[str, dict]:
    """A small dataset in the contract layout; returns the expected latest row per asset_id."""
    rows = [
        _row("boxa0", "a red box", 0, 0, "succeeded", None,
             _write_asset(root, "boxa0", glb=True, turntable="mp4", color=(200, 30, 30)),
             {"loss": 0.125, "clip_score": 0.31, "note": "</script><script>window.__xss='metric'</script>"}),
        _row("boxa1", "a red box", 0, 1, "succeeded", None,
             _write_asset(root, "boxa1", glb=True, turntable="gif", color=(30, 30, 200)), {"loss": 0.25}),
        _row("xss0", XSS_PROMPT, 1, 0, "succeeded", None,
             _write_asset(root, "xss0", glb=False, turntable="gif", color=(30, 200, 30)), {"loss": 0.5}),
        _row("flag0", FLAG_PROMPT, 2, 0, "failed", FAILED_ERROR, {}, {}),
    ]
    # "retry0" fails in the first shard and succeeds in the second (same finished_at): the later row wins.
    first = _row("retry0", "a chair", 3, 0, "failed", "first attempt died", {}, {})
    retried = _row("retry0", "a chair", 3, 0, "succeeded", None,
                   _write_asset(root, "retry0", glb=True, turntable="mp4", color=(120, 120, 120)), {"loss": 1.0})
    # "late0" is in the older shard but finished later than its row in the newer shard: finished_at wins.
    late = _row("late0", "a lamp", 4, 0, "succeeded", None,
                _write_asset(root, "late0", glb=True, turntable="gif", color=(200, 200, 30)), {"loss": 2.0})
    late["finished_at"] = "2026-01-01T00:09:00+00:00"
    early = {**_row("late0", "a lamp", 4, 0, "failed", "superseded failure", {}, {}),
             "finished_at": "2026-01-01T00:02:00+00:00"}
    _write_shard(root, "part-20260101T000000-aaaa.parquet", rows[:2] + [first, late])
    _write_shard(root, "part-20260101T000100-bbbb.parquet", rows[2:] + [retried, early])
    return {row["asset_id"]: row for row in rows + [retried, late]}


class _Collector(HTMLParser):
    """Independent reader of the generated HTML: elements with attributes and their text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self._open: list[dict] = []

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.elements.append(element)
        if tag not in {"img", "meta", "input", "br", "source", "link"}:
            self._open.append(element)

    def handle_endtag(self, tag):
        for index in range(len(self._open) - 1, -1, -1):
            if self._open[index]["tag"] == tag:
                del self._open[index:]
                break

    def handle_data(self, data):
        for element in self._open:
            element["text"] += data

    def find(self, tag: str, **attrs) -> list[dict]:
        return [e for e in self.elements if e["tag"] == tag and all(e["attrs"].get(k) == v for k, v in attrs.items())]


def _parse(path: Path) -> _Collector:
    parser = _Collector()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


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


def test_index_lists_every_asset_and_escapes_text(built):
    root, gallery, expected = built
    assert gallery == root.resolve() / "gallery"
    page = _parse(gallery / "index.html")
    cards = {e["attrs"]["data-asset-id"]: e for e in page.find("article")}
    assert set(cards) == set(expected)
    for asset_id, row in expected.items():
        assert cards[asset_id]["attrs"]["data-status"] == row["status"]
        assert cards[asset_id]["attrs"]["data-prompt"] == row["prompt"]  # attribute decodes to the raw prompt
        assert (gallery / "assets" / f"{asset_id}.html").is_file()
    # The failed asset shows its error; the retried one does not show the old error.
    assert FAILED_ERROR in cards["flag0"]["text"]
    assert "first attempt died" not in (gallery / "index.html").read_text()
    assert "superseded failure" not in (gallery / "index.html").read_text()
    # Variants of one prompt share a group; the HTML prompt is literal text, not markup.
    groups = {e["attrs"]["data-prompt"]: e for e in page.find("section")}
    assert set(groups) == {row["prompt"] for row in expected.values()}
    assert groups["a red box"]["text"].count("variant") == 2
    headings = [e["text"] for e in page.find("h2")]
    assert XSS_PROMPT in headings and FLAG_PROMPT in headings
    assert not page.find("b") and not page.find("img", src="x")
    scripts = page.find("script")
    assert [s["attrs"].get("type") for s in scripts] == ["application/json", None]
    assert "alert(1)" not in scripts[1]["text"] and "__xss" not in scripts[1]["text"]
    data = {item["asset_id"]: item for item in json.loads(scripts[0]["text"])}
    assert data["xss0"]["prompt"] == XSS_PROMPT
    assert data["boxa0"]["metrics"]["note"] == json.loads(expected["boxa0"]["metrics"])["note"]
    # Media are inlined: reference beside preview and turntable, thumbnails decode as images.
    imgs = [e for e in page.find("img") if e["attrs"].get("class") == "reference"]
    assert len(imgs) == sum(row["status"] == "succeeded" for row in expected.values())
    head, payload = imgs[0]["attrs"]["src"].split(",", 1)
    assert head == "data:image/jpeg;base64"
    assert Image.open(io.BytesIO(base64.b64decode(payload))).size == (64, 64)
    assert len(page.find("video")) == 2  # mp4 turntables; the gif ones are <img>


def test_asset_page_embeds_the_glb(built):
    root, gallery, _ = built
    page = _parse(gallery / "assets" / "boxa0.html")
    (viewer,) = page.find("model-viewer")
    assert "camera-controls" in viewer["attrs"]
    head, payload = viewer["attrs"]["src"].split(",", 1)
    assert head == "data:model/gltf-binary;base64"
    glb = base64.b64decode(payload)
    assert glb == (root / "assets" / "boxa0" / "mesh.glb").read_bytes()
    mesh = trimesh.load(io.BytesIO(glb), file_type="glb", force="mesh")
    np.testing.assert_allclose(mesh.extents, BOX_EXTENTS, atol=1e-6)
    scripts = page.find("script")
    assert len(scripts) == 2 and "customElements.define(\"model-viewer\"" in scripts[1]["text"]
    assert "Apache License" in (gallery / "LICENSES" / "model-viewer.LICENSE.txt").read_text()


def test_splat_only_and_failed_asset_pages(built):
    _, gallery, _ = built
    splat = _parse(gallery / "assets" / "xss0.html")
    assert not splat.find("model-viewer")
    links = [e["attrs"]["href"] for e in splat.find("a")]
    assert "../../assets/xss0/splats.ply" in links
    assert (gallery / "assets" / "../../assets/xss0/splats.ply").resolve().is_file()
    assert [e["text"] for e in splat.find("h1")] == [XSS_PROMPT]
    assert not splat.find("script") and not splat.find("b")
    failed = _parse(gallery / "assets" / "flag0.html")
    assert [e["text"] for e in failed.find("pre")] == [FAILED_ERROR]


def test_splat_asset_with_a_mesh_shows_the_mesh_and_links_the_splats(tmp_path):
    files = _write_asset(tmp_path, "both0", glb=True, turntable="gif", color=(20, 120, 220))
    (tmp_path / "assets" / "both0" / "splats.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 0\nend_header\n")
    files["splats"] = "assets/both0/splats.ply"
    _write_shard(tmp_path, "part-0.parquet", [_row("both0", "a blue splat", 0, 0, "succeeded", None, files, {})])
    page = _parse(build_gallery(tmp_path) / "assets" / "both0.html")
    assert len(page.find("model-viewer")) == 1
    assert "../../assets/both0/splats.ply" in [e["attrs"]["href"] for e in page.find("a")]


def test_vendored_viewer_matches_its_notice():
    """The shipped model-viewer bundle is the file the notice names (hash), with its licence beside it."""
    import hashlib
    import re

    from pipeline.gallery import LICENSE_FILES, STATIC_DIR, VIEWER_SCRIPT

    notice = (STATIC_DIR / "THIRD_PARTY_NOTICES.md").read_text()
    digest = hashlib.sha256((STATIC_DIR / VIEWER_SCRIPT).read_bytes()).hexdigest()
    assert re.search(rf"copied byte for byte\s*\(sha256 `{digest}`\)", notice)
    assert all((STATIC_DIR / name).is_file() for name in LICENSE_FILES)
    assert "Apache License" in (STATIC_DIR / "model-viewer.LICENSE.txt").read_text()


def test_json_for_script_cannot_close_the_block():
    text = json_for_script({"a": "</script><!-- \u2028 & >", "b": [float("nan"), 1.5]})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text, parse_constant=pytest.fail) == {"a": "</script><!-- \u2028 & >", "b": ["nan", 1.5]}


def test_bad_manifests_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        build_gallery(tmp_path)
    _write_shard(tmp_path, "part-1-x.parquet", [{"asset_id": "a", "status": "succeeded"}])
    with pytest.raises(ValueError, match=r"part-1-x\.parquet.*prompt"):
        read_manifest(tmp_path)
    _write_shard(tmp_path, "part-1-x.parquet", [{"asset_id": "a", "prompt": "p", "status": "succeeded", "metrics": "{oops"}])
    with pytest.raises(ValueError, match="'metrics'"):
        read_manifest(tmp_path)
    _write_shard(tmp_path, "part-1-x.parquet", [{"asset_id": "../evil", "prompt": "p", "status": "failed"}])
    with pytest.raises(ValueError, match="evil"):
        build_gallery(tmp_path)


def test_uri_dataset_and_cli(built, tmp_path, capsys):
    root, _, expected = built
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("gallery"))
    local = build_gallery(copy.as_uri())  # URI path: built locally, then copied next to the dataset
    assert local != copy / "gallery" and (local / "index.html").is_file()
    assert (copy / "gallery" / "index.html").read_bytes() == (local / "index.html").read_bytes()
    assert {p.stem for p in (copy / "gallery" / "assets").iterdir()} == set(expected)
    (tmp_path / "cli" / "assets").mkdir(parents=True)
    (tmp_path / "cli" / "assets" / "gone.html").write_text("stale")
    main([str(copy), "--gallery-dir", str(tmp_path / "cli")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli" / "index.html")
    assert {p.stem for p in (tmp_path / "cli" / "assets").iterdir()} == set(expected)  # stale page removed


def test_log_gallery_to_mlflow(built, tmp_path, monkeypatch):
    import mlflow

    _, gallery, expected = built
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store keeps the test fast
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "elsewhere").as_uri())  # the explicit URI must win
    uri = (tmp_path / "mlruns").as_uri()
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("gallery-test"))
    log_gallery_to_mlflow(gallery, run.info.run_id, tracking_uri=uri)
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "gallery")}
    assert {"gallery/index.html", "gallery/assets", "gallery/LICENSES"} <= logged
    pages = {f.path for f in client.list_artifacts(run.info.run_id, "gallery/assets")}
    assert pages == {f"gallery/assets/{asset_id}.html" for asset_id in expected}
    with pytest.raises(FileNotFoundError, match="index.html"):
        log_gallery_to_mlflow(tmp_path, run.info.run_id, tracking_uri=uri)
    # Without a URI, MLflow's own setting (MLFLOW_TRACKING_URI) is used, as the CLI does.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    main([str(gallery.parent), "--gallery-dir", str(tmp_path / "cli"), "--mlflow-run-id", run.info.run_id])
    assert "gallery/index.html" in {f.path for f in client.list_artifacts(run.info.run_id, "gallery")}


# ---------------------------------------------------------------- headless Chromium (skipped without it)

CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--window-size=1024,768",
    "--disable-dev-shm-usage",  # containers often have a 64 MB /dev/shm
    # WebGL without a GPU: SwiftShader, opted in explicitly (the silent fallback is deprecated).
    "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
)
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", Path(__file__).parent / "artifacts")) / "gallery"


@pytest.fixture(scope="module")
def browser():
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or next(
        (p for p in ("/usr/bin/chromium",) if os.path.exists(p)), None)
    driver_path = shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None)
    if binary is None or driver_path is None:
        pytest.skip("chromium and chromedriver not installed (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)  # explicit driver: no Selenium Manager download
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def _console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


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


def _wait_for_model(driver, timeout_s: float = 180.0) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(
        lambda d: d.execute_script("return document.body.dataset.modelState || null"))
    return driver.execute_script("return document.body.dataset.modelState")


@pytest.mark.slow
def test_browser_index(built, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _, gallery, expected = built
    browser.get((gallery / "index.html").as_uri())
    _assert_no_script_ran(browser)
    cards = {c.get_attribute("data-asset-id"): c for c in browser.find_elements(By.CSS_SELECTOR, "article.asset")}
    assert set(cards) == set(expected) and all(c.is_displayed() for c in cards.values())
    assert cards["flag0"].find_element(By.CSS_SELECTOR, "pre.error").text == FAILED_ERROR
    headings = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "h2.prompt")]
    assert XSS_PROMPT in headings  # shown as text
    assert browser.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    _screenshot(browser, "index.png")

    browser.find_element(By.ID, "filter-text").send_keys("RED BOX")
    assert {a for a, c in cards.items() if c.is_displayed()} == {"boxa0", "boxa1"}
    browser.find_element(By.ID, "filter-text").clear()
    browser.find_element(By.ID, "filter-text").send_keys(" ")  # fires input after clear()
    Select(browser.find_element(By.ID, "filter-status")).select_by_value("failed")
    assert {a for a, c in cards.items() if c.is_displayed()} == {"flag0"}
    assert browser.find_element(By.ID, "shown-count").text == "1 shown"
    _screenshot(browser, "index-failed-only.png")
    _assert_no_script_ran(browser)
    assert _console_errors(browser) == []


@pytest.mark.slow
def test_browser_asset_page_loads_and_orbits_the_model(built, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    _, gallery, _ = built
    browser.get((gallery / "assets" / "boxa0.html").as_uri())
    assert _wait_for_model(browser) == "loaded"
    viewer = browser.find_element(By.ID, "viewer")
    loaded, *dims = browser.execute_script(
        "const v = document.getElementById('viewer'); const d = v.getDimensions(); return [v.loaded, d.x, d.y, d.z]")
    assert loaded is True
    np.testing.assert_allclose(dims, BOX_EXTENTS, atol=1e-4)  # the GLB's box, as the component measured it
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 60).until(lambda d: d.execute_script(
        "const v = document.querySelector('video.turntable'); return v.error !== null || v.videoWidth > 0"))
    video = browser.execute_script(
        "const v = document.querySelector('video.turntable'); return [v.error === null, v.videoWidth]")
    assert video == [True, 64]  # the H.264 turntable decodes
    _screenshot(browser, "asset-boxa0.png")
    theta = "return document.getElementById('viewer').getCameraOrbit().theta"
    before = browser.execute_script(theta)
    ActionChains(browser).move_to_element(viewer).click_and_hold().move_by_offset(150, 0).pause(0.3).release().perform()
    assert abs(browser.execute_script(theta) - before) > 0.1  # dragging orbits the camera
    _screenshot(browser, "asset-boxa0-orbited.png")
    assert _console_errors(browser) == []


@pytest.mark.slow
def test_browser_asset_page_in_sandboxed_blob_iframe(built, browser):
    """How MLflow's artifact view shows an HTML artifact: a blob: URL in <iframe sandbox="allow-scripts">."""
    _, gallery, _ = built
    browser.get((gallery / "assets" / "flag0.html").as_uri())  # any page as the host
    _assert_no_script_ran(browser)
    assert FAILED_ERROR in browser.page_source.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").replace("&quot;", '"')
    browser.set_script_timeout(180)
    message = browser.execute_async_script(
        """
        const [html, done] = arguments;
        window.addEventListener('message', e => { if (e.data && e.data.source === 'modedreamer-gallery') done(e.data); });
        const frame = document.createElement('iframe');
        frame.setAttribute('sandbox', 'allow-scripts');
        frame.style.cssText = 'width: 900px; height: 700px';
        frame.src = URL.createObjectURL(new Blob([html], {type: 'text/html'}));
        document.body.prepend(frame);
        """,
        (gallery / "assets" / "boxa1.html").read_text(encoding="utf-8"),
    )
    assert message["state"] == "loaded", message
    _screenshot(browser, "asset-boxa1-in-blob-iframe.png")
    assert _console_errors(browser) == []


@pytest.mark.slow
def test_browser_splat_only_page_shows_prompt_as_text(built, browser):
    from selenium.webdriver.common.by import By

    _, gallery, _ = built
    browser.get((gallery / "assets" / "xss0.html").as_uri())
    _assert_no_script_ran(browser)
    assert browser.find_element(By.CSS_SELECTOR, "h1.prompt").text == XSS_PROMPT
    assert browser.find_elements(By.TAG_NAME, "model-viewer") == []
    assert browser.find_element(By.PARTIAL_LINK_TEXT, "splats.ply").get_attribute("href").endswith("/assets/xss0/splats.ply")
    _screenshot(browser, "asset-xss0-splats.png")
    assert _console_errors(browser) == []


@pytest.mark.slow
def test_browser_gallery_of_a_generated_dataset(tmp_path, browser):
    """The gallery of a dataset written by the real code path (optimiser loop, export_asset,
    DatasetWriter commit + manifest), with one failed asset, opened in Chromium."""
    from evaluate_fixtures import build_dataset, tiny_method
    from selenium.webdriver.common.by import By

    from pipeline.jobs import Job
    from pipeline.task import manifest_row
    from pipeline.writer import DatasetWriter, utc_now

    method = tiny_method(iterations=2)
    method.export.mesh, method.export.mesh_resolution = True, 24  # the asset page's 3D view needs mesh.glb
    rows = build_dataset(tmp_path, [("a blue ball", 0, 1, 0.4), ("a blue ball", 1, 2, 0.6)], method)
    failed_job = Job("a_red_box-v0-x", "a red <b>box</b>", 1, 0, 3, 3, "tinydigest01")
    now = utc_now()
    DatasetWriter(str(tmp_path)).write_manifest(
        [manifest_row(failed_job, method, status="failed", error="NonFiniteLossError: nan at 7", started_at=now, finished_at=now)]
    )
    gallery = build_gallery(tmp_path)

    browser.get((gallery / "index.html").as_uri())
    cards = {c.get_attribute("data-asset-id"): c for c in browser.find_elements(By.CSS_SELECTOR, "article.asset")}
    assert set(cards) == {r["asset_id"] for r in rows} | {failed_job.asset_id}
    assert "NonFiniteLossError: nan at 7" in cards[failed_job.asset_id].find_element(By.CSS_SELECTOR, "pre.error").text
    assert browser.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    _screenshot(browser, "generated-index.png")
    assert _console_errors(browser) == []

    assert all("mesh" in json.loads(row["files"]) for row in rows)
    browser.get((gallery / "assets" / f"{rows[0]['asset_id']}.html").as_uri())
    assert _wait_for_model(browser) == "loaded"
    assert browser.execute_script("return document.getElementById('viewer').loaded") is True
    _screenshot(browser, "generated-asset.png")
    assert _console_errors(browser) == []


def test_toy_world_scores_put_a_verdict_on_each_card(tmp_path):
    """Evaluation shards with toy-world scores: recovered and faithful (✓), recovered but below
    the faithful PSNR (≈), another object (✗); the latest succeeded score row wins."""
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
    gallery = build_gallery(root)
    index = (gallery / "index.html").read_text()
    assert "Toy world: 2 of 3 scored assets became their reference's object, 1 faithfully" in index
    cards = {e["attrs"]["data-asset-id"]: e for e in _parse(gallery / "index.html").find("article")}
    assert set(cards) >= {"boxa0", "retry0", "late0"}
    text = {asset_id: _card_text(index, asset_id) for asset_id in ("boxa0", "retry0", "late0")}
    assert "became its reference's object (3)" in text["boxa0"] and "mesh IoU 0.80" in text["boxa0"]
    assert "nearest to its reference's object (5) but below" in text["retry0"]
    assert "became object 0; the reference shows object 7" in text["late0"]
    assert "toy_psnr_reference" in (gallery / "assets" / "boxa0.html").read_text()


def _card_text(index: str, asset_id: str) -> str:
    start = index.index(f'data-asset-id="{asset_id}"')
    return index[start : index.index("</article>", start)]
