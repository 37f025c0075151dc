"""Static HTML gallery of a dataset: an index of every asset and one page per asset with a 3D view.

Reads only the dataset layout (``<output>/manifest/part-*.parquet`` + ``<output>/assets/<asset_id>/``,
and the evaluation's ``<output>/scores/part-*.parquet`` when present) and writes
``<output>/gallery/index.html`` and ``<output>/gallery/assets/<asset_id>.html``. A toy-world
dataset's scores put a verdict on every card: did the asset become its reference's object.

Every page is self-contained: CSS, scripts, images, videos and the GLB are inlined (data: URIs,
inline classic scripts). That is what makes the same files work from ``file://`` (where Chromium
blocks ES modules and cross-file fetches) and from MLflow's artifact view (which shows one HTML
artifact as a sandboxed ``blob:`` iframe, where relative URLs resolve to nothing). The 3D view is
Google's ``<model-viewer>`` web component (Apache-2.0), shipped in ``pipeline/gallery_static/``.

All dataset text (prompts, errors, metrics) goes through :func:`html.escape`, and JSON embedded
in a ``<script>`` block is escaped so that it cannot close the block.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from stages.toyworld.fidelity import FAITHFUL_PSNR  # the verdict's threshold lives with the scores

STATIC_DIR = Path(__file__).with_name("gallery_static")
VIEWER_SCRIPT = "model-viewer-umd.min.js"
MODEL_VIEWER_VERSION = "4.4.0"
LICENSE_FILES = ("model-viewer.LICENSE.txt", "THIRD_PARTY_NOTICES.md")
REQUIRED_COLUMNS = ("asset_id", "prompt", "status")
# Manifest columns with a field of their own in AssetRecord; the rest go to AssetRecord.details.
RECORD_COLUMNS = frozenset({"asset_id", "prompt", "status", "prompt_index", "variant", "error", "asset_dir", "files", "metrics"})
SAFE_ASSET_ID = re.compile(r"^[A-Za-z0-9._-]+$")  # asset ids become file names
# MLflow's artifact view refuses to preview files larger than this.
MLFLOW_PREVIEW_LIMIT_BYTES = 50 * 2**20
THUMBNAIL_MAX_SIDE = 256
# Turntables larger than this are not inlined into the index (the asset page always has them).
INDEX_VIDEO_MAX_BYTES = 512 * 1024

# Roles of the files in an asset directory (names from the dataset layout contract).
ROLE_FILENAMES = {
    "reference": ("reference.png",),
    "preview": ("preview.png",),
    "turntable": ("turntable.mp4", "turntable.gif"),
    "mesh": ("mesh.glb",),
    "splats": ("splats.ply",),
}
MIME_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".gif": "image/gif",
    ".mp4": "video/mp4",
    ".glb": "model/gltf-binary",
}


@dataclass(frozen=True)
class AssetRecord:
    """One asset as the gallery sees it: the latest manifest row for its asset_id."""

    asset_id: str
    prompt: str
    status: str
    prompt_index: int | None = None
    variant: int | None = None
    error: str | None = None
    asset_dir: str | None = None  # relative to the dataset root (POSIX)
    files: dict[str, str] = field(default_factory=dict)  # name -> relative path
    metrics: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # other manifest columns, shown as-is
    scores: dict[str, Any] = field(default_factory=dict)  # latest evaluation scores (scores/ shards)


class _Dataset:
    """Read access to a dataset root on any pyarrow filesystem (local path or URI such as s3://)."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        text = os.fspath(output_dir)
        if "://" in text:
            self.fs, root = pafs.FileSystem.from_uri(text)
        else:
            self.fs, root = pafs.LocalFileSystem(), str(Path(text).resolve())
        self.root = root.rstrip("/")
        self.uri = text

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative.lstrip('/')}"

    def is_file(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type == pafs.FileType.File

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_file(self.path(relative)) as handle:
            return handle.read()

    def manifest_shards(self) -> list[str]:
        """Manifest shard paths (relative), oldest first (shard names start with a timestamp)."""
        info = self.fs.get_file_info(self.path("manifest"))
        if info.type != pafs.FileType.Directory:
            raise FileNotFoundError(f"no manifest directory at {self.uri}/manifest (is this a dataset output dir?)")
        selector = pafs.FileSelector(self.path("manifest"), recursive=False)
        names = [
            PurePosixPath(entry.path).name
            for entry in self.fs.get_file_info(selector)
            if entry.type == pafs.FileType.File
            and entry.path.endswith(".parquet")
            and PurePosixPath(entry.path).name.startswith("part-")
        ]
        return [f"manifest/{name}" for name in sorted(names)]


def _parse_json_column(value: Any, column: str, where: str) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: column {column!r} is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ValueError(f"{where}: column {column!r} must be a JSON object, got {type(parsed).__name__}")
    return parsed


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def read_manifest(output_dir: str | os.PathLike) -> list[AssetRecord]:
    """Latest manifest row per asset_id: rows ordered by ``finished_at``, ties by shard name
    (``part-<timestamp>-...``) and row order, as the dataset writer orders them.

    Raises FileNotFoundError when ``<output>/manifest`` is missing and ValueError naming the
    shard and column when a required column is absent or a JSON column does not parse.
    """
    dataset = _Dataset(output_dir)
    ordered: list[tuple[str, AssetRecord]] = []
    for shard in dataset.manifest_shards():
        with dataset.fs.open_input_file(dataset.path(shard)) as handle:
            table = pq.read_table(handle)
        missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
        if missing:
            raise ValueError(f"{dataset.uri}/{shard}: manifest is missing column(s) {missing}")
        for index, row in enumerate(table.to_pylist()):
            where = f"{dataset.uri}/{shard} row {index}"
            record = AssetRecord(
                asset_id=str(row["asset_id"]),
                prompt=str(row["prompt"]),
                status=str(row["status"]),
                prompt_index=_optional_int(row.get("prompt_index")),
                variant=_optional_int(row.get("variant")),
                error=row.get("error"),
                asset_dir=row.get("asset_dir"),
                files={str(k): str(v) for k, v in _parse_json_column(row.get("files"), "files", where).items()},
                metrics=_parse_json_column(row.get("metrics"), "metrics", where),
                details={k: v for k, v in row.items() if k not in RECORD_COLUMNS},
            )
            ordered.append((str(row.get("finished_at") or ""), record))
    latest: dict[str, AssetRecord] = {}
    for _, record in sorted(ordered, key=lambda item: item[0]):  # stable: ties keep shard/row order
        latest.pop(record.asset_id, None)
        latest[record.asset_id] = record
    return list(latest.values())


SCORE_FIELDS = ("alignment", "quality", "toy_identity", "toy_reference", "toy_identity_correct",
                "toy_psnr_reference", "toy_consistency", "toy_iou")
"""Evaluation scores the gallery shows (``pipeline.evaluate`` writes them)."""


def read_scores(output_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """asset_id → its latest succeeded score row (the fields of :data:`SCORE_FIELDS` that are set)."""
    dataset = _Dataset(output_dir)
    selector = pafs.FileSelector(dataset.path("scores"), allow_not_found=True)
    rows = []
    for entry in dataset.fs.get_file_info(selector):
        name = PurePosixPath(entry.path).name
        if entry.type == pafs.FileType.File and name.startswith("part-") and name.endswith(".parquet"):
            with dataset.fs.open_input_file(entry.path) as handle:
                table = pq.read_table(handle, columns=None)
            columns = [c for c in ("asset_id", "status", "evaluated_at", *SCORE_FIELDS) if c in table.column_names]
            rows += table.select(columns).to_pylist()
    latest: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r.get("evaluated_at") or ""):
        if row.get("status") == "succeeded":
            values = {k: row[k] for k in SCORE_FIELDS if isinstance(row.get(k), (int, float)) and math.isfinite(row[k])}
            latest[str(row["asset_id"])] = values
    return latest


def _verdict_html(scores: dict[str, Any]) -> str:
    """One line a newcomer reads at a glance: did the toy-world asset become its reference's object."""
    if "toy_identity" not in scores:
        return ""
    identity = int(scores["toy_identity"])
    details = []
    if "toy_psnr_reference" in scores:
        details.append(f"{scores['toy_psnr_reference']:.1f} dB from new views")
    if "toy_consistency" in scores:
        details.append(f"views agree {scores['toy_consistency']:.0%}")
    if "toy_iou" in scores:
        details.append(f"mesh IoU {scores['toy_iou']:.2f}")
    if "toy_reference" not in scores:
        head, kind = f"became object {identity}", "neutral"
    elif not scores.get("toy_identity_correct"):
        head, kind = f"&#10007; became object {identity}; the reference shows object {int(scores['toy_reference'])}", "bad"
    elif scores.get("toy_psnr_reference", 0.0) >= FAITHFUL_PSNR:
        head, kind = f"&#10003; became its reference's object ({identity})", "ok"
    else:
        head, kind = f"&#8776; nearest to its reference's object ({identity}) but below {FAITHFUL_PSNR:.0f} dB", "weak"
    return f'<p class="verdict {kind}">{head} &middot; {html.escape(" · ".join(details))}</p>'


def _find_role_files(dataset: _Dataset, record: AssetRecord) -> dict[str, str]:
    """Relative paths of the asset's reference/preview/turntable/mesh/splats files that exist."""
    asset_dir = (record.asset_dir or f"assets/{record.asset_id}").rstrip("/")
    candidates: list[str] = []
    for value in record.files.values():  # the manifest's paths may be relative to the root or the asset dir
        candidates += [value, f"{asset_dir}/{value}"]
    # Only paths inside the dataset: no absolute paths, no "..".
    candidates = [c for c in candidates if not PurePosixPath(c).is_absolute() and ".." not in PurePosixPath(c).parts]
    found: dict[str, str] = {}
    for role, names in ROLE_FILENAMES.items():
        for name in names:
            options = [c for c in candidates if PurePosixPath(c).name == name] + [f"{asset_dir}/{name}"]
            hit = next((c for c in options if dataset.is_file(c)), None)
            if hit is not None:
                found[role] = hit
                break
    return found


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _thumbnail_uri(data: bytes, max_side: int = THUMBNAIL_MAX_SIDE) -> str:
    """Downscaled JPEG of an image as a data: URI (keeps the index small)."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image.thumbnail((max_side * 2, max_side))  # grids are wide: bound the height
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    return _data_uri(buffer.getvalue(), "image/jpeg")


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings (JSON has no NaN/Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def json_for_script(value: Any) -> str:
    """Strict JSON that is safe inside ``<script type="application/json">``: no ``<``, ``>``, ``&``, U+2028/9."""
    text = json.dumps(_json_safe(value), ensure_ascii=False, sort_keys=True, default=str, allow_nan=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def _inline_script(source: str, name: str) -> str:
    """An inline classic ``<script>`` with ``source``; refuses code that could end the block early."""
    if re.search(r"(?i)<(/?)script", source):
        raise ValueError(f"{name} contains '<script' or '</script' and cannot be inlined safely")
    source = re.sub(r"\n//# sourceMappingURL=\S*\s*$", "\n", source)  # the .map is not shipped
    return f"<script>{source}</script>"


def _static_text(name: str) -> str:
    path = STATIC_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"gallery static file missing: {path} (is the package data installed?)")
    return path.read_text(encoding="utf-8")


def _format_metric(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value, default=str)


def _metrics_table(values: dict[str, Any]) -> str:
    if not values:
        return ""
    rows = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(_format_metric(value))}</td></tr>"
        for key, value in sorted(values.items())
    )
    return f'<table class="metrics">{rows}</table>'


def _page(title: str, body: str, body_class: str, scripts: str = "") -> str:
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_static_text('gallery.css')}</style>\n</head>\n"
        f'<body class="{body_class}">\n{body}\n{scripts}\n</body>\n</html>\n'
    )


def _status_badge(status: str) -> str:
    return f'<span class="badge {html.escape(status)}">{html.escape(status)}</span>'


def _figure(caption: str, inner: str) -> str:
    return f"<figure>{inner}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _media_html(dataset: _Dataset, roles: dict[str, str], *, thumbnails: bool) -> str:
    """Reference image beside the preview grid and the turntable, all inlined."""
    parts = []
    for role in ("reference", "preview"):
        if role not in roles:
            continue
        data = dataset.read_bytes(roles[role])
        src = _thumbnail_uri(data) if thumbnails else _data_uri(data, MIME_TYPES[".png"])
        parts.append(_figure(role, f'<img class="{role}" alt="{role}" src="{src}">'))
    if "turntable" in roles:
        path = roles["turntable"]
        suffix = PurePosixPath(path).suffix.lower()
        data = dataset.read_bytes(path)
        if thumbnails and len(data) > INDEX_VIDEO_MAX_BYTES:
            parts.append(_figure("turntable", '<span class="missing">on the asset page (large)</span>'))
        elif suffix == ".gif":
            parts.append(_figure("turntable", f'<img class="turntable" alt="turntable" src="{_data_uri(data, MIME_TYPES[suffix])}">'))
        else:
            src = _data_uri(data, MIME_TYPES.get(suffix, "video/mp4"))
            parts.append(_figure("turntable", f'<video class="turntable" src="{src}" autoplay loop muted playsinline controls></video>'))
    return f'<div class="media">{"".join(parts)}</div>' if parts else ""


def _missing_note(record: AssetRecord, roles: dict[str, str]) -> str:
    if record.status != "succeeded":
        return ""
    missing = [role for role in ("reference", "preview", "turntable") if role not in roles]
    if "mesh" not in roles and "splats" not in roles:
        missing.append("mesh.glb or splats.ply")
    return f'<p class="missing">missing: {html.escape(", ".join(missing))}</p>' if missing else ""


def _error_html(record: AssetRecord) -> str:
    if not record.error and record.status == "succeeded":
        return ""
    return f'<pre class="error">{html.escape(record.error or "failed without an error message")}</pre>'


def _variant_label(record: AssetRecord) -> str:
    return "variant ?" if record.variant is None else f"variant {record.variant}"


def _asset_card(dataset: _Dataset, record: AssetRecord, roles: dict[str, str]) -> str:
    return (
        f'<article class="asset status-{html.escape(record.status)}" id="asset-{html.escape(record.asset_id)}"'
        f' data-asset-id="{html.escape(record.asset_id)}" data-status="{html.escape(record.status)}"'
        f' data-prompt="{html.escape(record.prompt)}">'
        f'<div class="asset-head"><strong>{html.escape(_variant_label(record))}</strong> {_status_badge(record.status)}'
        f' <a class="asset-link" href="assets/{html.escape(record.asset_id)}.html">3D view &amp; details</a>'
        f' <code class="muted">{html.escape(record.asset_id)}</code></div>'
        f"{_verdict_html(record.scores)}{_media_html(dataset, roles, thumbnails=True)}{_missing_note(record, roles)}"
        f"{_error_html(record)}{_metrics_table(record.metrics)}</article>"
    )


def _group_by_prompt(records: list[AssetRecord]) -> list[list[AssetRecord]]:
    """Variants of one prompt together; groups in prompt order, variants in variant order."""
    groups: dict[str, list[AssetRecord]] = {}
    for record in records:
        groups.setdefault(record.prompt, []).append(record)

    def group_key(items: list[AssetRecord]) -> tuple[int, str]:
        indices = [r.prompt_index for r in items if r.prompt_index is not None]
        return (min(indices) if indices else 2**62, items[0].prompt)

    ordered = sorted(groups.values(), key=group_key)
    return [sorted(items, key=lambda r: (r.variant if r.variant is not None else 2**62, r.asset_id)) for items in ordered]


def render_index(dataset: _Dataset, records: list[AssetRecord], roles: dict[str, dict[str, str]]) -> str:
    """HTML of ``gallery/index.html``."""
    failed = sum(r.status != "succeeded" for r in records)
    toy = [r.scores for r in records if "toy_identity_correct" in r.scores]
    toy_line = ""
    if toy:
        recovered = sum(bool(s["toy_identity_correct"]) for s in toy)
        faithful = sum(bool(s["toy_identity_correct"]) and s.get("toy_psnr_reference", 0.0) >= FAITHFUL_PSNR for s in toy)
        psnrs = [s["toy_psnr_reference"] for s in toy if "toy_psnr_reference" in s]
        mean_psnr = f"; mean {sum(psnrs) / len(psnrs):.1f} dB to it from new views" if psnrs else ""
        toy_line = (
            f'<p class="summary verdict {"ok" if faithful == len(toy) else "weak"}">Toy world: {recovered} of {len(toy)} scored '
            f"assets became their reference's object, {faithful} faithfully (&ge; {FAITHFUL_PSNR:.0f} dB){mean_psnr}.</p>"
        )
    sections = []
    for items in _group_by_prompt(records):
        cards = "".join(_asset_card(dataset, r, roles[r.asset_id]) for r in items)
        sections.append(
            f'<section class="prompt-group" data-prompt="{html.escape(items[0].prompt)}">'
            f'<h2 class="prompt">{html.escape(items[0].prompt)}</h2><div class="variants">{cards}</div></section>'
        )
    statuses = sorted({r.status for r in records} | {"succeeded", "failed"})
    options = "".join(f'<option value="{html.escape(s)}">{html.escape(s)}</option>' for s in statuses)
    summary = json_for_script(
        [
            {"asset_id": r.asset_id, "prompt": r.prompt, "variant": r.variant, "status": r.status,
             "error": r.error, "metrics": r.metrics, "scores": r.scores}
            for r in records
        ]
    )
    body = (
        '<header class="page"><h1>Dataset gallery</h1>'
        f'<p class="summary">{len(records)} assets: {len(records) - failed} succeeded, {failed} not succeeded;'
        f" {len({r.prompt for r in records})} prompts. Open an asset for its 3D view.</p>{toy_line}"
        '<div class="filters"><label>Prompt <input id="filter-text" type="search" placeholder="filter by prompt text">'
        f'</label><label>Status <select id="filter-status"><option value="">all</option>{options}</select></label>'
        '<span id="shown-count" class="muted"></span></div></header>'
        f'<main>{"".join(sections) or "<p>No assets in the manifest yet.</p>"}</main>'
        f'<script type="application/json" id="gallery-data">{summary}</script>'
    )
    return _page(f"Gallery ({len(records)} assets)", body, "index-page", _inline_script(_static_text("gallery.js"), "gallery.js"))


def render_asset_page(dataset: _Dataset, record: AssetRecord, roles: dict[str, str]) -> str:
    """HTML of ``gallery/assets/<asset_id>.html``: 3D view (if a GLB exists), media, metadata."""
    scripts = ""
    if "mesh" in roles:
        glb = _data_uri(dataset.read_bytes(roles["mesh"]), MIME_TYPES[".glb"])
        viewer = (
            f'<model-viewer id="viewer" src="{glb}" alt="3D model: {html.escape(record.prompt)}" camera-controls'
            ' touch-action="pan-y" loading="eager" reveal="auto" shadow-intensity="1" exposure="1"'
            ' interaction-prompt="none"></model-viewer>'
        )
        if "splats" in roles:  # the mesh of a splat asset is derived; the splats themselves are the asset
            viewer += (
                f'<p class="note">Mesh extracted from the Gaussian splats; the splats are in '
                f'<a href="../../{html.escape(roles["splats"])}">{html.escape(roles["splats"])}</a> (3DGS PLY).</p>'
            )
        # viewer.js registers the load listener before the component is defined, so no event is missed.
        scripts = (
            _inline_script(_static_text("viewer.js"), "viewer.js")
            + f"\n<!-- @google/model-viewer {MODEL_VIEWER_VERSION}, Apache-2.0: see ../LICENSES/ -->\n"
            + _inline_script(_static_text(VIEWER_SCRIPT), VIEWER_SCRIPT)
        )
    elif "splats" in roles:
        viewer = (
            '<p class="missing">Gaussian-splat asset without a mesh: see the preview and turntable; '
            f'the splats are in <a href="../../{html.escape(roles["splats"])}">{html.escape(roles["splats"])}</a>'
            " (relative to the dataset; open from the dataset directory).</p>"
        )
    else:
        viewer = '<p class="missing">No 3D file for this asset.</p>'
    details = {"asset_id": record.asset_id, "status": record.status, "variant": record.variant,
               "prompt_index": record.prompt_index, **record.details}
    body = (
        f'<header class="page"><p><a href="../index.html">&larr; all assets</a></p>'
        f'<h1 class="prompt">{html.escape(record.prompt)}</h1>'
        f"<p>{html.escape(_variant_label(record))} {_status_badge(record.status)}</p></header>"
        f"<main>{_verdict_html(record.scores)}{_error_html(record)}{viewer}{_media_html(dataset, roles, thumbnails=False)}"
        f"{_missing_note(record, roles)}<h2>Metrics</h2>{_metrics_table(record.metrics) or '<p class=missing>none</p>'}"
        f"{'<h2>Evaluation scores</h2>' + _metrics_table(record.scores) if record.scores else ''}"
        f"<h2>Details</h2>{_metrics_table(details)}</main>"
    )
    return _page(f"{record.prompt[:80]} ({record.asset_id})", body, "asset-page", scripts)


def _write_page(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    if len(data) > MLFLOW_PREVIEW_LIMIT_BYTES:
        warnings.warn(f"{path} is {len(data) / 2**20:.0f} MiB: MLflow's artifact view only previews up to 50 MiB")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_gallery(output_dir: str | os.PathLike, gallery_dir: str | os.PathLike | None = None) -> Path:
    """Write the gallery of the dataset at ``output_dir`` (local path or pyarrow URI such as s3://).

    Local dataset: pages go to ``<output_dir>/gallery`` (or ``gallery_dir``). Dataset on a URI:
    pages are built in ``gallery_dir`` (a new temporary directory if None) and then copied to
    ``<output_dir>/gallery``. Returns the local gallery directory (what to log to MLflow).
    """
    dataset = _Dataset(output_dir)
    scores = read_scores(output_dir)
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
        target = Path(dataset.root) / "gallery"
    (target / "assets").mkdir(parents=True, exist_ok=True)
    licenses = target / "LICENSES"
    licenses.mkdir(exist_ok=True)
    for name in LICENSE_FILES:
        shutil.copyfile(STATIC_DIR / name, licenses / name)

    current = {f"{r.asset_id}.html" for r in records}
    for stale in (target / "assets").glob("*.html"):  # pages of assets no longer in the manifest
        if stale.name not in current:
            stale.unlink()
    roles: dict[str, dict[str, str]] = {}
    for record in records:
        roles[record.asset_id] = _find_role_files(dataset, record)
        _write_page(target / "assets" / f"{record.asset_id}.html", render_asset_page(dataset, record, roles[record.asset_id]))
    _write_page(target / "index.html", render_index(dataset, records, roles))

    if remote:
        pafs.copy_files(str(target), dataset.path("gallery"), destination_filesystem=dataset.fs)
    return target


def log_gallery_to_mlflow(
    gallery_dir: str | os.PathLike, run_id: str, artifact_path: str = "gallery", tracking_uri: str | None = None
) -> None:
    """Log the gallery directory as artifacts ``<artifact_path>/...`` of the MLflow run ``run_id``.

    ``tracking_uri`` None: MLflow's current one (``mlflow.set_tracking_uri`` / ``MLFLOW_TRACKING_URI``).
    """
    from mlflow import MlflowClient  # imported here: building a gallery does not need MLflow

    gallery_dir = Path(gallery_dir)
    if not (gallery_dir / "index.html").is_file():
        raise FileNotFoundError(f"{gallery_dir} has no index.html: build the gallery first")
    MlflowClient(tracking_uri=tracking_uri).log_artifacts(run_id, str(gallery_dir), artifact_path=artifact_path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.gallery", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="dataset output directory or URI (contains manifest/ and assets/)")
    parser.add_argument("--gallery-dir", default=None, help="where to write the pages (default <output_dir>/gallery)")
    parser.add_argument("--mlflow-run-id", default=None, help="also log the gallery as artifacts of this MLflow run")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    args = parser.parse_args(argv)
    gallery = build_gallery(args.output_dir, args.gallery_dir)
    if args.mlflow_run_id:
        log_gallery_to_mlflow(gallery, args.mlflow_run_id, tracking_uri=args.tracking_uri)
    print(gallery / "index.html")


if __name__ == "__main__":
    main()
