"""Static gallery of a dataset: one page that lists every asset and opens each one in place.

``python -m pipeline.gallery OUTPUT`` (also run at the end of every dataset run) reads the dataset
layout (``manifest/part-*.parquet`` + ``assets/<asset_id>/``, and the evaluation's
``scores/part-*.parquet`` when present) and writes ``OUTPUT/gallery/``:

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
object, how close from views it never trained on) and one line over the page.

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

import argparse
import base64
import html
import json
import math
import os
import re
import shutil
import struct
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.thumbnails import thumbnail_jpeg
from stages.toyworld.fidelity import FAITHFUL_PSNR  # the verdict's threshold lives with the scores

STATIC_DIR = Path(__file__).with_name("gallery_static")
VIEWER_SCRIPT = "model-viewer-umd.min.js"
SPLAT_VIEWER_SCRIPT = "splat-viewer.js"
MODEL_VIEWER_VERSION = "4.4.0"
LICENSE_FILES = ("model-viewer.LICENSE.txt", "THIRD_PARTY_NOTICES.md")
STATIC_FILES = (VIEWER_SCRIPT, SPLAT_VIEWER_SCRIPT, *LICENSE_FILES)
REQUIRED_COLUMNS = ("asset_id", "prompt", "status")
# Manifest columns with a field of their own in AssetRecord; the rest go to AssetRecord.details.
RECORD_COLUMNS = frozenset({"asset_id", "prompt", "status", "prompt_index", "variant", "error", "asset_dir", "files", "metrics"})
SAFE_ASSET_ID = re.compile(r"^[A-Za-z0-9._-]+$")  # asset ids become file names
# MLflow's artifact view refuses to preview files larger than this.
MLFLOW_PREVIEW_LIMIT_BYTES = 50 * 2**20
PAGE_CARDS = 48
"""Cards per index page (prompt groups are not split across pages unless one alone is larger)."""
MODEL_VIEW_MAX_BYTES = 64 * 2**20
"""Largest GLB / splat data wrapped into ``models/`` for the 3D view (larger: download link only)."""
SPLAT_RECORD = struct.Struct("<3f3f4B4B")
"""One Gaussian in ``models/<id>.splat.js``: position, scale (linear), RGBA, rotation w x y z (uint8)."""
SH_C0 = 0.28209479177387814

# Roles of the files in an asset directory (names from the dataset layout contract).
ROLE_FILENAMES = {
    "reference": ("reference.png",),
    "preview": ("preview.png",),
    "turntable": ("turntable.mp4", "turntable.gif"),
    "mesh": ("mesh.glb",),
    "mesh_obj": ("mesh.obj",),
    "mesh_mtl": ("mesh.mtl",),
    "splats": ("splats.ply",),
}
DOWNLOADS = (("mesh", "GLB mesh"), ("mesh_obj", "OBJ mesh"), ("mesh_mtl", "OBJ material"), ("splats", "PLY splats (3DGS)"))


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
        try:
            with dataset.fs.open_input_file(dataset.path(shard)) as handle:
                table = pq.read_table(handle)
        except pa.ArrowInvalid as exc:
            raise ValueError(f"{dataset.uri}/{shard}: manifest shard does not read ({exc}); "
                             "build_gallery and pipeline.run set such shards aside") from None
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


def verdict(scores: dict[str, Any]) -> dict[str, str] | None:
    """One line a newcomer reads at a glance: did the toy-world asset become its reference's
    object. ``{"kind": ok|weak|bad|neutral, "text": ...}``, or None without toy-world scores."""
    if "toy_identity" not in scores:
        return None
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
        head, kind = f"\u2717 became object {identity}; the reference shows object {int(scores['toy_reference'])}", "bad"
    elif scores.get("toy_psnr_reference", 0.0) >= FAITHFUL_PSNR:
        head, kind = f"\u2713 became its reference's object ({identity})", "ok"
    else:
        head, kind = f"\u2248 nearest to its reference's object ({identity}) but below {FAITHFUL_PSNR:.0f} dB", "weak"
    return {"kind": kind, "text": " \u00b7 ".join([head, *details])}


def toy_summary(records: list[AssetRecord]) -> str:
    """The page's one line over the toy-world verdicts (HTML, escaped), or ''."""
    toy = [r.scores for r in records if "toy_identity_correct" in r.scores]
    if not toy:
        return ""
    recovered = sum(bool(s["toy_identity_correct"]) for s in toy)
    faithful = sum(bool(s["toy_identity_correct"]) and s.get("toy_psnr_reference", 0.0) >= FAITHFUL_PSNR for s in toy)
    psnrs = [s["toy_psnr_reference"] for s in toy if "toy_psnr_reference" in s]
    mean_psnr = f"; mean {sum(psnrs) / len(psnrs):.1f} dB to it from new views" if psnrs else ""
    return (
        f'<p class="summary verdict {"ok" if faithful == len(toy) else "weak"}">Toy world: {recovered} of {len(toy)} scored '
        f"assets became their reference's object, {faithful} faithfully (&ge; {FAITHFUL_PSNR:.0f} dB){mean_psnr}.</p>"
    )


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




_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def visible_controls(text: str) -> str:
    """Control characters as visible symbols: C0 and DEL as their Unicode control pictures
    (NUL → ␀, ESC → ␛, DEL → ␡), C1 as ``\\x85``; tab and newlines stay."""

    def picture(match: re.Match[str]) -> str:
        code = ord(match.group(0))
        if code < 0x20:
            return chr(0x2400 + code)
        return "\u2421" if code == 0x7F else f"\\x{code:02x}"

    return _CONTROL.sub(picture, text)


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
    """Strict JSON that is safe inside ``<script type="application/json">``: no ``<``, ``>``, ``&``, U+2028/9, no raw control character."""
    text = json.dumps(_json_safe(value), ensure_ascii=False, sort_keys=True, default=str, allow_nan=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    # JSON escapes C0 controls itself; DEL and C1 controls would stay raw in the page
    return re.sub(r"[\x7f-\x9f]", lambda m: f"\\u{ord(m.group(0)):04x}", text)


def _static_text(name: str) -> str:
    path = STATIC_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"gallery static file missing: {path} (is the package data installed?)")
    return path.read_text(encoding="utf-8")


def _inline_script(source: str, name: str) -> str:
    """An inline classic ``<script>`` with ``source``; refuses code that could end the block early."""
    if re.search(r"(?i)<(/?)script", source):
        raise ValueError(f"{name} contains '<script' or '</script' and cannot be inlined safely")
    return f"<script>{source}</script>"


# ------------------------------------------------------------------ derived files (thumbs, models)
class _Outputs:
    """The gallery directory's derived files: written when missing or older than their source,
    and the ones no asset uses any more removed at the end."""

    def __init__(self, dataset: _Dataset, target: Path) -> None:
        self.dataset, self.target = dataset, target
        self.used: set[Path] = set()

    def fresh(self, relative: str, source: str) -> tuple[Path, bool]:
        """(target path, whether it is up to date with the dataset file ``source``)."""
        path = self.target / relative
        self.used.add(path)
        if not path.is_file():
            return path, False
        mtime = self.dataset.fs.get_file_info(self.dataset.path(source)).mtime
        return path, mtime is not None and mtime.timestamp() <= path.stat().st_mtime

    def write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def remove_unused(self, folders: tuple[str, ...]) -> None:
        for folder in folders:
            for path in (self.target / folder).glob("*"):
                if path.is_file() and path not in self.used:
                    path.unlink()


def _thumbnail(outputs: _Outputs, asset_id: str, role: str, source: str) -> str | None:
    relative = f"thumbs/{asset_id}-{role}.jpg"
    path, fresh = outputs.fresh(relative, source)
    if not fresh:
        try:
            outputs.write(path, thumbnail_jpeg(outputs.dataset.read_bytes(source)))
        except (OSError, ValueError) as error:  # a damaged image: the card says so, the gallery goes on
            warnings.warn(f"{source}: no thumbnail ({type(error).__name__}: {error})")
            return None
    return relative


def splat_bytes(ply: Path) -> bytes:
    """A 3DGS PLY as :data:`SPLAT_RECORD` records (view order: largest opacity × volume first)."""
    import numpy as np

    from stages.export.ply import load_splats_ply

    data = load_splats_ply(ply)
    means = data["means"].numpy().astype("<f4")
    scales = np.exp(data["scales"].numpy()).astype("<f4")
    alpha = 1.0 / (1.0 + np.exp(-data["opacities"].numpy()))
    rgb = np.clip(0.5 + SH_C0 * data["f_dc"].numpy(), 0.0, 1.0)
    quats = data["quats"].numpy()
    quats = quats / np.maximum(np.linalg.norm(quats, axis=1, keepdims=True), 1e-12)
    order = np.argsort(-(alpha * scales.prod(axis=1)), kind="stable")
    records = np.empty(len(means), dtype=[("pos", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4), ("rot", "u1", 4)])
    records["pos"], records["scale"] = means, scales
    records["rgba"] = np.round(np.concatenate([rgb, alpha[:, None]], axis=1) * 255).astype("u1")
    records["rot"] = np.clip(np.round(quats * 128 + 128), 0, 255).astype("u1")
    return records[order].tobytes()


def _model_script(outputs: _Outputs, asset_id: str, kind: str, source: str) -> tuple[str | None, str]:
    """``models/<id>.<kind>.js`` (``kind`` glb | splat) or None with the reason."""
    relative = f"models/{asset_id}.{kind}.js"
    path, fresh = outputs.fresh(relative, source)
    if fresh:
        return relative, ""
    size = outputs.dataset.fs.get_file_info(outputs.dataset.path(source)).size or 0
    if size > MODEL_VIEW_MAX_BYTES:
        outputs.used.discard(path)
        return None, f"{PurePosixPath(source).name} is {size / 2**20:.0f} MiB, above the gallery's {MODEL_VIEW_MAX_BYTES // 2**20} MiB 3D-view limit: download it"
    try:
        if kind == "glb":
            payload = outputs.dataset.read_bytes(source)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / "splats.ply"
                local.write_bytes(outputs.dataset.read_bytes(source))
                payload = splat_bytes(local)
    except (OSError, ValueError) as error:
        outputs.used.discard(path)
        return None, f"{PurePosixPath(source).name} cannot be read ({type(error).__name__})"
    script = f"window.galleryModel({json.dumps(asset_id)},{json.dumps(kind)},\"{base64.b64encode(payload).decode('ascii')}\");\n"
    outputs.write(path, script.encode("ascii"))
    return relative, ""


def _camera(dataset: _Dataset, asset_dir: str) -> dict[str, float]:
    """The asset's evaluation camera (elevation, distance, fovy) from its ``method.yaml``."""
    camera = {"elevation": 15.0, "distance": 3.0, "fovy": 40.0}
    try:
        from omegaconf import OmegaConf

        cameras = OmegaConf.create(dataset.read_bytes(f"{asset_dir}/method.yaml").decode("utf-8")).get("cameras", {})
        camera.update(elevation=float(cameras.get("eval_elevation", 15.0)), distance=float(cameras.get("eval_distance", 3.0)), fovy=float(cameras.get("eval_fovy", 40.0)))
    except Exception:  # noqa: BLE001 - no or unreadable method.yaml: the defaults of CameraConfig
        pass
    return camera


# ------------------------------------------------------------------ the page
def _group_order(records: list[AssetRecord]) -> list[AssetRecord]:
    """Variants of one prompt together; groups in prompt order, variants in variant order."""
    groups: dict[str, list[AssetRecord]] = {}
    for record in records:
        groups.setdefault(record.prompt, []).append(record)

    def group_key(items: list[AssetRecord]) -> tuple[int, str]:
        indices = [r.prompt_index for r in items if r.prompt_index is not None]
        return (min(indices) if indices else 2**62, items[0].prompt)

    ordered = sorted(groups.values(), key=group_key)
    return [r for items in ordered for r in sorted(items, key=lambda r: (r.variant if r.variant is not None else 2**62, r.asset_id))]


def _asset_item(dataset: _Dataset, outputs: _Outputs, record: AssetRecord) -> dict[str, Any]:
    """What the page's script knows about one asset (paths relative to the dataset root)."""
    roles = _find_role_files(dataset, record)
    thumbs = {role: _thumbnail(outputs, record.asset_id, role, roles[role]) for role in ("reference", "preview") if role in roles}
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
        script, why = _model_script(outputs, record.asset_id, kind, source)
        item["model"] = {"kind": kind, "script": script, "note": why}
        if kind == "splat":
            item["model"]["camera"] = _camera(dataset, (record.asset_dir or f"assets/{record.asset_id}").rstrip("/"))
            if "mesh" in roles:  # the extracted mesh of a splat asset: its own 3D view too
                mesh_script, mesh_why = _model_script(outputs, record.asset_id, "glb", roles["mesh"])
                item["model"]["mesh_script"], item["model"]["mesh_note"] = mesh_script, mesh_why
    return item


def render_index(items: list[dict[str, Any]], dataset_base: str, *, page_cards: int = PAGE_CARDS, summary: str = "") -> str:
    """HTML of ``gallery/index.html`` for the asset ``items`` (:func:`_asset_item`, in page order);
    ``summary``: extra HTML under the header's counts (:func:`toy_summary`)."""
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
        f"{_inline_script(_static_text('gallery.js'), 'gallery.js')}\n"
        "</body>\n</html>\n"
    )


def _write_page(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    if len(data) > MLFLOW_PREVIEW_LIMIT_BYTES:
        warnings.warn(f"{path} is {len(data) / 2**20:.0f} MiB: MLflow's artifact view only previews up to 50 MiB")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_gallery(output_dir: str | os.PathLike, gallery_dir: str | os.PathLike | None = None) -> Path:
    """Write the gallery of the dataset at ``output_dir`` (local path or pyarrow URI such as s3://).

    Local dataset: written to ``<output_dir>/gallery`` (or ``gallery_dir``). Dataset on a URI:
    built in ``gallery_dir`` (a new temporary directory if None), then copied to
    ``<output_dir>/gallery``. Thumbnails and model files are rewritten only when their source
    changed. Returns the local gallery directory.
    """
    dataset = _Dataset(output_dir)
    _repair(output_dir)
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
    target.mkdir(parents=True, exist_ok=True)
    static = target / "static"
    static.mkdir(exist_ok=True)
    for name in STATIC_FILES:
        shutil.copyfile(STATIC_DIR / name, static / name)
    for old in ("assets", "LICENSES"):  # the per-asset pages of earlier galleries
        shutil.rmtree(target / old, ignore_errors=True)

    outputs = _Outputs(dataset, target)
    items = [_asset_item(dataset, outputs, record) for record in _group_order(records)]
    outputs.remove_unused(("thumbs", "models"))
    if remote or gallery_dir is None:
        base = ".."
    else:
        base = Path(os.path.relpath(dataset.root, target.resolve())).as_posix()
    _write_page(target / "index.html", render_index(items, base, summary=toy_summary(records)))
    if remote:
        pafs.copy_files(str(target), dataset.path("gallery"), destination_filesystem=dataset.fs)
    return target


def _repair(output_dir: str | os.PathLike) -> None:
    """Set aside manifest shards that do not read and rebuild their committed rows (one line each)."""
    import sys

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


EXAMPLES = """examples:
  python -m pipeline.gallery outputs/quickstart                 # writes outputs/quickstart/gallery/index.html
  python -m pipeline.gallery s3://bucket/dataset --gallery-dir /tmp/g
  python -m pipeline.gallery outputs/quickstart --mlflow-run-id <parent run id> \\
      --tracking-uri sqlite:///outputs/quickstart/mlflow.db     # also log it under that MLflow run

Open the printed index.html in a browser (file:// works), or serve the dataset directory:
  python -m http.server --directory outputs/quickstart 8000      # then http://127.0.0.1:8000/gallery/
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.gallery", description=__doc__.splitlines()[0], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output_dir", help="dataset output directory or URI (contains manifest/ and assets/)")
    parser.add_argument("--gallery-dir", default=None, help="where to write the gallery (default <output_dir>/gallery)")
    parser.add_argument("--mlflow-run-id", default=None, help="also log the gallery's index under this MLflow run")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    args = parser.parse_args(argv)
    gallery = build_gallery(args.output_dir, args.gallery_dir)
    if args.mlflow_run_id:
        log_gallery_to_mlflow(gallery, args.mlflow_run_id, tracking_uri=args.tracking_uri)
    print(gallery / "index.html")


if __name__ == "__main__":
    main()
