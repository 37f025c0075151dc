"""Static gallery of a dataset (``python -m pipeline.gallery``; the flow is
:func:`pipeline.gallery.build.build_gallery`). Rooms: the dataset's records
(:mod:`~pipeline.gallery.records`), escaping (:mod:`~pipeline.gallery.escape`), derived thumbnails
and models (:mod:`~pipeline.gallery.derived`), score verdicts (:mod:`~pipeline.gallery.verdicts`), the page
(:mod:`~pipeline.gallery.page`)."""

from pipeline.gallery.build import MLFLOW_PREVIEW_LIMIT_BYTES, SAFE_ASSET_ID, build_gallery, log_gallery_to_mlflow
from pipeline.gallery.cli import main
from pipeline.gallery.derived import MODEL_VIEW_MAX_BYTES, SPLAT_RECORD, splat_bytes
from pipeline.gallery.escape import json_for_script, visible_controls
from pipeline.gallery.page import (
    LICENSE_FILES, MODEL_VIEWER_VERSION, PAGE_CARDS, SPLAT_VIEWER_SCRIPT, STATIC_DIR, STATIC_FILES, VIEWER_SCRIPT, render_index,
)
from pipeline.gallery.records import AssetRecord, read_manifest
from pipeline.gallery.verdicts import SCORE_FIELDS, toy_summary, verdict

__all__ = [
    "LICENSE_FILES", "MLFLOW_PREVIEW_LIMIT_BYTES", "MODEL_VIEWER_VERSION", "MODEL_VIEW_MAX_BYTES", "PAGE_CARDS", "SAFE_ASSET_ID",
    "SCORE_FIELDS", "SPLAT_RECORD", "SPLAT_VIEWER_SCRIPT", "STATIC_DIR", "STATIC_FILES", "VIEWER_SCRIPT", "AssetRecord", "build_gallery",
    "json_for_script", "log_gallery_to_mlflow", "main", "read_manifest", "render_index", "splat_bytes", "toy_summary", "verdict", "visible_controls",
]
