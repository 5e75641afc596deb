"""Refined textured mesh: the coarse stage's mesh (``coarse.geometry.isosurface()``, decimated to
``target_faces`` when set) with a UV texture (xatlas) baked from renders of the refined point
cloud (neither official repository can export the refined result).

Baking: the mesh is unwrapped with xatlas and rasterized in texture space
(:func:`it3d.exporters.texture.uv_texels`), which gives every covered texel its 3D point and face
normal. ``views`` cameras (the reference view first, then ``elevations`` x ``azimuths`` relative to
it, at the reference distance and field of view) are rendered through the deferred point renderer
at ``render_size`` (800: the refine stage's training resolution, so the texture keeps what the
U-Net learned); a texel takes colour from a view when it projects inside it, faces it, and passes
the depth test against the mesh rasterized from that view (``|z - z_mesh| <= depth_tol * z_mesh``).
Colours are blended with weights ``cos^power`` of the angle between the face normal and the
direction to the camera (two-sided: the winding of the isosurface does not matter, the depth test
rejects the far side) (``blend: average``) or taken from the highest-weight view (``blend: best``);
the reference view's weight is multiplied by ``reference_weight``. Texels no view sees are
inpainted in UV space (pull-push, :func:`it3d.exporters.texture.pull_push_fill`); texels outside
the UV charts copy the nearest chart texel (no dark seams when the texture is filtered). Files,
asset frame and the fidelity check: :class:`it3d.exporters.asset.MeshAssetExporter`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import It3dError
from ..core.registry import register
from ..core.typing import Bool, Float, Tensor
from ..data import cameras
from ..renderers.mesh_rasterizer import rasterize_mesh
from .asset import MeshAssetExporter
from .texture import fill_gutter, pull_push_fill, uv_texels
from .views import BakeView, bake_views


def sample_image(img: Float[Tensor, "H W C"], xy: Float[Tensor, "N 2"]) -> Float[Tensor, "N C"]:
    """Bilinear lookup at continuous pixel coordinates (x = col, y = row; centres at +0.5)."""
    h, w = img.shape[:2]
    grid = torch.stack([xy[:, 0] / w * 2 - 1, xy[:, 1] / h * 2 - 1], -1).to(img)
    out = F.grid_sample(img.permute(2, 0, 1)[None], grid[None, None], mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[0, :, 0].T


@torch.no_grad()
def blend_colors(points: Float[Tensor, "N 3"], normals: Optional[Float[Tensor, "N 3"]], views: List[BakeView],
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


def fill_unseen(points: Float[Tensor, "N 3"], colors: Float[Tensor, "N 3"], seen: Bool[Tensor, "N"]) -> Tensor:
    """Unseen points copy the colour of the nearest seen point (3D)."""
    if bool(seen.all()):
        return colors
    if not bool(seen.any()):
        raise It3dError("texture baking: no view sees the mesh (check the export cameras and the coarse mesh)")
    from scipy.spatial import cKDTree

    tree = cKDTree(points[seen].cpu().numpy())
    _, nn = tree.query(points[~seen].cpu().numpy())
    out = colors.clone()
    out[~seen] = colors[seen][torch.as_tensor(nn, device=colors.device)]
    return out


def mesh_arrays(mesh: Any) -> Tuple[Tensor, Tensor]:
    """(vertices V 3 float, faces F 3 long) from what ``geometry.isosurface()`` returns: an object
    with ``v_pos``/``t_pos_idx`` or ``vertices``/``faces``, a dict with those keys, or a tuple."""
    if isinstance(mesh, (tuple, list)) and len(mesh) == 2:
        v, f = mesh
    else:
        get = (lambda k: mesh.get(k)) if isinstance(mesh, dict) else (lambda k: getattr(mesh, k, None))
        v = next((get(k) for k in ("v_pos", "vertices", "verts") if get(k) is not None), None)
        f = next((get(k) for k in ("t_pos_idx", "faces") if get(k) is not None), None)
        if v is None or f is None:
            raise It3dError(f"refined-mesh: cannot read vertices/faces from the coarse isosurface ({type(mesh).__name__})")
    v = torch.as_tensor(np.asarray(v.detach().cpu() if torch.is_tensor(v) else v), dtype=torch.float32)
    f = torch.as_tensor(np.asarray(f.detach().cpu() if torch.is_tensor(f) else f), dtype=torch.long)
    if f.numel() == 0:
        raise It3dError("refined-mesh: the coarse isosurface is empty (is the coarse stage trained?)")
    return v, f


@register("refined-mesh", kind="exporter")
class RefinedMeshExporter(MeshAssetExporter):
    @dataclass
    class Config(MeshAssetExporter.Config):
        render_size: int = 800  # the refine stage's training resolution
        elevations: List[float] = field(default_factory=lambda: [0.0, 30.0, -20.0])
        azimuths: List[float] = field(default_factory=lambda: [0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0])
        blend: str = "average"  # average | best
        power: float = 4.0  # cos^power view weights
        reference_weight: float = 4.0
        depth_tol: float = 0.02  # relative depth tolerance of the visibility test

    cfg: Config

    def configure(self, **kwargs) -> None:
        super().configure(**kwargs)
        if self.cfg.blend not in ("average", "best"):
            raise It3dError(f"refined-mesh: blend must be 'average' or 'best', got '{self.cfg.blend}'")

    def reference(self, system: Any) -> Dict[str, Any]:
        return system.reference()

    def surface(self, system: Any):
        coarse = system.coarse
        if coarse is None:
            raise It3dError("refined-mesh: no coarse stage configured (system.coarse_stage_dir): the refined mesh "
                            "is the coarse mesh re-textured; set system.mesh_exporter_type=none to skip it")
        return mesh_arrays(coarse.geometry.isosurface(**self.isosurface_kwargs()))

    @torch.no_grad()
    def bake(self, system, vertices, faces, uv, uv_faces, vmap, reference):
        """Texture from deferred renders of ``system`` (a refine system); see the module docstring."""
        c = self.cfg
        t = c.texture_size
        r = uv_texels(vertices, uv, uv_faces, vmap, t)
        covered = r["mask"]
        pos = r["points"][covered]
        fn = F.normalize(torch.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]],
                                     vertices[faces[:, 2]] - vertices[faces[:, 0]], dim=-1), dim=-1)
        nrm = fn[r["face_id"][covered]]
        views = bake_views(reference, c.elevations, c.azimuths, c.render_size)
        white = torch.ones(3, device=system.device)
        images, depths = [], []
        for view in views:
            out = system.render_view(view.c2w, view.fovy, view.height, view.width, bg_color=white)
            images.append(out["comp_rgb"][0].float().cpu())
            depths.append(rasterize_mesh(vertices, faces, view.c2w, view.fovy, view.height, view.width)["depth"])
        cols, seen = blend_colors(pos, nrm, views, images, depths, c.depth_tol, c.power, c.blend, c.reference_weight)
        if not bool(seen.any()):
            raise It3dError("texture baking: no view sees the mesh (check the export cameras and the coarse mesh)")
        tex = torch.ones(t, t, 3)
        known = torch.zeros(t, t, dtype=torch.bool)
        tex[covered] = cols.cpu()
        known[covered] = seen.cpu()
        tex = pull_push_fill(tex, known).numpy()
        tex = fill_gutter(tex, covered.numpy())
        return tex, {"chart_fraction": round(float(covered.float().mean()), 4),
                     "seen_fraction": round(float(seen.float().mean()), 4), "bake_render_size": c.render_size}
