"""Make-It-3D's point cloud: unproject the coarse NeRF's depth, view by view, without duplicates.

1. Reference view (Eq. 6): every reference pixel inside the reference mask (and, with
   ``ref_require_opacity``, where the NeRF's reference-view opacity passes the threshold) is
   unprojected with the NeRF's reference-view z-depth and coloured from the reference image
   (exactly the pixel's value).
2. Novel views, nearest to the reference first: render opacity / depth / colour; project the
   points gathered so far into the view and mark the pixels hit by points on the view's visible
   layer (see ``builders/base.py``) — every pixel whose centre is within ``footprint_radius`` pixels
   of such a point's projection, and the pixel it falls in; add the view's foreground
   pixels outside that footprint and off depth edges (slope ``|grad D| f / D`` above
   ``edge_slope``), coloured from the render (optionally img2img-enhanced).
3. Cap: if more than ``max_points`` points, keep every reference point and a random subset of the
   novel ones.

Guarantee (tested): within each build view, a pixel receives a new point only if no existing
point lies on its visible layer there, and at most one new point per pixel (pixel centres), so
no surface patch seen by a view is unprojected twice by it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List

import torch

from ..core import cameras
from ..core import progress
from ..core.cameras import Camera
from ..core.errors import It3dError
from ..core.registry import register
from ..core.typing import Bool, Float, Tensor
from .base import View, ViewBuilder, depth_slope, on_visible_layer, splat_disc

log = logging.getLogger("it3d")


def depth_edges(view: View, edge_slope: float) -> Bool[Tensor, "H W"]:
    """Foreground pixels whose depth slope (tan of the slant) exceeds ``edge_slope``."""
    return view.mask & (depth_slope(view.depth, view.mask, view.camera.focal) > edge_slope)


def unproject_pixels(view: View, select: Bool[Tensor, "H W"]) -> Float[Tensor, "N 3"]:
    cam = view.camera
    return cameras.unproject(view.depth, cam.c2w, cam.fovy)[select]


@register("depth-unprojection", kind="builder")
class DepthUnprojectionBuilder(ViewBuilder):
    @dataclass
    class Config(ViewBuilder.Config):
        ref_require_opacity: bool = True  # reference pixels also need NeRF opacity > opacity_threshold
        footprint_radius: float = 0.75  # a reprojected point covers the pixels whose centre is this close (px)
        edge_slope: float = 4.0  # depth-edge threshold on |grad D| * f / D (tan of the slant; 4 = 76 deg)
        max_points: int = 1_000_000  # cap on the total count (reference points are never dropped)

    cfg: Config

    @torch.no_grad()
    def build(self, coarse: Any, reference: Dict[str, Any]) -> Dict[str, Tensor]:
        ref_cam = self.start(reference)
        ref_view = self.render(coarse, ref_cam)
        sel = self.reference_mask(reference, ref_cam)
        if self.cfg.ref_require_opacity:
            sel = sel & ref_view.mask
        if not bool(sel.any()):
            raise It3dError("depth-unprojection: no reference pixel is inside both the reference mask and the "
                            "coarse NeRF's opacity > system.builder.opacity_threshold; was the coarse stage trained?")
        positions: List[Tensor] = [unproject_pixels(ref_view, sel)]
        colors: List[Tensor] = [reference["rgb"].reshape(ref_cam.height, ref_cam.width, 3).float().to(self.device)[sel]]
        views: List[Tensor] = [torch.full((positions[0].shape[0],), -1, dtype=torch.long, device=self.device)]
        per_view = []
        for v, cam in enumerate(progress.bar(self.novel_cameras(ref_cam), desc="building point cloud", unit="view")):
            view = self.novel_view(coarse, cam, ref_cam)
            new = self.new_pixels(torch.cat(positions), view)
            positions.append(unproject_pixels(view, new))
            colors.append(view.rgb[new])
            views.append(torch.full((int(new.sum()),), v, dtype=torch.long, device=self.device))
            per_view.append(int(new.sum()))
        pos, col, vid = torch.cat(positions), torch.cat(colors), torch.cat(views)
        n_ref = int(positions[0].shape[0])
        pos, col, vid = self.cap(pos, col, vid, n_ref)
        self.stats.update({"n_ref": n_ref, "n_novel_per_view": per_view, "n_before_cap": n_ref + sum(per_view),
                           "n_points": int(pos.shape[0])})
        log.info(f"depth-unprojection: {n_ref} reference + {sum(per_view)} novel points "
                 f"over {len(per_view)} views -> {pos.shape[0]} points")
        return self.pack(pos, col, vid == -1, vid)

    def footprint(self, points: Float[Tensor, "N 3"], view: View) -> Bool[Tensor, "H W"]:
        """Pixels of ``view`` hit by points on its visible layer, dilated by ``footprint_radius``."""
        cam: Camera = view.camera
        vis, _, _ = on_visible_layer(points, cam, view.depth, view.mask, self.cfg.depth_tol, self.cfg.max_slope)
        uv, _ = cameras.project(points[vis], cam.c2w.to(points), cam.fovy, cam.height, cam.width)
        return splat_disc(uv, cam.height, cam.width, self.cfg.footprint_radius)

    def new_pixels(self, points: Float[Tensor, "N 3"], view: View) -> Bool[Tensor, "H W"]:
        """Foreground pixels of ``view`` not covered by ``points`` and not on a depth edge."""
        return view.mask & ~self.footprint(points, view) & ~depth_edges(view, self.cfg.edge_slope)

    def cap(self, pos: Tensor, col: Tensor, vid: Tensor, n_ref: int):
        limit = int(self.cfg.max_points)
        if limit <= 0 or pos.shape[0] <= limit:
            return pos, col, vid
        if n_ref > limit:
            raise It3dError(f"depth-unprojection: the reference view alone gives {n_ref} points, more than "
                            f"system.builder.max_points={limit}; raise max_points or lower the image size")
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed)
        n_novel = pos.shape[0] - n_ref
        keep = torch.randperm(n_novel, generator=gen)[: limit - n_ref].sort().values.to(pos.device) + n_ref
        idx = torch.cat([torch.arange(n_ref, device=pos.device), keep])
        return pos[idx], col[idx], vid[idx]
