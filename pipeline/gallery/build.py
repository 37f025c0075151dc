"""Static gallery of a dataset: one page that lists every asset and opens each one in place.

``python -m pipeline.gallery OUTPUT`` (:mod:`pipeline.gallery.cli`; also run at the end of every
dataset run) reads the dataset layout (``manifest/part-*.parquet`` + ``assets/<asset_id>/``, and
the evaluation's ``scores/part-*.parquet`` when present) and writes ``OUTPUT/gallery/``:

- ``index.html``: the whole gallery in one file: its own CSS and script and the table of every
  asset (prompt, variant, status, metrics, error, its files); the script shows one page of cards
  at a time (variants of a prompt side by side, filters over all assets) and an asset's detail
  (turntable, 3D view, downloads) at ``index.html#asset=<asset_id>``. Nothing is inlined per asset.
- ``thumbs/``: small JPEGs of each asset's reference and preview grid (the cards' images);
- ``models/``: each asset's GLB, or its splats in a 32-byte-per-Gaussian layout, wrapped in a
  classic script, because browsers refuse ``fetch`` on ``file://``;
- ``static/``: the 3D viewers, shared by every asset and loaded only when a 3D view opens:
  Google's ``<model-viewer>`` (Apache-2.0) for meshes and the project's own WebGL splat viewer.

A toy-world dataset's scores put a verdict on every card (did the asset become its reference's
object, how close from views it never trained on) and one line over the page
(:mod:`~pipeline.gallery.verdicts`).

Media load lazily: only the visible page's thumbnails, turntables when a card is hovered or
clicked. Everything is reached with relative URLs, so the gallery works from ``file://``, from any
static web server, and after the dataset directory moves. Inside MLflow's artifact view (a
sandboxed ``blob:`` iframe, where relative URLs resolve to nothing) the same ``index.html``,
logged under the dataset's parent run, shows each card with the thumbnail its asset's MLflow run
holds and opens details in place; turntables, 3D views and downloads stay with the dataset.

All dataset text is data, never markup: Python escapes what it writes, the script only sets
``textContent`` and attributes, and the JSON inside ``<script>`` cannot close the block.

Prompts are shown through :func:`visible_controls` (a NUL or ESC byte shows as ␀ / ␛, never raw).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.gallery.derived import DerivedFiles
from pipeline.gallery.page import STATIC_DIR, STATIC_FILES, asset_item, group_order, render_index
from pipeline.gallery.records import GalleryDataset, read_manifest
from pipeline.gallery.verdicts import latest_scores, toy_summary
from pipeline.writer import DatasetWriter
from stages.asset_layout import GALLERY_DIR
from stages.atomic import atomic_write

SAFE_ASSET_ID = re.compile(r"^[A-Za-z0-9._-]+$")  # asset ids become file names
# MLflow's artifact view refuses to preview files larger than this.
MLFLOW_PREVIEW_LIMIT_BYTES = 50 * 2**20


def _write_page(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    if len(data) > MLFLOW_PREVIEW_LIMIT_BYTES:
        warnings.warn(f"{path} is {len(data) / 2**20:.0f} MiB: MLflow's artifact view only previews up to 50 MiB")
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def build_gallery(output_dir: str | os.PathLike, gallery_dir: str | os.PathLike | None = None) -> Path:
    """Write the gallery of the dataset at ``output_dir`` (local path or pyarrow URI such as s3://).

    Local dataset: written to ``<output_dir>/gallery`` (or ``gallery_dir``). Dataset on a URI:
    built in ``gallery_dir`` (a new temporary directory if None), then copied to
    ``<output_dir>/gallery``. Thumbnails and model files are rewritten only when their source
    changed. Returns the local gallery directory.
    """
    dataset = GalleryDataset(output_dir)
    _repair(output_dir)
    scores = latest_scores(DatasetWriter(os.fspath(output_dir)))
    records = [replace(r, scores=scores.get(r.asset_id, {})) for r in read_manifest(output_dir)]
    unsafe = [r.asset_id for r in records if not SAFE_ASSET_ID.match(r.asset_id)]
    if unsafe:
        raise ValueError(f"manifest asset_id(s) {unsafe[:5]} are not safe file names ([A-Za-z0-9._-]+)")
    remote = "://" in os.fspath(output_dir)
    if gallery_dir is not None:
        target = Path(gallery_dir)
    elif remote:
        target = Path(tempfile.mkdtemp(prefix="gallery-"))
    else:
        target = Path(dataset.root) / GALLERY_DIR
    target.mkdir(parents=True, exist_ok=True)
    static = target / "static"
    static.mkdir(exist_ok=True)
    for name in STATIC_FILES:
        shutil.copyfile(STATIC_DIR / name, static / name)
    for old in ("assets", "LICENSES"):  # the per-asset pages of earlier galleries
        shutil.rmtree(target / old, ignore_errors=True)

    outputs = DerivedFiles(dataset, target)
    items = [asset_item(dataset, outputs, record) for record in group_order(records)]
    outputs.remove_unused(("thumbs", "models"))
    if remote or gallery_dir is None:
        base = ".."
    else:
        base = Path(os.path.relpath(dataset.root, target.resolve())).as_posix()
    _write_page(target / "index.html", render_index(items, base, summary=toy_summary(records)))
    if remote:
        pafs.copy_files(str(target), dataset.path(GALLERY_DIR), destination_filesystem=dataset.fs)
    return target


def _repair(output_dir: str | os.PathLike) -> None:
    """Set aside manifest shards that do not read and rebuild their committed rows (one line each)."""
    from pipeline.integrity import repair_manifest
    from pipeline.writer import DatasetWriter

    writer = DatasetWriter(os.fspath(output_dir))
    writer.manifest_rows()
    if not writer.damaged_parts:
        return
    for line in repair_manifest(writer, compact=False).lines():
        print(f"[gallery] {line}", file=sys.stderr, flush=True)


def log_gallery_to_mlflow(
    gallery_dir: str | os.PathLike, run_id: str, artifact_path: str = "gallery", tracking_uri: str | None = None
) -> None:
    """Log the gallery's ``index.html`` as ``<artifact_path>/index.html`` of the MLflow run ``run_id``
    (the thumbnails come from each asset's own run; the dataset keeps the media and models).

    ``tracking_uri`` None: MLflow's current one (``mlflow.set_tracking_uri`` / ``MLFLOW_TRACKING_URI``).
    """
    from pipeline.tracking import open_client  # imported here: building a gallery does not need MLflow

    index = Path(gallery_dir) / "index.html"
    if not index.is_file():
        raise FileNotFoundError(f"{gallery_dir} has no index.html: build the gallery first")
    if tracking_uri is None:
        import mlflow

        tracking_uri = mlflow.get_tracking_uri()
    open_client(tracking_uri).log_artifact(run_id, str(index), artifact_path=artifact_path)
