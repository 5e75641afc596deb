"""A small pure-torch triangle rasterizer (no nvdiffrast).

Triangles are rasterized in pixel space: each face's bounding box is enumerated (faces are
sorted by bbox size and processed in chunks of bounded work), pixel centres are tested with
barycentric edge functions, and a z-buffer (``scatter_reduce`` amin) keeps the nearest face.
Pixel (row i, col j) has its centre at (j + 0.5, i + 0.5), as in ``it3d.core.cameras``.

* :func:`rasterize_2d` — triangles given as 2-D pixel coordinates (+ optional per-vertex depth
  for perspective-correct barycentrics); used for UV-space texture baking.
* :func:`rasterize_mesh` — world-space mesh seen by an OpenGL camera (c2w, fovy).
* :func:`interpolate` — per-vertex attributes at the rasterized pixels.
* :func:`sample_texture` / :func:`render_textured` — a UV-textured mesh seen by a camera (unlit
  base colour, bilinear texture lookup, ``ssaa``-times supersampled then box-filtered), as a glTF
  viewer shows it with lighting off; the export fidelity check renders exported files with it.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..core import cameras
from ..core.typing import Float, Int, Tensor


def _cross2(ax, ay, bx, by):
    return ax * by - ay * bx


def rasterize_2d(xy: Float[Tensor, "V 2"], faces: Int[Tensor, "F 3"], height: int, width: int,
                 z: Optional[Float[Tensor, "V"]] = None, near: float = 1e-3, budget: int = 1 << 22) -> Dict[str, Tensor]:
    """Rasterize triangles with vertex pixel coords ``xy`` (x = col, y = row, continuous).

    Returns ``face_id`` (H W long, -1 = empty), ``bary`` (H W 3; perspective-correct when ``z`` is
    given; faces with a vertex at ``z <= near`` are dropped), ``depth`` (H W, interpolated ``z``; +inf
    where empty) and ``mask`` (H W bool). ``face_id`` indexes ``faces``."""
    dev = xy.device
    faces = faces.long().to(dev)
    zv = torch.zeros(xy.shape[0], device=dev) if z is None else z.float()
    tri = xy.float()[faces]  # F 3 2
    lo = torch.ceil(tri.min(1).values - 0.5).long()
    hi = torch.floor(tri.max(1).values - 0.5).long()
    lo = torch.maximum(lo, torch.zeros_like(lo))
    hi = torch.minimum(hi, torch.tensor([width - 1, height - 1], device=dev))
    size = hi - lo + 1  # F 2 (w, h)
    a = tri[:, 0]
    area = _cross2(tri[:, 1, 0] - a[:, 0], tri[:, 1, 1] - a[:, 1], tri[:, 2, 0] - a[:, 0], tri[:, 2, 1] - a[:, 1])
    keep = (size > 0).all(1) & (area.abs() > 1e-12)
    if z is not None:
        keep &= (zv[faces] > near).all(1)
    ids = torch.nonzero(keep).squeeze(1)
    side = size[ids].max(1).values
    order = torch.argsort(side)
    ids, side = ids[order], side[order]

    n_pix = height * width
    zbuf = torch.full((n_pix,), float("inf"), device=dev)
    face_id = torch.full((n_pix,), -1, dtype=torch.long, device=dev)
    bary = torch.zeros(n_pix, 3, device=dev)
    s, n = 0, ids.numel()
    while s < n:
        e = min(n, s + max(1, budget // int(side[s]) ** 2))
        e = min(n, s + max(1, budget // int(side[e - 1]) ** 2))
        f = ids[s:e]
        k = int(side[e - 1])
        s = e
        off = torch.arange(k, device=dev)
        px = lo[f, 0, None, None] + off[None, None, :]  # f k k (rows: oy, cols: ox)
        py = lo[f, 1, None, None] + off[None, :, None]
        px, py = torch.broadcast_tensors(px, py)
        valid = (px <= hi[f, 0, None, None]) & (py <= hi[f, 1, None, None])
        t = tri[f]  # f 3 2
        cx, cy = px.float() + 0.5, py.float() + 0.5
        ar = area[f][:, None, None]

        def edge(i, j):
            return _cross2(t[:, j, 0, None, None] - t[:, i, 0, None, None], t[:, j, 1, None, None] - t[:, i, 1, None, None],
                           cx - t[:, i, 0, None, None], cy - t[:, i, 1, None, None]) / ar

        w0, w1 = edge(1, 2), edge(2, 0)
        w2 = 1.0 - w0 - w1
        eps = 1e-6
        inside = valid & (w0 >= -eps) & (w1 >= -eps) & (w2 >= -eps)
        fi = f[:, None, None].expand_as(px)[inside]
        w = torch.stack([w0[inside], w1[inside], w2[inside]], -1).clamp_min(0)
        w = w / w.sum(-1, keepdim=True)
        pix = (py[inside] * width + px[inside])
        fz = zv[faces[fi]]  # K 3
        if z is not None:
            inv = (w / fz).sum(-1)
            depth = 1.0 / inv
            w = (w / fz) / inv[:, None]
        else:
            depth = (w * fz).sum(-1)
        zc = torch.full((n_pix,), float("inf"), device=dev).scatter_reduce(0, pix, depth, "amin")
        win = (depth == zc[pix]) & (zc[pix] < zbuf[pix])
        face_id[pix[win]] = fi[win]
        bary[pix[win]] = w[win]
        zbuf = torch.minimum(zbuf, zc)
    mask = face_id >= 0
    return {"face_id": face_id.view(height, width), "bary": bary.view(height, width, 3),
            "depth": zbuf.view(height, width), "mask": mask.view(height, width)}


def rasterize_mesh(vertices: Float[Tensor, "V 3"], faces: Int[Tensor, "F 3"], c2w: Float[Tensor, "4 4"],
                   fovy_deg: float, height: int, width: int, near: float = 1e-3, budget: int = 1 << 22) -> Dict[str, Tensor]:
    """Rasterize a world-space mesh from an OpenGL camera; ``depth`` is z along the viewing axis."""
    xy, depth = cameras.project(vertices.float(), c2w.float(), fovy_deg, height, width)
    return rasterize_2d(xy, faces, height, width, z=depth, near=near, budget=budget)


def interpolate(attr: Float[Tensor, "V C"], faces: Int[Tensor, "F 3"], face_id: Int[Tensor, "H W"],
                bary: Float[Tensor, "H W 3"]) -> Float[Tensor, "H W C"]:
    """Per-vertex ``attr`` at every rasterized pixel (0 where ``face_id`` is -1).
    ``face_id`` indexes ``faces`` as passed to :func:`rasterize_2d`."""
    fid = face_id.clamp_min(0)
    vals = attr[faces.long()[fid]]  # H W 3 C
    out = (vals * bary[..., None]).sum(-2)
    return out * (face_id >= 0)[..., None]


def sample_texture(texture: Float[Tensor, "T S C"], uv: Float[Tensor, "N 2"]) -> Float[Tensor, "N C"]:
    """Bilinear lookup (texel centres at (k + 0.5) / size, clamped at the border, as GL_LINEAR +
    CLAMP_TO_EDGE) of a texture whose row 0 is v = 1 (the OBJ / trimesh convention: v points up)."""
    grid = torch.stack([uv[:, 0] * 2 - 1, (1 - uv[:, 1]) * 2 - 1], -1).to(texture)
    out = torch.nn.functional.grid_sample(texture.permute(2, 0, 1)[None], grid[None, None], mode="bilinear",
                                          padding_mode="border", align_corners=False)
    return out[0, :, 0].T


def render_textured(vertices: Float[Tensor, "V 3"], faces: Int[Tensor, "F 3"], uv: Float[Tensor, "V 2"],
                    texture: Float[Tensor, "T S 3"], c2w: Float[Tensor, "4 4"], fovy_deg: float, height: int,
                    width: int, bg_color=(1.0, 1.0, 1.0), ssaa: int = 2) -> Dict[str, Tensor]:
    """Unlit textured render -> ``rgb`` (H W 3, composited on ``bg_color``) and ``coverage`` (H W in
    [0, 1]: the fraction of the ``ssaa`` x ``ssaa`` subpixels the mesh covers). ``uv`` is per vertex."""
    h, w = height * ssaa, width * ssaa
    r = rasterize_mesh(vertices, faces, c2w, fovy_deg, h, w)
    t = interpolate(uv.float(), faces, r["face_id"], r["bary"])
    rgb = torch.as_tensor(bg_color, dtype=torch.float32).expand(h, w, 3).clone()
    m = r["mask"]
    if bool(m.any()):
        rgb[m] = sample_texture(texture.float(), t[m]).to(rgb)
    cov = m.float()
    if ssaa > 1:
        rgb = torch.nn.functional.avg_pool2d(rgb.permute(2, 0, 1)[None], ssaa)[0].permute(1, 2, 0)
        cov = torch.nn.functional.avg_pool2d(cov[None, None], ssaa)[0, 0]
    return {"rgb": rgb, "coverage": cov}
