"""Small JPEG thumbnails of an asset's images: the gallery's index cards and its MLflow run's picture."""

from __future__ import annotations

import io

from PIL import Image

THUMBNAIL_MAX_SIDE = 256
"""Height bound of a thumbnail (preview grids are wide: the width may reach twice this)."""


def thumbnail_jpeg(data: bytes, max_side: int = THUMBNAIL_MAX_SIDE, quality: int = 82) -> bytes:
    """A downscaled RGB JPEG of the image ``data`` (PNG/JPEG/GIF: the first frame)."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image.thumbnail((max_side * 2, max_side))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()
