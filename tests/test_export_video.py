"""Turntable videos and preview grids, read back with independent readers (imageio, PIL)."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from stages.export import video
from stages.export.preview import as_rgb_image, image_grid, save_png


def _frames(n=6, size=(3, 18, 22)):
    frames = torch.zeros(n, *size)
    for i in range(n):
        frames[i, 0] = i / (n - 1)  # red ramps over time
    return frames


def test_mp4_has_every_frame_at_its_size(tmp_path):
    path = video.write_video(_frames(), tmp_path, fps=10)
    assert path.name == "turntable.mp4"
    frames = iio.imread(path, plugin="pyav") if _has_pyav() else np.stack(list(iio.imiter(path)))
    assert frames.shape[:3] == (6, 18, 22)
    red = frames[..., 0].reshape(6, -1).mean(axis=1)
    assert red[0] < 30 and red[-1] > 225 and np.all(np.diff(red) > 0)
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers


def _has_pyav():
    try:
        import av  # noqa: F401
        return True
    except ImportError:
        return False


def test_gif_fallback_without_ffmpeg(tmp_path, monkeypatch):
    monkeypatch.setattr(video, "ffmpeg_available", lambda: False)
    path = video.write_video(_frames(4), tmp_path, fps=10)
    assert path.name == "turntable.gif"
    frames = iio.imread(path, index=None)
    assert frames.shape[:3] == (4, 18, 22)
    with Image.open(path) as gif:
        assert gif.n_frames == 4


def test_bad_frames_and_format_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="frames"):
        video.write_video(torch.zeros(2, 4, 8, 8), tmp_path)
    with pytest.raises(ValueError, match="video_format"):
        video.write_video(_frames(2), tmp_path, video_format="avi")


def test_grid_places_views_row_major(tmp_path):
    views = torch.zeros(6, 3, 5, 7)
    views[4, 1] = 1.0  # fifth view green: row 1, column 0 with 4 columns
    grid = image_grid(views, columns=4)
    path = save_png(grid, tmp_path / "preview.png")
    with Image.open(path) as image:
        array = np.asarray(image)
        assert image.mode == "RGB" and image.size == (28, 10)
    assert (array[5:10, 0:7, 1] == 255).all() and (array[0:5, :, 1] == 0).all()
    assert (array[5:10, 14:28] == 255).all()  # empty cells are white


def test_reference_inputs(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert as_rgb_image(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent → white
    path = tmp_path / "ref.png"
    Image.new("L", (4, 4), 128).save(path)
    assert as_rgb_image(path).mode == "RGB"
    assert as_rgb_image(np.zeros((4, 4, 3), np.uint8)).size == (4, 4)


@pytest.mark.parametrize("kind", ["missing", "not_image", "two_channel_png", "two_channel_array"])
def test_bad_reference_names_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    if kind == "not_image":
        path.write_text("hello")
    elif kind == "two_channel_png":
        Image.new("LA", (4, 4)).save(path)
    if kind == "two_channel_array":
        with pytest.raises(ValueError, match="reference"):
            as_rgb_image(np.zeros((4, 4, 2), np.uint8))
        return
    with pytest.raises(ValueError, match=path.name):
        as_rgb_image(path)
