"""Image metrics for single-image-to-3D evaluation, and the suite that computes all of them
(PSNR and SSIM live in :mod:`it3d.core.metrics`, below systems, and are re-exported here).

* PSNR: 10 log10(1 / MSE) for images in [0, 1] (infinite for identical images).
  Masked PSNR: the MSE is the mask-weighted mean over pixels (all channels).
* SSIM (Wang et al. 2004): Gaussian window 11 x 11, sigma 1.5, C1 = 0.01^2, C2 = 0.03^2,
  data range 1, per channel, "valid" filtering (no padding: the map is (H-10) x (W-10)).
  Full SSIM: the mean of the map over pixels and channels. Masked SSIM: the mean of the
  map over the pixels whose window CENTRE lies in the mask (mask-weighted, all channels).
* LPIPS (vgg, v0.1) at the reference view: see :mod:`it3d.eval.lpips`.
* CLIP similarity: cosine similarity of the CLIP image embeddings of the reference and of
  each novel view (transformers ``CLIPModel`` through the hub), averaged over the views.
* Contextual distance: see :mod:`it3d.eval.contextual` (-log CX, averaged over views).

A metric whose weights cannot be loaded is reported as ``nan`` with a reason string
(:class:`MetricSuite` ``.evaluate`` returns ``(values, notes)``); it is never skipped silently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..core.errors import It3dError
from ..core.metrics import psnr, ssim
from ..core.typing import Float, Tensor

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
METRICS = ("psnr", "psnr_masked", "ssim", "ssim_masked", "lpips", "clip", "cx")


# ----------------------------------------------------------------------------- CLIP
class ClipScorer:
    """CLIP image-image cosine similarity (transformers CLIPModel + its image processor, via the hub)."""

    def __init__(self, model_id: str = DEFAULT_CLIP, device="cpu") -> None:
        from transformers import CLIPModel

        try:  # transformers >= 5: the PIL backend without the torchvision warning
            from transformers import CLIPImageProcessorPil as CLIPImageProcessor
        except ImportError:
            from transformers import CLIPImageProcessor

        from ..core import hub

        self.device = torch.device(device)
        self.model = hub.load(CLIPModel, model_id, dtype="auto", device=self.device, config_key="--clip")
        self.processor = hub.load(CLIPImageProcessor, model_id, config_key="--clip")

    @torch.no_grad()
    def embed(self, images: Float[Tensor, "B H W 3"]) -> Float[Tensor, "B D"]:
        arrs = [(img.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy() for img in images]
        px = self.processor(images=arrs, return_tensors="pt")["pixel_values"]
        px = px.to(self.device, dtype=next(self.model.parameters()).dtype)
        vision = self.model.vision_model(pixel_values=px)
        emb = self.model.visual_projection(vision.pooler_output)
        return F.normalize(emb.float(), dim=-1)

    def similarity(self, views: Float[Tensor, "B H W 3"], reference: Float[Tensor, "1 H W 3"]) -> Float[Tensor, "B"]:
        return (self.embed(views) @ self.embed(reference).T)[:, 0]


# ----------------------------------------------------------------------------- suite
@dataclass
class EvalConfig:
    lpips: str = "lpips-vgg16"  # dir / file / id under $IT3D_MODEL_ROOT
    clip: str = DEFAULT_CLIP
    cx_layers: Tuple[str, ...] = ("relu3_3", "relu4_3")
    cx_size: int = 128  # views are resized to cx_size^2 before the VGG features
    max_views: int = 24  # novel views used for CLIP / CX (evenly spaced; 0 = all)
    chunk: int = 4


def pick_views(n: int, max_views: int) -> List[int]:
    """Indices of the novel views among frames 1..n-1 (frame 0 is the reference view)."""
    idx = list(range(1, n))
    if max_views and len(idx) > max_views:
        step = (len(idx) - 1) / max(max_views - 1, 1)
        idx = [idx[int(round(k * step))] for k in range(max_views)]
    return idx


class MetricSuite:
    """Loads the metric models lazily (once) and records why a metric is unavailable."""

    def __init__(self, cfg: Optional[EvalConfig] = None, device="cpu") -> None:
        self.cfg = cfg or EvalConfig()
        self.device = torch.device(device)
        self._models: Dict[str, object] = {}
        self._errors: Dict[str, str] = {}

    def _get(self, name: str):
        if name in self._errors:
            return None
        if name not in self._models:
            try:
                if name == "lpips":
                    from .lpips import load_lpips

                    self._models[name] = load_lpips(self.cfg.lpips, self.device)
                else:
                    self._models[name] = ClipScorer(self.cfg.clip, self.device)
            except It3dError as e:
                self._errors[name] = str(e).splitlines()[0]
                return None
        return self._models[name]

    @torch.no_grad()
    def evaluate(self, render: Float[Tensor, "1 H W 3"], reference: Float[Tensor, "1 H W 3"],
                 mask: Float[Tensor, "1 H W 1"], views: Optional[Float[Tensor, "N H W 3"]] = None
                 ) -> Tuple[Dict[str, float], Dict[str, str]]:
        """Reference-view metrics (render vs reference) and novel-view metrics (views vs reference)."""
        dev = self.device
        render, reference, mask = render.to(dev).float(), reference.to(dev).float(), mask.to(dev).float()
        vals: Dict[str, float] = {k: math.nan for k in METRICS}
        notes: Dict[str, str] = {}
        vals["psnr"] = psnr(render, reference).item()
        vals["ssim"] = ssim(render, reference).item()
        if mask.sum() > 0:
            vals["psnr_masked"] = psnr(render, reference, mask).item()
            vals["ssim_masked"] = ssim(render, reference, mask).item()
        else:
            notes["psnr_masked"] = notes["ssim_masked"] = "empty reference mask"
        lp = self._get("lpips")
        if lp is None:
            notes["lpips"] = notes["cx"] = self._errors["lpips"]
        else:
            vals["lpips"] = lp(render, reference).item()
        if views is None or views.shape[0] == 0:
            notes["clip"] = notes["cx"] = "no novel views rendered"
            return vals, notes
        clip = self._get("clip")
        if clip is None:
            notes["clip"] = self._errors["clip"]
        sims, cxs = [], []
        for i in range(0, views.shape[0], self.cfg.chunk):
            chunk = views[i: i + self.cfg.chunk].to(dev).float()
            if clip is not None:
                sims.append(clip.similarity(chunk, reference))
            if lp is not None:
                from .contextual import image_contextual_distance

                cxs.append(image_contextual_distance(lp, chunk, reference, self.cfg.cx_layers, self.cfg.cx_size))
        if sims:
            vals["clip"] = torch.cat(sims).mean().item()
        if cxs:
            vals["cx"] = torch.cat(cxs).mean().item()
        return vals, notes
