"""Input pictures: reading them (every format Pillow reads, with one-line errors) and framing them.

* EXIF orientation is applied (a phone's portrait JPEG comes out upright);
* grayscale, palette (with or without transparency), CMYK / YCbCr / LAB JPEGs, 16-bit PNGs, WebP,
  ``LA`` / ``PA`` are turned into 1, 3 or 4 channels of float32 in [0, 1] (16-bit: / 65535);
* a missing file, a folder, a file Pillow cannot decode, and a photo too small to hold an object
  each stop with one line naming the file.

:func:`object_warnings` logs the framing warnings about a foreground mask (a tiny object, an
object cut by the photo's edge); an empty mask is an error.

Framing (shared by preprocessing and the datamodules): :func:`object_bbox`, :func:`recentre` (crop to the
object and centre it on a square canvas), :func:`resize` (antialiased bilinear) and
:func:`find_sibling_map` (a depth / normal map stored beside a photo).
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import It3dError
from .typing import Float, Tensor

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


def to_uint8_image(image: Float[Tensor, "1 H W 3"]) -> np.ndarray:
    """1 H W 3 float in [0, 1] -> H W 3 uint8 (the input the transformers processors expect)."""
    return (image[0].detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def find_sibling_map(image_path: str, kind: str) -> Optional[str]:
    """``<stem>_<kind>.png|.npy`` beside the image, or (RealFusion15 layout) ``<kind>.png`` beside
    ``rgba.png`` / ``image.png``; None when there is none."""
    folder, base = os.path.split(image_path)
    stem = os.path.splitext(base)[0]
    # <stem>_<kind>.png written by preprocessing (a manifest beside it) is framed, not aligned with the photo
    cached = os.path.isfile(os.path.join(folder, f"{stem}_preprocess.json"))
    for cand in (os.path.join(folder, f"{stem}_{kind}.png"), os.path.join(folder, f"{stem}_{kind}.npy")):
        if os.path.isfile(cand) and not cached:
            return cand
    if stem in ("rgba", "image") and os.path.isfile(os.path.join(folder, f"{kind}.png")):
        return os.path.join(folder, f"{kind}.png")
    return None


def object_bbox(mask: Float[Tensor, "H W"], threshold: float = 0.5) -> Tuple[int, int, int, int]:
    """(top, left, bottom, right) (exclusive) of the pixels above ``threshold``."""
    ys, xs = torch.nonzero(mask > threshold, as_tuple=True)
    if ys.numel() == 0:
        raise It3dError("the foreground mask is empty: give an RGBA image with an alpha channel, or mask_path")
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def recentre(planes: Float[Tensor, "C H W"], mask: Float[Tensor, "H W"], border_ratio: float) -> Float[Tensor, "C S S"]:
    """Crop to the object's bbox and centre it on a square zero canvas where it spans 1 - border_ratio."""
    t, l, b, r = object_bbox(mask)
    h, w = b - t, r - l
    side = max(int(round(max(h, w) / (1.0 - border_ratio))), max(h, w))
    canvas = planes.new_zeros(planes.shape[0], side, side)
    y0, x0 = (side - h) // 2, (side - w) // 2
    canvas[:, y0:y0 + h, x0:x0 + w] = planes[:, t:b, l:r]
    return canvas


def resize(planes: Float[Tensor, "C H W"], height: int, width: int) -> Float[Tensor, "C h w"]:
    return F.interpolate(planes[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]
