"""The dataset's MLflow store in the real ``mlflow ui`` (started as README says, in the dataset
directory), in headless Chromium: the experiment opens in the model-training view from the URL the
driver prints, and the gallery logged under the parent run works inside MLflow's artifact view
(a sandboxed blob: iframe): cards, thumbnails from the assets' runs, details opened in place."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gallery_fixtures import start_browser, write_asset
from pipeline.config import build_config
from pipeline.console import browse_lines
from pipeline.gallery import build_gallery, log_gallery_to_mlflow
from pipeline.jobs import make_jobs
from pipeline.tracking import Tracker
from pipeline.writer import ASSET_RECORD, DatasetWriter, utc_now


def _tracked_dataset(root: Path) -> tuple[Tracker, list[dict]]:
    """Two committed assets with their child runs closed, the gallery logged under the parent."""
    config = OmegaConf.to_object(build_config({"prompts": {"inline": ["a red apple"]}}, [f"output={root}", "method_preset=tiny", "variants=2"]))
    writer = DatasetWriter(config.output)
    tracker = Tracker(config, root / ".work", 2)
    rows = []
    for job in make_jobs(config, ["a red apple"]):
        run_id = tracker.start_asset(job)
        files = write_asset(root / ".stage", job.asset_id, glb=True, turntable="gif", color=(200, 60 * job.variant, 40))
        staged = root / ".stage" / "assets" / job.asset_id
        now = utc_now()
        record = {
            "asset_id": job.asset_id, "prompt": job.prompt, "prompt_index": 0, "variant": job.variant,
            "reference_seed": job.reference_seed, "seed": job.seed, "method": "isd", "representation": "nerf",
            "config_digest": job.config_digest, "status": "succeeded", "error": None, "asset_dir": f"assets/{job.asset_id}",
            "files": json.dumps(files), "metrics": json.dumps({"loss": 0.5}), "iterations": 6, "duration_s": 1.0,
            "started_at": now, "finished_at": now, "mlflow_run_id": run_id,
        }
        (staged / ASSET_RECORD).write_text(json.dumps(record))
        assert writer.commit(job.asset_id, staged)
        tracker.finish_asset(record, writer)
        rows.append(record)
    writer.write_manifest(rows)
    log_gallery_to_mlflow(build_gallery(root), tracker.parent_id, tracking_uri=tracker.tracking_uri)
    tracker.finish({"succeeded": 2})
    return tracker, rows


@pytest.fixture(scope="module")
def mlflow_ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    tracker, rows = _tracked_dataset(root)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    line = browse_lines(tracker.config, tracker.experiment_id)[1]
    command = line.split(" && ", 1)[1].split("  (then", 1)[0].split() + ["--port", str(port), "--host", "127.0.0.1"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        yield {"base": f"http://127.0.0.1:{port}", "tracker": tracker, "rows": rows, "line": line}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(server.pid, sig)
                server.wait(10)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="module")
def browser():
    driver = start_browser()
    yield driver
    driver.quit()


def _wait(driver, script: str, timeout_s: float = 60.0):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s, poll_frequency=0.3).until(lambda d: d.execute_script(script))
    return driver.execute_script(script)


@pytest.mark.slow
def test_the_printed_url_opens_the_experiment_in_the_model_training_view(mlflow_ui, browser):
    tracker = mlflow_ui["tracker"]
    url = f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}?workflowType=machine_learning"
    assert url in mlflow_ui["line"]
    browser.get(url.replace("http://127.0.0.1:5000", mlflow_ui["base"]))
    parent = tracker.client.get_run(tracker.parent_id).info.run_name
    _wait(browser, f"return document.body.innerText.includes({json.dumps(parent)})")
    text = browser.execute_script("return document.body.innerText")
    assert "Runs" in text and "Traces" in text and "Judges" not in text  # model training, not the GenAI view


@pytest.mark.slow
def test_the_gallery_works_inside_mlflows_artifact_view(mlflow_ui, browser):
    from selenium.webdriver.common.by import By

    tracker = mlflow_ui["tracker"]
    browser.get(f"{mlflow_ui['base']}/#/experiments/{tracker.experiment_id}/runs/{tracker.parent_id}/artifactPath/gallery/index.html")
    _wait(browser, "return document.querySelectorAll('iframe').length > 0")
    browser.switch_to.frame(browser.find_element(By.TAG_NAME, "iframe"))
    try:
        assert browser.execute_script("return location.protocol") == "blob:"
        cards = browser.find_elements(By.CSS_SELECTOR, "article.asset")
        assert {c.get_attribute("data-asset-id") for c in cards} == {r["asset_id"] for r in mlflow_ui["rows"]}
        first = mlflow_ui["rows"][0]
        # the thumbnail comes from the asset's own MLflow run, served by this MLflow
        src = _wait(browser, f"const i = document.querySelector('#asset-{first['asset_id']} img.preview'); return i && i.complete && i.naturalWidth > 0 && i.src")
        assert src.endswith(f"get-artifact?path=thumbnail.jpg&run_uuid={first['mlflow_run_id']}")
        link = browser.find_element(By.CSS_SELECTOR, f"#asset-{first['asset_id']} a.asset-link")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", link)
        link.click()
        assert browser.find_element(By.CSS_SELECTOR, ".detail h1.prompt").text == first["prompt"]
        assert browser.execute_script("return location.protocol") == "blob:"  # opened in place, no blocked frame
    finally:
        browser.switch_to.default_content()
