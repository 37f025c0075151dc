"""Preview grids and reference images as PNG files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from stages.atomic import atomic_write
from stages.export.video import frames_to_uint8


def image_grid(images: Tensor, columns: int) -> Image.Image:
    """(N, 3, H, W) in [0, 1] → one RGB image with ``columns`` views per row (row-major)."""
    array = frames_to_uint8(images)
    n, h, w, _ = array.shape
    rows = -(-n // columns)
    grid = np.full((rows * h, columns * w, 3), 255, dtype=np.uint8)
    for i, image in enumerate(array):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    return Image.fromarray(grid, mode="RGB")


def save_png(image: Image.Image, path: Path) -> Path:
    """Save ``image`` as PNG (:func:`~stages.atomic.atomic_write`)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def as_rgb_image(reference: Any, name: str = "reference") -> Image.Image:
    """A PIL image / path / (H, W, 3) uint8 array as an RGB ``PIL.Image``.

    Accepts 1-channel (L), RGB and RGBA (alpha composited on white). Raises ``ValueError``
    naming the file (or ``name``) when it is missing, not an image, or has another channel
    layout (e.g. 2-channel grey + alpha arrays).
    """
    if isinstance(reference, (str, os.PathLike)):
        path = Path(reference)
        if not path.is_file():
            raise ValueError(f"reference image {path} does not exist")
        try:
            with Image.open(path) as opened:
                opened.load()
                return as_rgb_image(opened.copy(), name=str(path))
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"reference image {path} is not a readable image ({error})") from error
    if isinstance(reference, np.ndarray):
        array = reference
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ValueError(f"{name}: expected an (H, W, 1|3|4) image, got array of shape {reference.shape}")
        if array.dtype != np.uint8:
            raise ValueError(f"{name}: expected a uint8 image array, got {array.dtype}")
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[2]]
        return as_rgb_image(Image.fromarray(array[..., 0] if mode == "L" else array, mode=mode), name=name)
    if not isinstance(reference, Image.Image):
        raise ValueError(f"{name}: expected a PIL image, a path or an array, got {type(reference).__name__}")
    if reference.mode in ("RGBA", "LA", "PA") or (reference.mode == "P" and "transparency" in reference.info):
        if reference.mode == "LA":
            raise ValueError(f"{name}: 2-channel (grey + alpha) images are not supported; save it as RGB or RGBA")
        rgba = reference.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if reference.mode in ("RGB", "L", "P", "I;16", "I", "F", "CMYK", "YCbCr"):
        return reference.convert("RGB")
    raise ValueError(f"{name}: unsupported image mode {reference.mode!r} ({len(reference.getbands())} channels)")
