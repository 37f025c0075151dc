"""The gallery of a 2,000-asset dataset: one small page whose first paint and memory do not grow
with the dataset (what benchmarks.gallery measures; figures in benchmarks/RESULTS.md)."""

from __future__ import annotations

import pytest

from benchmarks.gallery import chromium_paths, run
from pipeline.gallery import PAGE_CARDS


@pytest.mark.slow
def test_index_of_2000_assets_stays_bounded(tmp_path):
    binary, driver = chromium_paths()
    if binary is None or driver is None:
        pytest.skip("chromium and chromedriver not installed")
    results = run(2000, tmp_path)
    print(results)
    browser = results["browser"]
    assert browser["shown_count"] == "2000 shown"  # every asset is in the page's data ...
    assert browser["cards_on_page"] <= PAGE_CARDS  # ... one page of them is in the DOM
    assert browser["dom_elements"] < 40 * PAGE_CARDS
    assert 0 < browser["images_loaded"] <= browser["images_in_page"] <= 2 * PAGE_CARDS
    assert browser["videos_or_turntables"] == 0 and browser["viewer_scripts"] == 0  # nothing heavy until asked
    assert results["index_html_bytes"] < 1200 * 2000  # ~1 KB of data per asset, no media, no viewer
    assert results["gallery_bytes_by_part"]["static"] < 1_300_000  # the viewers once, not per asset
    assert browser["js_heap_used_mb"] < 64
    assert browser["first_contentful_paint_ms"] < 10_000  # generous: a loaded 2-core machine paints in < 0.5 s
    assert results["rebuild_seconds"] < results["build_seconds"]  # thumbnails and models are not redone
