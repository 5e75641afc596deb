"""Refined textured mesh: the coarse stage's mesh (``parts.surface``: the coarse geometry's
``isosurface()``, decimated to ``target_faces`` when set) with a UV texture (xatlas) baked from
renders of the refined point cloud (neither official repository can export the refined result).

The deferred point renderer renders the bake views at ``render_size`` (800: the refine stage's
training resolution, so the texture keeps what the U-Net learned) and every chart texel takes the
blended colour of the views that see it (:mod:`it3d.exporters.projection`). Texels no view sees
are inpainted in UV space (pull-push, :func:`it3d.exporters.texture.pull_push_fill`); texels
outside the UV charts copy the nearest chart texel (no seams when the texture is filtered). Files,
asset frame and the fidelity check: :class:`it3d.exporters.asset.MeshAssetExporter`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from ..core.base import ExportParts
from ..core.errors import It3dError
from ..core.registry import register
from ..core.surface import isosurface_mesh
from ..core.typing import Tensor
from .asset import MeshAssetExporter
from .texture import fill_gutter, pull_push_fill, uv_texels


@register("refined-mesh", kind="exporter")
class RefinedMeshExporter(MeshAssetExporter):
    @dataclass
    class Config(MeshAssetExporter.Config):
        render_size: int = 800  # the refine stage's training resolution

    cfg: Config

    def surface(self, parts: ExportParts) -> Tuple[Tensor, Tensor]:
        if parts.surface is None:
            raise It3dError("refined-mesh: no coarse stage configured (system.coarse_stage_dir): the refined mesh "
                            "is the coarse mesh re-textured; set system.mesh_exporter_type=none to skip it")
        v, f = isosurface_mesh(parts.surface, self.cfg.isosurface_resolution, self.cfg.isosurface_threshold)
        if f.numel() == 0:
            raise It3dError("refined-mesh: the coarse isosurface is empty (is the coarse stage trained?)")
        return v, f

    @torch.no_grad()
    def bake(self, parts, vertices, faces, uv, uv_faces, vmap, reference):
        t = self.cfg.texture_size
        r = uv_texels(vertices, uv, uv_faces, vmap, t)
        covered = r["mask"]
        cols, seen = self.bake_from_renders(parts, vertices, faces, r, reference)
        tex = torch.ones(t, t, 3)
        known = torch.zeros(t, t, dtype=torch.bool)
        tex[covered] = cols.cpu()
        known[covered] = seen.cpu()
        tex = fill_gutter(pull_push_fill(tex, known).numpy(), covered.numpy())
        return tex, {"chart_fraction": round(float(covered.float().mean()), 4),
                     "seen_fraction": round(float(seen.float().mean()), 4), "bake_render_size": self.cfg.render_size}
