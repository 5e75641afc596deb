"""Reading photos, framing them (crop / recentre / resize) and the on-disk encodings of the maps.

Files written by preprocessing (``<stem>`` = the photo's name without extension):

* ``<stem>_rgba.png``: 8-bit RGBA, ``size`` x ``size``, the object recentred so it spans
  ``1 - border_ratio`` of the side (the framing of ``core.image.recentre``, which this
  module reuses), straight (not premultiplied) colour;
* ``<stem>_depth.png``: 16-bit grey, **disparity convention** like RealFusion15 / DPT files and
  ``data.depth_convention: disparity``: ``1 - depth`` over the foreground (near = bright), 0 outside;
* ``<stem>_normal.png``: 8-bit RGB ``(n + 1) / 2``, camera space OpenGL (x right, y up, z to the viewer);
* ``<stem>_caption.txt``: one line.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image

from ..core import io
from ..core.errors import It3dError
from ..core.typing import Float, Tensor
from ..core.image import read_image, read_photo, recentre, resize


def load_photo(path: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """H W 3 uint8 and, when the file has a non-trivial alpha channel, H W float alpha in [0, 1]
    (any picture format, EXIF orientation applied: ``it3d.core.image.read_photo``)."""
    return read_photo(path)


def resize_array(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    """H W C float32 (any C) -> height x width x C, antialiased bilinear (PIL, per channel)."""
    if arr.shape[:2] == (height, width):
        return arr.astype(np.float32)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., c], dtype=np.float32), mode="F")
                        .resize((width, height), Image.BILINEAR)) for c in range(arr.shape[-1])]
    return np.stack(chans, -1)


def fit_size(h: int, w: int, max_side: int) -> Tuple[int, int]:
    """(height, width) scaled so the longer side is at most ``max_side`` (aspect kept)."""
    s = min(1.0, max_side / max(h, w))
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


def downscale_uint8(rgb: np.ndarray, max_side: int) -> np.ndarray:
    h, w = fit_size(*rgb.shape[:2], max_side)
    if (h, w) == rgb.shape[:2]:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.LANCZOS))


def working_size(alpha: np.ndarray, full_hw: Tuple[int, int], size: int, border_ratio: float) -> Tuple[int, int]:
    """A resolution of the photo at which the object's bbox is at most twice its final size, so huge
    photos are never framed at full resolution (``alpha`` may have any resolution of the same aspect)."""
    ys, xs = np.nonzero(alpha > 0.5)
    if ys.size == 0:
        raise It3dError("the foreground mask is empty: give an RGBA image, a mask (mask_path) or check the mask model")
    bbox = max((ys.max() + 1 - ys.min()) / alpha.shape[0] * full_hw[0],
               (xs.max() + 1 - xs.min()) / alpha.shape[1] * full_hw[1])
    target = 2.0 * size * (1.0 - border_ratio)
    s = min(1.0, target / bbox)
    return max(1, int(round(full_hw[0] * s))), max(1, int(round(full_hw[1] * s)))


def frame(planes: Float[Tensor, "C H W"], alpha: Float[Tensor, "H W"], size: int, border_ratio: float,
          recentre_object: bool = True) -> Float[Tensor, "C+1 S S"]:
    """Premultiplied planes + alpha -> recentred square (``core.image.recentre``) at ``size``."""
    stacked = torch.cat([planes * alpha[None], alpha[None]], 0)
    if recentre_object:
        stacked = recentre(stacked, alpha, border_ratio)
    out = resize(stacked, size, size)
    a = out[-1:].clamp(0, 1)
    return torch.cat([out[:-1] / a.clamp_min(1e-6) * (a > 1e-3), a], 0)


# ----------------------------------------------------------------------------- encodings
def write_rgba(path: str, rgba: Float[Tensor, "4 S S"]) -> str:
    return io.save_image(path, rgba.permute(1, 2, 0).clamp(0, 1))


def read_rgba(path: str) -> Tuple[Float[Tensor, "1 S S 3"], Float[Tensor, "1 S S 1"]]:
    arr = torch.from_numpy(read_image(path))
    if arr.shape[-1] != 4:
        raise It3dError(f"{path}: expected an RGBA image")
    return arr[None, ..., :3], arr[None, ..., 3:]


def white_composite(rgb: Float[Tensor, "1 H W 3"], alpha: Float[Tensor, "1 H W 1"]) -> Float[Tensor, "1 H W 3"]:
    return rgb * alpha + (1 - alpha)


def write_depth(path: str, depth: Float[Tensor, "1 H W 1"], mask: Float[Tensor, "1 H W 1"]) -> str:
    """Depth-like (larger = farther, [0, 1] on the foreground) -> 16-bit disparity-convention PNG."""
    disp = ((1.0 - depth.clamp(0, 1)) * (mask > 0.5))[0, ..., 0].cpu().numpy()
    arr = (disp * 65535.0 + 0.5).astype(np.uint16)
    with io.atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path


def read_depth(path: str, mask: Float[Tensor, "1 H W 1"]) -> Float[Tensor, "1 H W 1"]:
    """Inverse of :func:`write_depth`: depth-like, 1 on the background, resized to the mask."""
    arr = torch.from_numpy(read_image(path)[..., :1]).permute(2, 0, 1)
    arr = resize(arr, *mask.shape[1:3]).permute(1, 2, 0)[None]
    return torch.where(mask > 0.5, 1.0 - arr, torch.ones_like(arr))


def write_normal(path: str, normal: Float[Tensor, "1 H W 3"]) -> str:
    return io.save_image(path, normal[0].clamp(-1, 1), data_range=(-1.0, 1.0))
