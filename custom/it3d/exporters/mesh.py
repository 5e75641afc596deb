"""``mesh`` exporter (coarse stage): marching cubes -> decimation -> xatlas -> albedo texture baked on the CPU.

Baking rasterizes the UV layout into texture space (every texel gets its triangle and barycentrics),
interpolates the 3-D positions, queries the geometry's features and the material's ``albedo``
shading there; texels outside the charts copy the nearest chart texel (no seams under bilinear or
mip-mapped lookups). The rest of the pipeline (asset frame, files, fidelity check) is
:class:`it3d.exporters.asset.MeshAssetExporter`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

import numpy as np
import torch

from ..core import registry
from ..core.errors import It3dError
from ..core.typing import Float, Int, Tensor
from .asset import MeshAssetExporter
from .texture import fill_gutter, uv_texels


@torch.no_grad()
def bake_texture(query, vertices: Float[Tensor, "V 3"], uv: Float[Tensor, "U 2"], uv_faces: Int[Tensor, "F 3"],
                 vmapping: Int[Tensor, "U"], size: int, chunk: int = 65536) -> Tuple[np.ndarray, np.ndarray]:
    """-> (texture S S 3, row 0 = v 1, whose chart texels are ``query(points N 3) -> N 3`` on the surface
    and whose other texels copy the nearest chart texel; the chart mask S S)."""
    r = uv_texels(vertices, uv, uv_faces, vmapping, size)
    mask = r["mask"]
    pts = r["points"][mask]
    cols = torch.cat([query(c) for c in torch.split(pts, chunk)], 0) if pts.shape[0] else pts.new_zeros(0, 3)
    tex = np.ones((size, size, 3), np.float32)
    tex[mask.numpy()] = cols.float().cpu().clamp(0, 1).numpy()
    return fill_gutter(tex, mask.numpy()), mask.numpy()


@registry.register("mesh", kind="exporter")
class MeshExporter(MeshAssetExporter):
    @dataclass
    class Config(MeshAssetExporter.Config):
        chunk_size: int = 65536

    cfg: Config

    def reference(self, system: Any) -> Dict[str, Any]:
        dm = system._datamodule() if hasattr(system, "_datamodule") else None
        if dm is None or not hasattr(dm, "reference"):
            raise It3dError("mesh exporter: the system has no datamodule with a reference view (run --export "
                            "through launch.py, which attaches the stage's single-image datamodule)")
        return dm.reference

    def surface(self, system: Any):
        v, f = system.geometry.isosurface(**self.isosurface_kwargs())
        if f.shape[0] == 0:
            raise It3dError("export: the isosurface is empty; nothing to write")
        return v.detach().cpu().float(), f.detach().cpu().long()

    def bake(self, system, vertices, faces, uv, uv_faces, vmap, reference):
        geo = system.geometry
        device = next(geo.parameters()).device

        def query(points):
            feats = geo(points.to(device), output_normal=False)["features"]
            return system.material(feats, shading="albedo").cpu()

        was = system.training
        system.eval()
        try:
            tex, mask = bake_texture(query, vertices, uv, uv_faces, vmap, self.cfg.texture_size, chunk=self.cfg.chunk_size)
        finally:
            system.train(was)
        return tex, {"chart_fraction": round(float(mask.mean()), 4)}
