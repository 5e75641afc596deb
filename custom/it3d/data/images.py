"""Reading input pictures: every format Pillow reads, with one-line errors.

* EXIF orientation is applied (a phone's portrait JPEG comes out upright);
* grayscale, palette (with or without transparency), CMYK / YCbCr / LAB JPEGs, 16-bit PNGs, WebP,
  ``LA`` / ``PA`` are turned into 1, 3 or 4 channels of float32 in [0, 1] (16-bit: / 65535);
* a missing file, a folder, a file Pillow cannot decode, and a photo too small to hold an object
  each stop with one line naming the file.

:func:`object_warnings` logs the framing warnings about a foreground mask (a tiny object, an
object cut by the photo's edge); an empty mask is an error.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

import numpy as np

from ..core.errors import It3dError

log = logging.getLogger("it3d")
MIN_SIDE = 16  # a photo smaller than this cannot hold an object worth reconstructing
TINY_OBJECT = 0.01  # below this fraction of the photo the object is enlarged a lot: warn
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def open_image(path: str):
    """The decoded Pillow image of ``path``, upright (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    path = os.fspath(path)
    if os.path.isdir(path):
        raise It3dError(f"{path} is a directory, not an image file")
    if not os.path.isfile(path):
        raise It3dError(f"image not found: {path}")
    try:
        im = Image.open(path)
        im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise It3dError(f"cannot read image {path}: not a readable picture ({why})") from None
    try:
        upright = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block: the pixels are still good
        upright = None
    return upright if upright is not None else im


def image_array(im) -> np.ndarray:
    """A Pillow image -> H W C float32 in [0, 1] with C = 1 (grey), 3 (colour) or 4 (with alpha)."""
    mode = im.mode
    if mode in SIXTEEN_BIT:
        arr = np.asarray(im).astype(np.float32) / 65535.0
    elif mode == "F":
        arr = np.asarray(im).astype(np.float32)
    else:
        if mode == "1":
            im = im.convert("L")
        elif mode in ("LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
        elif mode not in ("L", "RGB", "RGBA"):  # P, CMYK, YCbCr, LAB, HSV, RGBX, ...
            im = im.convert("RGB")
        arr = np.asarray(im).astype(np.float32) / 255.0
    return arr[..., None] if arr.ndim == 2 else arr


def read_image(path: str) -> np.ndarray:
    """H W C float32 in [0, 1] (any picture format, see :func:`image_array`) or the raw array of a ``.npy``."""
    path = os.fspath(path)
    if path.endswith(".npy"):
        if not os.path.isfile(path):
            raise It3dError(f"image not found: {path}")
        arr = np.load(path).astype(np.float32)
        return arr[..., None] if arr.ndim == 2 else arr
    return image_array(open_image(path))


def check_photo_size(shape: Tuple[int, ...], path: str) -> None:
    h, w = shape[:2]
    if min(h, w) < MIN_SIDE:
        raise It3dError(f"{path} is {w}x{h} pixels: too small to hold an object (at least "
                        f"{MIN_SIDE}x{MIN_SIDE} needed)")


def read_photo(path: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The input photo as H W 3 uint8 and, when it has a non-trivial alpha channel, H W float alpha."""
    arr = read_image(path)
    check_photo_size(arr.shape, path)
    rgb = np.repeat(arr, 3, -1) if arr.shape[-1] == 1 else arr[..., :3]
    alpha = arr[..., 3] if arr.shape[-1] == 4 else None
    if alpha is not None and alpha.min() >= 1.0:
        alpha = None
    return (np.clip(rgb, 0, 1) * 255.0 + 0.5).astype(np.uint8), alpha


def object_warnings(mask: np.ndarray, path: str, threshold: float = 0.5) -> None:
    """Warn about a foreground mask (H W, the photo's grid) that frames badly; an empty one is an error."""
    fg = np.asarray(mask) > threshold
    if not fg.any():
        raise It3dError(f"the foreground mask of {path} is empty: give an RGBA image whose alpha shows the object, "
                        f"or data.mask_path")
    frac = float(fg.mean())
    if frac < TINY_OBJECT:
        ys, xs = np.nonzero(fg)
        side = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min())
        log.warning(f"the object in {path} covers only {100 * frac:.2f}% of the photo ({side} px across): it is "
                    f"cropped and enlarged, so expect a blurry reference (a closer photo works better)")
    edges = [name for name, line in (("top", fg[0]), ("bottom", fg[-1]), ("left", fg[:, 0]), ("right", fg[:, -1]))
             if line.any()]
    if edges:
        log.warning(f"the object in {path} touches the {' and '.join(edges)} edge{'s' if len(edges) > 1 else ''} "
                    f"of the photo: a part of it may be cut off (a photo with a margin around the object works "
                    f"better)")
