"""Customize-It-3D's point cloud: Poisson-disk samples of the coarse mesh, coloured by a
conflict-free projection.

1. Mesh: marching cubes of the coarse field (``coarse.geometry.isosurface(resolution, threshold)``),
   optionally cleaned (largest connected component, or components above an area fraction).
2. ``num_points`` blue-noise samples on it (``builders/sampling.py``).
3. Colour, each point once: points on the reference view's visible layer inside the reference
   mask take their reference pixel's colour; then, view by view (nearest to the reference
   first), the points still uncoloured that are on the view's visible layer inside its
   foreground (NeRF opacity > threshold, optionally united with SAM's mask) take the view's
   (optionally img2img-enhanced) colour at their pixel; points no view saw take the colour of
   their nearest coloured neighbour (``scipy.spatial.cKDTree``).

Visibility is the visible-layer depth test of ``builders/base.py`` against a depth map of the
view: the cleaned mesh rasterized from the view (``visibility: mesh``, default;
``renderers/mesh_rasterizer.py``), the point z-buffer of the samples themselves
(``visibility: points``; min-pooled over ``zbuffer_radius`` pixels to close gaps), or the NeRF's
rendered depth (``visibility: nerf``).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..core import progress
from ..core.cameras import Camera
from ..core.config import ConfigError
from ..core.errors import It3dError
from ..core.registry import register
from ..core.surface import fill_nearest, isosurface_mesh
from ..core.typing import Float, Tensor
from .base import View, ViewBuilder, on_visible_layer, point_zbuffer
from .sampling import clean_mesh, poisson_disk_sample

log = logging.getLogger("it3d")

VISIBILITY = ("mesh", "points", "nerf")


@register("mesh-sampling", kind="builder")
class MeshSamplingBuilder(ViewBuilder):
    @dataclass
    class Config(ViewBuilder.Config):
        isosurface_resolution: int = 256
        isosurface_threshold: Any = None  # density level ("auto" or a value); None = the coarse geometry's setting
        keep_largest_component: bool = True
        min_component_fraction: float = 0.0  # used when keep_largest_component is false (0 = keep all)
        num_points: int = 700_000
        poisson_radius: float = 0.0  # 0 = sqrt(area / (3 num_points))
        visibility: str = "mesh"  # depth test against: mesh (rasterized) | points (sample z-buffer) | nerf (rendered)
        zbuffer_radius: int = 0  # > 0 closes gaps of sparse samples but misses points on steep slopes
        mesh_supersample: int = 2  # visibility: rasterize the mesh at this multiple of the view size

    cfg: Config

    def configure(self, device: Any = "cpu", **kwargs) -> None:
        if self.cfg.visibility not in VISIBILITY:
            raise ConfigError(f"system.builder.visibility: '{self.cfg.visibility}' is not one of {', '.join(VISIBILITY)}")
        super().configure(device=device, **kwargs)

    # ------------------------------------------------------------------ steps
    def sample_surface(self, coarse: Any) -> Float[Tensor, "N 3"]:
        v, f = isosurface_mesh(coarse.geometry, self.cfg.isosurface_resolution, self.cfg.isosurface_threshold)
        tm = clean_mesh(v.double().numpy(), f.numpy(), self.cfg.keep_largest_component, self.cfg.min_component_fraction)
        pts, _, r = poisson_disk_sample(tm, self.cfg.num_points, seed=self.cfg.seed, radius=self.cfg.poisson_radius)
        self.mesh = (torch.from_numpy(np.asarray(tm.vertices)).float().to(self.device),
                     torch.from_numpy(np.asarray(tm.faces)).long().to(self.device))
        self.stats.update({"mesh_vertices": int(len(tm.vertices)), "mesh_faces": int(len(tm.faces)),
                           "mesh_area": float(tm.area), "poisson_radius": r})
        return torch.from_numpy(pts).float().to(self.device)

    def visible(self, points: Float[Tensor, "N 3"], cam: Camera, view: Optional[View] = None):
        """(visible N bool, i, j) for ``points`` in ``cam`` by the configured depth test."""
        if self.cfg.visibility == "nerf":
            return on_visible_layer(points, cam, view.depth, view.mask, self.cfg.depth_tol, self.cfg.max_slope)
        if self.cfg.visibility == "mesh":
            from ..renderers.mesh_rasterizer import rasterize_mesh

            k = max(1, int(self.cfg.mesh_supersample))
            hi = dataclasses.replace(cam, height=cam.height * k, width=cam.width * k)
            r = rasterize_mesh(self.mesh[0], self.mesh[1], cam.c2w, cam.fovy, hi.height, hi.width)
            depth = torch.where(r["mask"], r["depth"], torch.zeros_like(r["depth"]))
            vis, i, j = on_visible_layer(points, hi, depth, r["mask"], self.cfg.depth_tol, self.cfg.max_slope)
            return vis, torch.div(i, k, rounding_mode="floor"), torch.div(j, k, rounding_mode="floor")
        zb, covered = point_zbuffer(points, cam, self.cfg.zbuffer_radius)
        return on_visible_layer(points, cam, zb, covered, self.cfg.depth_tol, self.cfg.max_slope,
                                pixels=0.75 + self.cfg.zbuffer_radius)

    @torch.no_grad()
    def build(self, coarse: Any, reference: Dict[str, Any]) -> Dict[str, Tensor]:
        ref_cam = self.start(reference)
        pts = self.sample_surface(coarse)
        n = pts.shape[0]
        colors = torch.zeros(n, 3, device=self.device)
        view_id = torch.full((n,), -2, dtype=torch.long, device=self.device)
        colored = torch.zeros(n, dtype=torch.bool, device=self.device)

        ref_view = self.render(coarse, ref_cam) if self.cfg.visibility == "nerf" else None
        vis, i, j = self.visible(pts, ref_cam, ref_view)
        ref_rgb = reference["rgb"].reshape(ref_cam.height, ref_cam.width, 3).float().to(self.device)
        take = vis & self.reference_mask(reference, ref_cam)[i, j]
        colors[take] = ref_rgb[i[take], j[take]]
        view_id[take] = -1
        colored |= take
        per_view = []
        for v, cam in enumerate(progress.bar(self.novel_cameras(ref_cam), desc="building point cloud", unit="view")):
            view = self.novel_view(coarse, cam, ref_cam)
            vis, i, j = self.visible(pts, cam, view)
            take = vis & view.mask[i, j] & ~colored
            colors[take] = view.rgb[i[take], j[take]]
            view_id[take] = v
            colored |= take
            per_view.append(int(take.sum()))
        n_ref = int((view_id == -1).sum())
        if not bool(colored.any()):
            raise It3dError("mesh-sampling: no sample is visible in any build view; is the isosurface where the "
                            "coarse NeRF renders its object (system.builder.isosurface_threshold)?")
        colors = fill_nearest(pts, colors, colored)
        self.stats.update({"n_points": n, "n_ref": n_ref, "n_per_view": per_view, "n_filled": int((~colored).sum())})
        log.info(f"mesh-sampling: {n} samples: {n_ref} from the reference, {sum(per_view)} from "
                 f"{len(per_view)} novel views, {int((~colored).sum())} by nearest neighbour")
        return self.pack(pts, colors, view_id == -1, view_id)
