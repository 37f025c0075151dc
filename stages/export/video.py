"""Turntable videos: MP4 through imageio-ffmpeg, GIF when ffmpeg is unavailable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from stages.atomic import atomic_write


def frames_to_uint8(frames: Tensor) -> np.ndarray:
    """(N, 3, H, W) floats in [0, 1] → (N, H, W, 3) uint8."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be (N, 3, H, W), got {tuple(frames.shape)}")
    array = (frames.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def ffmpeg_available() -> bool:
    """Whether imageio-ffmpeg can find an ffmpeg binary."""
    try:
        import imageio_ffmpeg

        return Path(imageio_ffmpeg.get_ffmpeg_exe()).exists()
    except Exception:  # noqa: BLE001 - any failure means "no ffmpeg"
        return False


def write_video(frames: Tensor, out_dir: Path, stem: str = "turntable", fps: int = 20, video_format: str = "mp4") -> Path:
    """Write ``frames`` (N, 3, H, W) as ``<stem>.mp4`` (H.264, yuv420p) or ``<stem>.gif``.

    MP4 falls back to GIF when ffmpeg is missing or fails. The file is written under a
    temporary name and renamed, so a reader never sees a partial video. Returns its path.
    """
    import imageio.v2 as imageio

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = frames_to_uint8(frames)
    if video_format == "mp4" and ffmpeg_available():
        # H.264 with yuv420p needs even sizes; macro_block_size=2 pads at most one pixel
        path = out_dir / f"{stem}.mp4"
        try:
            with atomic_write(path) as tmp, imageio.get_writer(
                tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                macro_block_size=2, ffmpeg_log_level="error", output_params=["-crf", "18"],
            ) as writer:
                for image in images:
                    writer.append_data(image)
            return path
        except Exception:  # noqa: BLE001 - fall back to GIF below
            pass
    elif video_format not in ("mp4", "gif"):
        raise ValueError(f"export.video_format must be 'mp4' or 'gif', got {video_format!r}")
    path = out_dir / f"{stem}.gif"
    with atomic_write(path) as tmp:
        imageio.mimsave(tmp, list(images), format="GIF", duration=1000.0 / fps, loop=0)
    return path
