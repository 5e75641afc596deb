"""Reading input pictures (every format, EXIF orientation, one-line errors) and the no-object checks."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from it3d.core.errors import It3dError
from it3d.core.image import object_warnings, read_image, read_photo
from it3d.preprocess.mask import NoObjectError, SamMaskEstimator, blank_photo


def save(tmp_path, name, im, **kw):
    path = tmp_path / name
    im.save(path, **kw)
    return str(path)


def test_sixteen_bit_png_keeps_its_range(tmp_path):
    arr = np.array([[0, 1000], [32768, 65535]], np.uint16).repeat(8, 0).repeat(8, 1)
    path = save(tmp_path, "d.png", Image.fromarray(arr))
    got = read_image(path)
    assert got.shape == (16, 16, 1) and got.dtype == np.float32
    assert np.allclose(got[::8, ::8, 0], arr[::8, ::8] / 65535.0)
    rgb, alpha = read_photo(path)
    assert alpha is None and rgb[8, 0].tolist() == [128, 128, 128]  # 32768 / 65535 * 255 = 127.5 -> 128


def test_palette_with_transparency_gives_alpha(tmp_path):
    idx = np.zeros((16, 16), np.uint8)
    idx[4:12, 4:12] = 1
    pal = Image.fromarray(idx, mode="L").convert("P")
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    path = save(tmp_path, "p.png", pal, transparency=0)
    arr = read_image(path)
    assert arr.shape == (16, 16, 4)
    assert np.allclose(arr[8, 8], [10 / 255, 200 / 255, 30 / 255, 1.0]) and arr[0, 0, 3] == 0.0
    # without transparency a palette image is plain RGB (not its palette indices)
    path = save(tmp_path, "q.png", pal)
    assert np.allclose(read_image(path)[8, 8], [10 / 255, 200 / 255, 30 / 255])


@pytest.mark.parametrize("mode,channels", [("L", 1), ("LA", 4), ("1", 1), ("CMYK", 3), ("RGBA", 4)])
def test_modes(tmp_path, mode, channels):
    base = Image.fromarray(np.full((16, 16, 3), (200, 40, 90), np.uint8))
    im = base.convert(mode)
    path = save(tmp_path, "x.tif" if mode == "CMYK" else "x.png", im)
    arr = read_image(path)
    assert arr.shape == (16, 16, channels) and arr.max() <= 1.0
    if mode == "CMYK":
        assert np.abs(arr[0, 0] * 255 - (200, 40, 90)).max() <= 2


def test_exif_orientation_is_applied(tmp_path):
    up = np.zeros((20, 10, 3), np.uint8)
    up[:10] = (255, 0, 0)  # upright: red on top, 10 wide x 20 tall
    stored = Image.fromarray(up).transpose(Image.Transpose.ROTATE_90)  # the file holds it turned: 20 x 10
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    path = save(tmp_path, "e.jpg", stored, exif=exif, quality=100)
    assert Image.open(path).size == (20, 10)
    arr = read_image(path)
    assert arr.shape == (20, 10, 3)
    assert arr[2, 5, 0] > 0.9 and arr[17, 5, 0] < 0.1  # red on top, as a viewer shows it
    assert np.allclose(arr, np.asarray(ImageOps.exif_transpose(Image.open(path))) / 255.0)


@pytest.mark.parametrize("make,expected", [
    (lambda d: (d / "missing.png"), "image not found: {p}"),
    (lambda d: d, "{p} is a directory, not an image file"),
    (lambda d: (d / "t.png").write_text("hello") and d / "t.png", "cannot read image {p}: not a readable picture"),
])
def test_unreadable_inputs_one_line(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(It3dError) as e:
        read_photo(str(path))
    assert str(e.value).startswith(expected.format(p=path)) and "\n" not in str(e.value)


def test_tiny_photo_is_refused(tmp_path):
    path = save(tmp_path, "s.png", Image.new("RGB", (1, 1)))
    with pytest.raises(It3dError, match=r"s.png is 1x1 pixels: too small to hold an object \(at least 16x16"):
        read_photo(path)


def test_object_warnings(caplog):
    m = np.zeros((100, 100))
    m[40:60, 40:60] = 1  # 4 %: fine
    with caplog.at_level(logging.WARNING, logger="it3d"):
        object_warnings(m, "a.png")
    assert not caplog.records
    small = np.zeros((100, 100))
    small[50:55, 50:55] = 1  # 0.25 %
    edge = np.zeros((100, 100))
    edge[0:30, 60:100] = 1  # touches the top and the right edges
    with caplog.at_level(logging.WARNING, logger="it3d"):
        object_warnings(small, "b.png")
        object_warnings(edge, "c.png")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0].startswith("the object in b.png covers only 0.25% of the photo (5 px across)")
    assert msgs[1].startswith("the object in c.png touches the top and right edges of the photo")
    with pytest.raises(It3dError, match="the foreground mask of d.png is empty"):
        object_warnings(np.zeros((8, 8)), "d.png")


def test_blank_photo():
    white = np.full((64, 64, 3), 255, np.uint8)
    assert blank_photo(white) == "white"
    assert blank_photo(np.zeros((64, 64, 3), np.uint8)) == "black"
    noisy = np.clip(np.full((64, 64, 3), 128) + np.random.default_rng(0).integers(-8, 9, (64, 64, 3)), 0, 255)
    assert blank_photo(noisy.astype(np.uint8)) == "rgb(128, 128, 128)"  # JPEG-like noise is still blank
    tiny = white.copy()
    tiny[30:34, 30:34] = 0  # 16 px of 4096 = 0.4 %: an object, however small
    assert blank_photo(tiny) is None


class _FakeSam:
    """SAM's three candidates with the given areas (fractions of the image) and scores."""

    def __init__(self, areas, scores):
        self.areas, self.scores = areas, scores

    def segment(self, image, boxes=None, points=None):
        h, w = image.shape[1:3]
        masks = torch.zeros(len(self.areas), h, w, dtype=torch.bool)
        for i, a in enumerate(self.areas):
            side = int(round((a * h * w) ** 0.5))
            t = (h - side) // 2
            masks[i, t:t + side, t:t + side] = True
        return masks, torch.tensor(self.scores)


def _estimator(areas, scores, **cfg):
    est = SamMaskEstimator(cfg, device="cpu", dtype="fp32")
    est.loaded = lambda: _FakeSam(areas, scores)
    return est


def test_sam_mask_no_object():
    image = torch.rand(1, 100, 100, 3)
    with pytest.raises(NoObjectError, match=r"candidates cover 0\.0%, 96\.0%, 98\.0% of the photo, none between "
                                            r"min_area 0\.1% and max_area 90%"):
        _estimator([0.0004, 0.9604, 0.9801], [0.9, 0.8, 0.7])(image)  # 2x2, 98x98 and 99x99 px of 100x100
    # the best-scored candidate with a plausible area wins, not the best score overall
    mask = _estimator([0.95, 0.25, 0.36], [0.99, 0.5, 0.6])(image)
    assert mask.shape == (1, 100, 100, 1) and float(mask.mean()) == pytest.approx(0.36, abs=0.01)
