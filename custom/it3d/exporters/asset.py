"""Shared pipeline of the textured-mesh exporters (``mesh``, ``refined-mesh``); not registered itself.

surface (world frame) -> ``target_faces`` quadric decimation -> ``watertight`` repair -> xatlas
unwrap (``unwrap``: chart size cap, :class:`.texture.UnwrapOptions`; its chart count and utilisation
go to ``fidelity.json["unwrap"]``) -> texture bake (the subclass: :meth:`bake`) -> asset frame (:mod:`.conventions`: +Y up,
front +Z, metres, origin at the base) -> ``<stem>.obj/.mtl/_texture.png/.glb`` -> fidelity check
of the written file (:mod:`.fidelity`: ``fidelity.json`` + ``preview.png`` beside it), with the
time of every step in ``fidelity.json["timings_s"]``.

Subclasses implement :meth:`surface` (vertices, faces in the world frame) and :meth:`bake` (they may
use :meth:`bake_from_renders`: colours projected from the stage's own renders, so the texture shows
what the stage renders). The entry point is ``export(parts, stem)`` with the stage's
:class:`it3d.core.base.ExportParts`; the stage render used by the check is ``parts.render_view``
(albedo, white background).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..core import io, progress
from ..core.base import BaseExporter, ExportParts
from ..core.cameras import Camera
from ..core.errors import It3dError
from ..core.typing import Tensor
from . import fidelity
from .conventions import ORIGINS, asset_frame
from .projection import project_colors
from .surface import decimate, make_watertight, vertex_normals
from .texture import UnwrapOptions, uv_unwrap
from .views import bake_views, reference_view

log = logging.getLogger("it3d")


class MeshAssetExporter(BaseExporter):
    @dataclass
    class Config:
        isosurface_resolution: Optional[int] = None  # None: the geometry's own default
        isosurface_threshold: Any = None  # None: the geometry's own ("auto" = min(mean density, 10))
        target_faces: Optional[int] = None  # quadric decimation before the unwrap; None keeps every face
        unwrap: UnwrapOptions = field(default_factory=UnwrapOptions)  # xatlas options (it3d.exporters.texture)
        watertight: bool = False  # merge / drop degenerate faces and floaters / fill holes; reported in fidelity.json
        texture_size: int = 1024
        scale: Any = "auto"  # auto: the object is `height` metres tall | a number: metres per scene unit
        height: float = 1.0  # metres, with scale: auto
        origin: str = "base"  # base: centre of the bounding box's bottom face | center: bounding-box centre
        glb: bool = True
        fidelity: bool = True  # render the written file back and compare with the stage (fidelity.json, preview.png)
        fidelity_size: int = 512
        fidelity_elevations: List[float] = field(default_factory=lambda: [15.0])
        fidelity_azimuths: List[float] = field(
            default_factory=lambda: [0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0])  # relative to the reference
        fidelity_ssaa: int = 2
        # projection bake from the stage's renders (it3d.exporters.projection)
        render_size: int = 512
        elevations: List[float] = field(default_factory=lambda: [0.0, 30.0, -20.0])
        azimuths: List[float] = field(default_factory=lambda: [0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0])
        blend: str = "average"  # average | best
        power: float = 4.0  # cos^power view weights
        reference_weight: float = 4.0
        depth_tol: float = 0.02  # relative depth tolerance of the visibility test

    cfg: Config

    def configure(self, **kwargs) -> None:
        c = self.cfg
        if c.origin not in ORIGINS:
            raise It3dError(f"export.origin must be one of {', '.join(ORIGINS)}, got '{c.origin}'")
        if c.target_faces is not None and c.target_faces <= 0:
            raise It3dError(f"export.target_faces must be > 0 or null, got {c.target_faces}")
        if c.blend not in ("average", "best"):
            raise It3dError(f"export.blend must be 'average' or 'best', got '{c.blend}'")

    # ------------------------------------------------------------------ to implement
    def surface(self, parts: ExportParts) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def bake(self, parts: ExportParts, vertices: Tensor, faces: Tensor, uv: Tensor, uv_faces: Tensor, vmap: Tensor,
             reference: Dict[str, Any]) -> Tuple[np.ndarray, Dict[str, Any]]:
        """-> (texture S S 3 float in [0, 1], row 0 = v 1; figures for fidelity.json)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    @staticmethod
    def stage_render(parts: ExportParts):
        """view -> (rgb H W 3, opacity H W) the stage renders there (albedo, white background): the check's side."""
        white = torch.ones(3, device=parts.device)

        def render(view: Camera):
            out = parts.render_view(view.c2w, view.fovy, view.height, view.width, bg_color=white, shading="albedo",
                                     normals=False)
            return out["comp_rgb"][0].float().cpu(), out["opacity"][0, ..., 0].float().cpu()

        return render

    @staticmethod
    def bake_render(parts: ExportParts):
        """view -> the colour the stage renders there: the foreground colour divided by the opacity when the
        renderer gives it (no background blended into the texture), else the white-background composite."""
        white = torch.ones(3, device=parts.device)

        def render(view: Camera):
            out = parts.render_view(view.c2w, view.fovy, view.height, view.width, bg_color=white, shading="albedo",
                                     normals=False)
            if "comp_rgb_fg" in out:
                return (out["comp_rgb_fg"][0] / out["opacity"][0].clamp_min(1e-3)).clamp(0, 1)
            return out["comp_rgb"][0]

        return render

    def bake_from_renders(self, parts: ExportParts, vertices: Tensor, faces: Tensor, texels: Dict[str, Tensor],
                          reference: Dict[str, Any]):
        """-> (colours of the covered texels N 3, seen N bool) projected from the stage's renders."""
        c = self.cfg
        m = texels["mask"]
        views = bake_views(reference, c.elevations, c.azimuths, c.render_size)
        return project_colors(self.bake_render(parts), vertices, faces, texels["points"][m], texels["face_id"][m],
                              views, c.depth_tol, c.power, c.blend, c.reference_weight)

    def export(self, parts: ExportParts, stem: str) -> Dict[str, str]:
        """Write ``stem``.obj/.mtl/.glb + ``stem``_texture.png (and fidelity.json + preview.png beside them)."""
        c, t = self.cfg, {}
        reference = reference_view(parts, self)
        laps = progress.Laps(f"export {os.path.basename(stem)}", 7 if c.fidelity else 6)
        v, f = self.surface(parts)
        t["surface"], n_in = laps.lap("surface"), int(f.shape[0])
        if c.target_faces is not None:
            v, f = decimate(v, f, c.target_faces)
        t["decimate"] = laps.lap("decimate")
        watertight = None
        if c.watertight:
            v, f, watertight = make_watertight(v, f)
            if not watertight:
                log.warning("export.watertight: the repaired mesh still has open or non-manifold edges "
                            "(see fidelity.json: watertight)")
        t["watertight"] = laps.lap("watertight")
        unwrap_info: Dict[str, Any] = {}
        uv, uv_faces, vmap = uv_unwrap(v, f, c.unwrap, unwrap_info)
        t["unwrap"] = laps.lap("unwrap")
        tex, bake_info = self.bake(parts, v, f, uv, uv_faces, vmap, reference)
        t["bake"] = laps.lap("bake")
        frame = asset_frame(v.numpy(), float(reference["azimuth"].reshape(-1)[0]), c.scale, c.height, c.origin)
        normals = frame.rotate(vertex_normals(v, f).numpy())
        paths = io.save_mesh(stem, frame.to_asset(v.numpy()), f, uv=uv, uv_faces=uv_faces, texture=tex, normals=normals,
                             glb=c.glb)
        t["write"] = laps.lap("write")
        if c.fidelity:
            views = bake_views(reference, c.fidelity_elevations, c.fidelity_azimuths, c.fidelity_size)
            extra = {"faces_extracted": n_in, "faces": int(f.shape[0]), "vertices": int(v.shape[0]),
                     "texture_size": c.texture_size, "watertight": watertight, "unwrap": unwrap_info, **bake_info,
                     "timings_s": {k: round(x, 3) for k, x in t.items()}}
            rec = fidelity.write_fidelity(os.path.dirname(os.path.abspath(stem)), paths.get("glb", paths["obj"]), frame,
                                          views, self.stage_render(parts), extra, c.fidelity_ssaa)
            laps.lap("fidelity")
            ref = rec["reference"]
            log.info(f"export fidelity (reference view): PSNR {ref['psnr']:.2f} dB, mask IoU {ref['mask_iou']:.3f}"
                     f"{'' if rec['meets_targets'] else ' (below the targets: PSNR >= 25 dB, IoU >= 0.95)'}")
            paths["fidelity"] = os.path.join(os.path.dirname(os.path.abspath(stem)), "fidelity.json")
            paths["preview"] = os.path.join(os.path.dirname(os.path.abspath(stem)), "preview.png")
        return paths
