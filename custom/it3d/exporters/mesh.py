"""``mesh`` exporter: marching cubes -> xatlas UV unwrap -> albedo texture baked on the CPU.

Baking rasterizes the UV layout into texture space with the pure-torch rasterizer (every texel
gets its triangle and barycentrics), interpolates the 3-D positions, queries the geometry's
features and the material's ``albedo`` shading there, and fills ``dilate_iterations`` texels past
the chart borders (mean of the filled 3x3 neighbours) so bilinear lookups at seams stay clean.
Writes ``<stem>.obj/.mtl``, ``<stem>_texture.png`` and ``<stem>.glb`` through ``core.io.save_mesh``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..core import io, registry
from ..core.base import BaseExporter
from ..core.errors import It3dError
from ..core.typing import Float, Int, Tensor
from ..renderers.mesh_rasterizer import interpolate, rasterize_2d


def uv_unwrap(vertices: Float[Tensor, "V 3"], faces: Int[Tensor, "F 3"]):
    """xatlas parametrisation -> (uv U 2 in [0, 1], uv_faces F 3, vmapping U: uv vertex -> mesh vertex)."""
    import xatlas

    vmap, idx, uv = xatlas.parametrize(vertices.cpu().numpy().astype(np.float32), faces.cpu().numpy().astype(np.uint32))
    return (torch.from_numpy(uv.astype(np.float32)), torch.from_numpy(idx.astype(np.int64)),
            torch.from_numpy(vmap.astype(np.int64)))


def dilate(img: Float[Tensor, "H W C"], valid: Tensor, iterations: int) -> Float[Tensor, "H W C"]:
    """Fill empty texels next to filled ones with the mean of their filled 3x3 neighbours, ``iterations`` times
    (texels never reached keep their value in ``img``)."""
    x = (img * valid[..., None]).permute(2, 0, 1)[None]
    m = valid.float()[None, None]
    k = torch.ones(1, 1, 3, 3)
    for _ in range(iterations):
        s = F.conv2d(x, k.expand(x.shape[1], 1, 3, 3), padding=1, groups=x.shape[1])
        cnt = F.conv2d(m, k, padding=1)
        grow = (m == 0) & (cnt > 0)
        x = torch.where(grow, s / cnt.clamp_min(1), x)
        m = torch.where(grow, torch.ones_like(m), m)
    return torch.where(m[0, 0, ..., None] > 0, x[0].permute(1, 2, 0), img)


@torch.no_grad()
def bake_texture(query, vertices: Float[Tensor, "V 3"], uv: Float[Tensor, "U 2"], uv_faces: Int[Tensor, "F 3"],
                 vmapping: Int[Tensor, "U"], size: int, dilate_iterations: int, background=(1.0, 1.0, 1.0),
                 chunk: int = 65536) -> Float[Tensor, "S S 3"]:
    """Texture (row 0 = v 1) whose texel colours are ``query(points N 3) -> N 3`` on the surface."""
    xy = torch.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], -1)
    r = rasterize_2d(xy, uv_faces, size, size)
    pos = interpolate(vertices[vmapping].float(), uv_faces, r["face_id"], r["bary"])
    mask = r["mask"]
    pts = pos[mask]
    cols = torch.cat([query(c) for c in torch.split(pts, chunk)], 0) if pts.shape[0] else pts.new_zeros(0, 3)
    tex = torch.tensor(background, dtype=torch.float32).expand(size, size, 3).clone()
    tex[mask] = cols.float().cpu().clamp(0, 1)
    filled = dilate(tex, mask, dilate_iterations)
    return filled


@registry.register("mesh", kind="exporter")
class MeshExporter(BaseExporter):
    @dataclass
    class Config:
        isosurface_resolution: Optional[int] = None  # None: the geometry's own default
        isosurface_threshold: Any = None
        texture_size: int = 1024
        dilate_iterations: int = 8
        glb: bool = True
        chunk_size: int = 65536

    cfg: Config

    def export(self, system, stem: str) -> Dict[str, str]:
        """Extract, unwrap, bake and write ``stem``.* from a system with ``geometry`` and ``material``."""
        c = self.cfg
        geo = system.geometry
        kw = {}
        if c.isosurface_resolution is not None:
            kw["resolution"] = c.isosurface_resolution
        if c.isosurface_threshold is not None:
            kw["threshold"] = c.isosurface_threshold
        v, f = geo.isosurface(**kw)
        if f.shape[0] == 0:
            raise It3dError("export: the isosurface is empty; nothing to write")
        v, f = v.detach().cpu().float(), f.detach().cpu().long()
        uv, uv_faces, vmap = uv_unwrap(v, f)
        device = next(geo.parameters()).device

        def query(points):
            feats = geo(points.to(device), output_normal=False)["features"]
            return system.material(feats, shading="albedo").cpu()

        was = system.training
        system.eval()
        try:
            tex = bake_texture(query, v, uv, uv_faces, vmap, c.texture_size, c.dilate_iterations, chunk=c.chunk_size)
        finally:
            system.train(was)
        return io.save_mesh(stem, v, f, uv=uv, uv_faces=uv_faces, texture=tex, glb=c.glb)
