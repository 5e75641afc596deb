"""Refined point cloud as a binary PLY with colours (``save/export/points.ply``).

Colours (``colors``):

* ``descriptor`` (default): the learned descriptor's first three channels, clamped to [0, 1].
  They start at the builder's colours and are held near them by the colour regulariser, so they
  are the points' own colours, without the U-Net's view-dependent corrections.
* ``render``: each point takes the colour of the deferred renders (the final images) at its
  projection, averaged over the export views where it is visible (its depth within
  ``depth_tol`` of the nearest point depth the rasterizer reports at that pixel); points no view
  sees copy the nearest seen point. Closer to what the turntable shows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

import numpy as np
import torch

from ..core import io
from ..core.base import BaseExporter, ExportParts
from ..core.errors import It3dError
from ..core.registry import register
from ..core.surface import fill_nearest
from .conventions import asset_frame
from .projection import blend_colors
from .views import bake_views, reference_view


@register("refined-point-cloud", kind="exporter")
class RefinedPointCloudExporter(BaseExporter):
    @dataclass
    class Config:
        colors: str = "descriptor"  # descriptor | render
        render_size: int = 800  # the refine stage's training resolution
        elevations: List[float] = field(default_factory=lambda: [0.0, 30.0, -20.0])
        azimuths: List[float] = field(default_factory=lambda: [0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0])
        depth_tol: float = 0.01
        scale: Any = "auto"  # auto: `height` metres tall | metres per scene unit
        height: float = 1.0
        origin: str = "base"  # base | center

    cfg: Config

    def configure(self, **kwargs) -> None:
        if self.cfg.colors not in ("descriptor", "render"):
            raise It3dError(f"refined-point-cloud: colors must be 'descriptor' or 'render', got '{self.cfg.colors}'")

    @torch.no_grad()
    def point_colors(self, parts: ExportParts, reference: Dict[str, Any]) -> torch.Tensor:
        geo = parts.geometry
        if self.cfg.colors == "descriptor":
            return geo.colors().detach()
        views = bake_views(reference, self.cfg.elevations, self.cfg.azimuths, self.cfg.render_size)
        images, depths = [], []
        for view in views:
            out = parts.render_view(view.c2w, view.fovy, view.height, view.width)
            images.append(out["comp_rgb"][0].float())
            d = out["depth"][0, ..., 0].float()
            depths.append(torch.where(out["opacity"][0, ..., 0] > 0.5, d, torch.full_like(d, float("inf"))))
        pts = geo.positions.float()
        cols, seen = blend_colors(pts, None, views, images, depths, self.cfg.depth_tol, 1.0, "average", 1.0)
        if not bool(seen.any()):
            raise It3dError("texture baking: no view sees the mesh (check the export cameras and the coarse mesh)")
        return fill_nearest(pts, cols, seen)

    def export(self, parts: ExportParts, path: str) -> Dict[str, str]:
        """Write the point cloud ``parts.geometry`` with colours to ``path`` (.ply)."""
        reference = reference_view(parts, self)
        pts = parts.geometry.positions.detach().float().cpu().numpy()
        az = float(reference["azimuth"].reshape(-1)[0])
        frame = asset_frame(pts, az, self.cfg.scale, self.cfg.height, self.cfg.origin)
        return {"ply": io.save_ply(path, frame.to_asset(pts).astype(np.float32), self.point_colors(parts, reference))}
