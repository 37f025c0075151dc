"""The page: ``gallery/index.html``, its own CSS and script and the JSON table of every asset;
the script shows one page of cards at a time and an asset's detail at ``#asset=<id>``."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from pipeline.gallery.derived import DerivedFiles, camera, model_script, thumbnail
from pipeline.gallery.escape import inline_script, json_for_script, visible_controls
from pipeline.gallery.records import AssetRecord, GalleryDataset, find_role_files, record_dir
from pipeline.gallery.verdicts import verdict

STATIC_DIR = Path(__file__).parent.parent / "gallery_static"
"""The page's CSS and script and the shared 3D viewers (package data of ``pipeline``)."""
VIEWER_SCRIPT = "model-viewer-umd.min.js"
SPLAT_VIEWER_SCRIPT = "splat-viewer.js"
MODEL_VIEWER_VERSION = "4.4.0"
LICENSE_FILES = ("model-viewer.LICENSE.txt", "THIRD_PARTY_NOTICES.md")
STATIC_FILES = (VIEWER_SCRIPT, SPLAT_VIEWER_SCRIPT, *LICENSE_FILES)
PAGE_CARDS = 48
"""Cards per index page (prompt groups are not split across pages unless one alone is larger)."""
DOWNLOADS = (("mesh", "GLB mesh"), ("mesh_obj", "OBJ mesh"), ("mesh_mtl", "OBJ material"), ("splats", "PLY splats (3DGS)"))


def _static_text(name: str) -> str:
    path = STATIC_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"gallery static file missing: {path} (is the package data installed?)")
    return path.read_text(encoding="utf-8")


def group_order(records: list[AssetRecord]) -> list[AssetRecord]:
    """Variants of one prompt together; groups in prompt order, variants in variant order."""
    groups: dict[str, list[AssetRecord]] = {}
    for record in records:
        groups.setdefault(record.prompt, []).append(record)

    def group_key(items: list[AssetRecord]) -> tuple[int, str]:
        indices = [r.prompt_index for r in items if r.prompt_index is not None]
        return (min(indices) if indices else 2**62, items[0].prompt)

    ordered = sorted(groups.values(), key=group_key)
    return [r for items in ordered for r in sorted(items, key=lambda r: (r.variant if r.variant is not None else 2**62, r.asset_id))]


def asset_item(dataset: GalleryDataset, outputs: DerivedFiles, record: AssetRecord) -> dict[str, Any]:
    """What the page's script knows about one asset (paths relative to the dataset root)."""
    roles = find_role_files(dataset, record)
    thumbs = {role: thumbnail(outputs, record.asset_id, role, roles[role]) for role in ("reference", "preview") if role in roles}
    item: dict[str, Any] = {
        "id": record.asset_id,
        "prompt": visible_controls(record.prompt),
        "variant": record.variant,
        "status": record.status,
        "error": record.error,
        "metrics": record.metrics,
        "run": record.details.get("mlflow_run_id"),
        "files": roles,
        "thumbs": {role: path for role, path in thumbs.items() if path},
        "details": {k: v for k, v in record.details.items() if v is not None},
        "scores": record.scores,
        "verdict": verdict(record.scores),
    }
    kind, source = ("splat", roles["splats"]) if "splats" in roles else (("glb", roles["mesh"]) if "mesh" in roles else (None, None))
    if kind is not None:
        script, why = model_script(outputs, record.asset_id, kind, source)
        item["model"] = {"kind": kind, "script": script, "note": why}
        if kind == "splat":
            item["model"]["camera"] = camera(dataset, record_dir(record))
            if "mesh" in roles:  # the extracted mesh of a splat asset: its own 3D view too
                mesh_script, mesh_why = model_script(outputs, record.asset_id, "glb", roles["mesh"])
                item["model"]["mesh_script"], item["model"]["mesh_note"] = mesh_script, mesh_why
    return item


def render_index(items: list[dict[str, Any]], dataset_base: str, *, page_cards: int = PAGE_CARDS, summary: str = "") -> str:
    """HTML of ``gallery/index.html`` for the asset ``items`` (:func:`asset_item`, in page order);
    ``summary``: extra HTML under the header's counts (:func:`~pipeline.gallery.verdicts.toy_summary`)."""
    failed = sum(item["status"] != "succeeded" for item in items)
    data = json_for_script({
        "dataset": dataset_base,
        "pageCards": page_cards,
        "viewers": {"mesh": f"static/{VIEWER_SCRIPT}", "splat": f"static/{SPLAT_VIEWER_SCRIPT}"},
        "downloads": [list(pair) for pair in DOWNLOADS],
        "assets": items,
    })
    statuses = sorted({item["status"] for item in items} | {"succeeded", "failed"})
    options = "".join(f'<option value="{html.escape(s)}">{html.escape(s)}</option>' for s in statuses)
    title = f"Gallery ({len(items)} assets)"
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_static_text('gallery.css')}</style>\n</head>\n"
        '<body class="index-page">\n'
        '<header class="page"><h1>Dataset gallery</h1>'
        f'<p class="summary">{len(items)} assets: {len(items) - failed} succeeded, {failed} not succeeded; '
        f'{len({item["prompt"] for item in items})} prompts. Hover or tap a card to play its turntable; open it for the 3D view and downloads.</p>'
        f"{summary}"
        '<div class="filters"><label>Prompt <input id="filter-text" type="search" placeholder="filter by prompt text"></label>'
        f'<label>Status <select id="filter-status"><option value="">all</option>{options}</select></label>'
        '<span id="shown-count" class="muted"></span><span id="mlflow-note" class="muted hidden"></span></div>'
        '<nav class="pager" id="pager-top"></nav></header>\n'
        '<main id="cards"><noscript><p>The gallery needs JavaScript.</p></noscript></main>\n'
        '<nav class="pager" id="pager-bottom"></nav>\n'
        '<div id="detail" class="detail hidden" role="dialog" aria-modal="true"></div>\n'
        f'<script type="application/json" id="gallery-data">{data}</script>\n'
        f"{inline_script(_static_text('gallery.js'), 'gallery.js')}\n"
        "</body>\n</html>\n"
    )
