"""Texture colours projected from a stage's renders (the ``renders`` bake of the mesh exporters and
the ``render`` colours of the point-cloud exporter).

``views`` cameras (the reference view first, then ``elevations`` x ``azimuths`` relative to it, at
the reference distance and field of view) are rendered by the stage; a surface point takes colour
from a view when it projects inside it, faces it, and passes the depth test against the mesh
rasterized from that view (``|z - z_mesh| <= depth_tol * z_mesh``). Colours are blended with
weights ``cos^power`` of the angle between the surface normal and the direction to the camera
(two-sided: the winding of the isosurface does not matter, the depth test rejects the far side)
(``blend: average``) or taken from the highest-weight view (``blend: best``); the reference view's
weight is multiplied by ``reference_weight``, so at the reference view the texture is what the
stage renders there.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..core import cameras
from ..core.cameras import Camera
from ..core.errors import It3dError
from ..core.typing import Bool, Float, Int, Tensor
from ..renderers.mesh_rasterizer import rasterize_mesh


def sample_image(img: Float[Tensor, "H W C"], xy: Float[Tensor, "N 2"]) -> Float[Tensor, "N C"]:
    """Bilinear lookup at continuous pixel coordinates (x = col, y = row; centres at +0.5)."""
    h, w = img.shape[:2]
    grid = torch.stack([xy[:, 0] / w * 2 - 1, xy[:, 1] / h * 2 - 1], -1).to(img)
    out = F.grid_sample(img.permute(2, 0, 1)[None], grid[None, None], mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[0, :, 0].T


@torch.no_grad()
def blend_colors(points: Float[Tensor, "N 3"], normals: Optional[Float[Tensor, "N 3"]], views: List[Camera],
                 images: List[Tensor], depths: List[Tensor], depth_tol: float, power: float, blend: str,
                 reference_weight: float) -> Tuple[Float[Tensor, "N 3"], Bool[Tensor, "N"]]:
    """Colour of each point from the views where it is visible (see the module docstring)."""
    n = points.shape[0]
    acc = torch.zeros(n, 3, device=points.device)
    wsum = torch.zeros(n, device=points.device)
    best = torch.full((n,), -1.0, device=points.device)
    for view, img, dep in zip(views, images, depths):
        c2w = view.c2w.to(points)
        xy, z = cameras.project(points, c2w, view.fovy, view.height, view.width)
        i, j = torch.floor(xy[:, 1]).long(), torch.floor(xy[:, 0]).long()
        inside = (z > 0) & (i >= 0) & (i < view.height) & (j >= 0) & (j < view.width)
        d = dep.to(points)[i.clamp(0, view.height - 1), j.clamp(0, view.width - 1)]
        vis = inside & torch.isfinite(d) & ((z - d).abs() <= depth_tol * d.abs().clamp_min(1e-6))
        if normals is not None:
            to_cam = F.normalize(c2w[:3, 3] - points, dim=-1)
            cos = (normals * to_cam).sum(-1).abs()  # two-sided: the depth test rejects back faces
            w = cos.clamp_min(1e-4) ** power
        else:
            w = torch.ones(n, device=points.device)
        w = w * (reference_weight if view.is_reference else 1.0) * vis
        col = sample_image(img.to(points), xy)
        if blend == "best":
            take = w > best
            acc[take] = col[take]
            best = torch.where(take, w, best)
            wsum = torch.maximum(wsum, w)
        else:
            acc += w[:, None] * col
            wsum += w
    seen = wsum > 0
    colors = acc if blend == "best" else acc / wsum.clamp_min(1e-12)[:, None]
    return colors.clamp(0, 1), seen


@torch.no_grad()
def project_colors(render: Callable[[Camera], Tensor], vertices: Float[Tensor, "V 3"], faces: Int[Tensor, "F 3"],
                   points: Float[Tensor, "N 3"], face_id: Int[Tensor, "N"], views: List[Camera], depth_tol: float,
                   power: float, blend: str, reference_weight: float) -> Tuple[Float[Tensor, "N 3"], Bool[Tensor, "N"]]:
    """Colours of surface ``points`` (on faces ``face_id`` of the mesh) from ``render(view) -> H W 3``."""
    if blend not in ("average", "best"):
        raise It3dError(f"export.blend must be 'average' or 'best', got '{blend}'")
    fn = F.normalize(torch.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]],
                                 vertices[faces[:, 2]] - vertices[faces[:, 0]], dim=-1), dim=-1)
    images = [render(view).float().cpu() for view in views]
    depths = [rasterize_mesh(vertices, faces, view.c2w, view.fovy, view.height, view.width)["depth"] for view in views]
    return blend_colors(points, fn[face_id], views, images, depths, depth_tol, power, blend, reference_weight)
