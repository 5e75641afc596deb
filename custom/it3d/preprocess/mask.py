"""``sam-mask``: the foreground mask of an RGB photo without alpha, from SAM with an automatic prompt.

Prompt: one box covering the image less ``box_margin`` on every side, plus a positive point at
the image centre (``center_point``). Single-object photos (RealFusion15, the papers' inputs)
have the object near the centre, and a box prompt asks SAM for "the object in this box"; the
centre point settles SAM's ambiguity between the object, one of its parts and the whole scene.
Of SAM's three candidates the one with the highest predicted IoU whose area lies in
[``min_area``, ``max_area``] of the image is kept (a candidate covering almost everything is
the background), then only its connected component containing the centre (else its largest)
with holes filled, so stray blobs do not enlarge the bounding box used for recentring.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

from ..core.registry import register
from ..core.typing import Bool, Float, Tensor
from .base import HubEstimator
from .sam import DEFAULT_SAM, SamSegmenter


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
        box_margin: float = 0.02
        center_point: bool = True
        min_area: float = 0.01
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
        ranked = torch.where(ok, scores, scores - 1e9)  # candidates with a plausible area first
        best = masks[int(torch.argmax(ranked))]
        if c.keep_center_component:
            best = keep_center_component(best)
        return best.float()[None, :, :, None].to(image.device)
