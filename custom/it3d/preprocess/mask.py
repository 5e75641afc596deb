"""``sam-mask``: the foreground mask of an RGB photo without alpha, from SAM with an automatic prompt.

Prompt: one box covering the image less ``box_margin`` on every side, plus a positive point at
the image centre (``center_point``). Single-object photos (RealFusion15, the papers' inputs)
have the object near the centre, and a box prompt asks SAM for "the object in this box"; the
centre point settles SAM's ambiguity between the object, one of its parts and the whole scene.
Of SAM's three candidates the one with the highest predicted IoU whose area lies in
[``min_area``, ``max_area``] of the image is kept (a candidate covering almost everything is
the background), then only its connected component containing the centre (else its largest)
with holes filled, so stray blobs do not enlarge the bounding box used for recentring. When no
candidate lies in that window there is no object to reconstruct: :class:`NoObjectError`. A photo
that is one colour throughout (:func:`blank_photo`) is refused before SAM runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

from ..core.config import check
from ..core.errors import It3dError
from ..core.registry import register
from ..core.typing import Bool, Float, Tensor
from .base import HubEstimator
from ..core.segment import DEFAULT_SAM, SamSegmenter

BLANK_TOLERANCE = 16  # levels (of 255) within which a pixel counts as the photo's dominant colour
BLANK_FRACTION = 0.0005  # a photo with fewer other pixels than this is blank (a tiny object is far above)


class NoObjectError(It3dError):
    """The mask estimator found nothing that looks like one object."""


def blank_photo(photo: np.ndarray) -> Optional[str]:
    """None, or (for a photo that is one colour throughout, H W 3 uint8) that colour in words."""
    flat = photo.reshape(-1, photo.shape[-1]).astype(np.int16)
    median = np.median(flat, axis=0)
    other = (np.abs(flat - median) > BLANK_TOLERANCE).any(axis=1).mean()
    if other >= BLANK_FRACTION:
        return None
    names = {(255, 255, 255): "white", (0, 0, 0): "black"}
    rgb = tuple(int(v) for v in median[:3])
    return names.get(tuple(255 if v > 255 - BLANK_TOLERANCE else 0 if v < BLANK_TOLERANCE else -1 for v in rgb),
                     f"rgb{rgb}")


def keep_center_component(mask: Bool[Tensor, "H W"]) -> Bool[Tensor, "H W"]:
    """The connected component (8-connectivity) containing the centre pixel, else the largest; holes filled."""
    m = mask.cpu().numpy().astype(bool)
    labels, n = ndimage.label(m, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask.clone()
    h, w = m.shape
    keep = labels[h // 2, w // 2]
    if keep == 0:
        keep = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    out = ndimage.binary_fill_holes(labels == keep)
    return torch.from_numpy(out).to(mask.device)


@register("sam-mask", kind="estimator")
class SamMaskEstimator(HubEstimator):
    @dataclass
    class Config(HubEstimator.Config):
        pretrained_model_name_or_path: str = DEFAULT_SAM
        box_margin: float = check(0.02, ge=0, lt=0.5)  # of the image side, on every side
        center_point: bool = True
        # an object covers between min_area and max_area of the photo; SAM's candidates outside are not objects
        min_area: float = 0.001
        max_area: float = 0.9
        keep_center_component: bool = True

    def load(self):
        return SamSegmenter(self.cfg.pretrained_model_name_or_path, self.device, self.dtype, config_key=self.config_key)

    def __call__(self, image: Float[Tensor, "1 H W 3"], mask: Optional[Float[Tensor, "1 H W 1"]] = None
                 ) -> Float[Tensor, "1 H W 1"]:
        if mask is not None:
            return mask
        c = self.cfg
        h, w = image.shape[1:3]
        box = torch.tensor([[c.box_margin * w, c.box_margin * h, (1 - c.box_margin) * w, (1 - c.box_margin) * h]])
        points = torch.tensor([[[w / 2.0, h / 2.0]]]) if c.center_point else None
        masks, scores = self.loaded().segment(image, boxes=box, points=points)
        self.n_calls += 1
        area = masks.flatten(1).float().mean(1)
        ok = (area >= c.min_area) & (area <= c.max_area)
        if not bool(ok.any()):
            covers = ", ".join(f"{100 * float(a):.1f}%" for a in area)
            raise NoObjectError(f"the mask model's candidates cover {covers} of the photo, none between min_area "
                                f"{100 * c.min_area:g}% and max_area {100 * c.max_area:g}%")
        best = masks[int(torch.argmax(torch.where(ok, scores, scores - 1e9)))]
        if c.keep_center_component:
            best = keep_center_component(best)
        return best.float()[None, :, :, None].to(image.device)
