"""``transformers-depth``: monocular depth with a transformers depth model (Depth Anything, DPT/MiDaS).

Loaded with ``AutoModelForDepthEstimation`` + ``AutoImageProcessor`` through the hub (default
``depth-anything/Depth-Anything-V2-Small-hf``; ``Intel/dpt-hybrid-midas`` etc. work too). The
relative models predict affine-invariant *disparity* (larger = nearer); metric ones
(``depth_estimation_type: metric``, ZoeDepth) predict depth. ``output: auto`` picks by the
model config. The estimator always returns depth-like values, larger = farther, normalised to
[0, 1] over the foreground (the mask when given, else the image) and 1 on the background:
disparity ``p`` becomes ``1 - (p - min) / (max - min)``, an affine map, so scale/shift-invariant
losses (Pearson) see the same signal as with the raw prediction. Resized to the image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..core import hub
from ..core.config import ConfigError
from ..core.registry import register
from ..core.typing import Float, Tensor
from ..core.image import to_uint8_image
from .base import HubEstimator


def normalise_depth(pred: Float[Tensor, "1 H W 1"], mask: Optional[Float[Tensor, "1 H W 1"]],
                    is_disparity: bool) -> Float[Tensor, "1 H W 1"]:
    """Raw prediction -> depth-like in [0, 1] over ``mask > 0.5`` (larger = farther), 1 outside."""
    fg = torch.ones_like(pred, dtype=torch.bool) if mask is None else mask > 0.5
    if not fg.any():
        fg = torch.ones_like(fg)
    vals = pred[fg]
    lo, hi = vals.min(), vals.max()
    d = ((pred - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    if is_disparity:
        d = 1.0 - d
    return torch.where(fg, d, torch.ones_like(d))


@register("transformers-depth", kind="estimator")
class TransformersDepthEstimator(HubEstimator):
    @dataclass
    class Config(HubEstimator.Config):
        pretrained_model_name_or_path: str = "depth-anything/Depth-Anything-V2-Small-hf"
        output: str = "auto"  # auto | disparity | depth: what the model predicts

    def configure(self, **kwargs) -> None:
        super().configure(**kwargs)
        if self.cfg.output not in ("auto", "disparity", "depth"):
            raise ConfigError(f"{self.cfg_path}.output must be auto, disparity or depth, got '{self.cfg.output}'")

    def load(self):
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        name = self.cfg.pretrained_model_name_or_path
        model = hub.load(AutoModelForDepthEstimation, name, dtype=self.dtype, device=self.device,
                         config_key=self.config_key)
        return model, hub.load(AutoImageProcessor, name, config_key=self.config_key)

    @property
    def predicts_disparity(self) -> bool:
        if self.cfg.output != "auto":
            return self.cfg.output == "disparity"
        conf = self.loaded()[0].config
        metric = getattr(conf, "depth_estimation_type", "relative") == "metric" or conf.model_type == "zoedepth"
        return not metric

    @torch.no_grad()
    def __call__(self, image: Float[Tensor, "1 H W 3"], mask: Optional[Float[Tensor, "1 H W 1"]] = None
                 ) -> Float[Tensor, "1 H W 1"]:
        model, processor = self.loaded()
        inputs = processor(images=to_uint8_image(image), return_tensors="pt")
        pred = model(pixel_values=inputs["pixel_values"].to(self.device, self.dtype)).predicted_depth
        self.n_calls += 1
        h, w = image.shape[1:3]
        pred = F.interpolate(pred.float().reshape(1, 1, *pred.shape[-2:]), size=(h, w), mode="bilinear",
                             align_corners=False).permute(0, 2, 3, 1).to(image.device)
        return normalise_depth(pred, mask, self.predicts_disparity)
