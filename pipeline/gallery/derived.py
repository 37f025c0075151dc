"""The gallery's derived files: ``thumbs/`` (small JPEGs of the reference and preview) and
``models/`` (each GLB, or the splats at 32 bytes per Gaussian, wrapped in a classic script because
browsers refuse ``fetch`` on ``file://``). Rewritten only when their source changed; the ones no
asset uses any more are removed."""

from __future__ import annotations

import base64
import json
import struct
import tempfile
import warnings
from pathlib import Path, PurePosixPath

from pipeline.gallery.records import GalleryDataset
from pipeline.thumbnails import thumbnail_jpeg
from stages.asset_layout import METHOD_FILE, SPLATS_FILE
from stages.atomic import atomic_write

MODEL_VIEW_MAX_BYTES = 64 * 2**20
"""Largest GLB / splat data wrapped into ``models/`` for the 3D view (larger: download link only)."""
SPLAT_RECORD = struct.Struct("<3f3f4B4B")
"""One Gaussian in ``models/<id>.splat.js``: position, scale (linear), RGBA, rotation w x y z (uint8)."""
SH_C0 = 0.28209479177387814


class DerivedFiles:
    """The gallery directory's derived files: written when missing or older than their source,
    and the ones no asset uses any more removed at the end."""

    def __init__(self, dataset: GalleryDataset, target: Path) -> None:
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
        with atomic_write(path) as tmp:
            tmp.write_bytes(data)

    def remove_unused(self, folders: tuple[str, ...]) -> None:
        for folder in folders:
            for path in (self.target / folder).glob("*"):
                if path.is_file() and path not in self.used:
                    path.unlink()


def thumbnail(outputs: DerivedFiles, asset_id: str, role: str, source: str) -> str | None:
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


def model_script(outputs: DerivedFiles, asset_id: str, kind: str, source: str) -> tuple[str | None, str]:
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
                local = Path(tmp) / SPLATS_FILE
                local.write_bytes(outputs.dataset.read_bytes(source))
                payload = splat_bytes(local)
    except (OSError, ValueError) as error:
        outputs.used.discard(path)
        return None, f"{PurePosixPath(source).name} cannot be read ({type(error).__name__})"
    script = f"window.galleryModel({json.dumps(asset_id)},{json.dumps(kind)},\"{base64.b64encode(payload).decode('ascii')}\");\n"
    outputs.write(path, script.encode("ascii"))
    return relative, ""


def camera(dataset: GalleryDataset, asset_dir: str) -> dict[str, float]:
    """The asset's evaluation camera (elevation, distance, fovy) from its ``method.yaml``."""
    camera = {"elevation": 15.0, "distance": 3.0, "fovy": 40.0}
    try:
        from omegaconf import OmegaConf

        cameras = OmegaConf.create(dataset.read_bytes(f"{asset_dir}/{METHOD_FILE}").decode("utf-8")).get("cameras", {})
        camera.update(elevation=float(cameras.get("eval_elevation", 15.0)), distance=float(cameras.get("eval_distance", 3.0)), fovy=float(cameras.get("eval_fovy", 40.0)))
    except Exception:  # noqa: BLE001 - no or unreadable method.yaml: the defaults of CameraConfig
        pass
    return camera
