"""UV atlas and texture-space helpers shared by the mesh exporters.

* :func:`uv_unwrap` — xatlas charts with every chart's area capped (:class:`UnwrapOptions`; run it
  on the decimated mesh). xatlas grows charts without a size limit by default, and on marching-cubes
  surfaces its chart computation (not the packing, ~0.3 s) then takes ~10 s for 50k faces and
  ~65 s for 100k (``tests/benchmarks/bench_export.py``); capping a chart at the area of 500 average
  faces takes it to ~1-2.5 s with fewer, less stretched charts, and brute-force packing of those
  charts (+1-3 s) keeps the texture's covered fraction near xatlas's default (see
  :class:`UnwrapOptions`);
* :func:`uv_texels` — rasterize the atlas in texture space: every covered texel gets its face and
  its 3-D point (row 0 of the texture is v = 1, as OBJ / trimesh / :func:`sample_texture` read it);
* :func:`pull_push_fill` — UV-space inpainting of texels with no colour (pull-push, Gortler et al.
  1996, "The Lumigraph" sec 3.4): a pyramid of weight-averaged halvings of the known texels, then
  each level's unknown texels take the bilinearly upsampled coarser level. Unknown texels get a
  smooth blend of the nearest known texels in the atlas, without the Voronoi patches of a
  nearest-point copy;
* :func:`fill_gutter` — texels outside every chart copy the nearest chart texel, so bilinear and
  mip-mapped lookups at chart borders never blend in the background (no seams).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..core.ranges import check
from ..core.typing import Float, Int, Tensor
from ..renderers.mesh_rasterizer import interpolate, rasterize_2d


@dataclass
class UnwrapOptions:
    """``export.unwrap``: the xatlas chart and pack options the exporters set (the rest stay xatlas's)."""

    # ours: a chart stops growing at the area of this many average faces (0: xatlas's default, no cap).
    # xatlas's time is in parametrising big charts, not in packing; measured (bench_export.py): a 50k-face
    # trained coarse surface 9.7 s -> 1.5 s (515 -> 166 charts), 100k faces of a blobby surface
    # 39-65 s -> 2.4-3.5 s. A mesh of a few thousand faces keeps about xatlas's own charts
    max_chart_faces: int = check(500, ge=0, integer=True)
    # xatlas ChartOptions.maxIterations default: refinement passes of the chart growing
    max_iterations: int = check(1, ge=0, integer=True)
    # xatlas PackOptions.padding default (texels of the packed atlas between charts; the bake's gutter
    # fill keeps bilinear lookups at chart borders inside the chart's colours)
    padding: int = check(0, ge=0, integer=True)
    # ours (xatlas: false, random placement): the capped charts packed at random cover fewer texels
    # (texture 1024: 0.58 -> 0.57 trained 50k, 0.69 -> 0.49 blobby 50k, 0.57 -> 0.50 blobby 100k);
    # brute-force placement costs +1.5-3.5 s at 50k faces and +1 s at 100k and covers 0.64 / 0.57 / 0.60
    brute_force: bool = True


def uv_unwrap(vertices: Float[Tensor, "V 3"], faces: Int[Tensor, "F 3"], options: Optional[UnwrapOptions] = None,
              info: Optional[Dict[str, Any]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """xatlas parametrisation -> (uv U 2 in [0, 1], uv_faces F 3, vmapping U: uv vertex -> mesh vertex).

    ``info`` (a dict), when given, receives ``charts``, ``atlas_width`` / ``atlas_height`` (xatlas's
    own atlas, scaled to [0, 1] here) and ``utilization`` (xatlas's fraction of that atlas covered)."""
    import xatlas

    o = options or UnwrapOptions()
    v = np.ascontiguousarray(vertices.detach().cpu().numpy(), dtype=np.float32)
    f = np.ascontiguousarray(faces.detach().cpu().numpy(), dtype=np.uint32)
    co, po = xatlas.ChartOptions(), xatlas.PackOptions()
    if o.max_chart_faces > 0 and len(f) > o.max_chart_faces:
        e1, e2 = v[f[:, 1]].astype(np.float64) - v[f[:, 0]], v[f[:, 2]].astype(np.float64) - v[f[:, 0]]
        area = 0.5 * float(np.linalg.norm(np.cross(e1, e2), axis=1).sum())
        co.max_chart_area = float(area * o.max_chart_faces / len(f))
    co.max_iterations = int(o.max_iterations)
    po.padding, po.bruteForce = int(o.padding), bool(o.brute_force)
    atlas = xatlas.Atlas()
    atlas.add_mesh(v, f)
    atlas.generate(co, po)
    vmap, idx, uv = atlas[0]
    if info is not None:
        info.update(charts=int(atlas.chart_count), atlas_width=int(atlas.width), atlas_height=int(atlas.height),
                    utilization=round(float(atlas.utilization), 4))
    return (torch.from_numpy(uv.astype(np.float32)), torch.from_numpy(idx.astype(np.int64)),
            torch.from_numpy(vmap.astype(np.int64)))


def uv_texels(vertices: Float[Tensor, "V 3"], uv: Float[Tensor, "U 2"], uv_faces: Int[Tensor, "F 3"],
              vmapping: Int[Tensor, "U"], size: int) -> Dict[str, Tensor]:
    """-> ``mask`` (S S bool: texel centre inside a chart), ``points`` (S S 3 world points, 0 outside)
    and ``face_id`` (S S, -1 outside; indexes ``uv_faces``, i.e. the mesh's faces)."""
    xy = torch.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], -1)
    r = rasterize_2d(xy, uv_faces, size, size)
    pos = interpolate(vertices[vmapping].float(), uv_faces, r["face_id"], r["bary"])
    return {"mask": r["mask"], "points": pos, "face_id": r["face_id"]}


def pull_push_fill(img: Float[Tensor, "H W C"], known: Tensor) -> Float[Tensor, "H W C"]:
    """Known texels unchanged; every other texel filled by pull-push (see the module docstring)."""
    if bool(known.all()) or not bool(known.any()):
        return img.clone()
    x = (img.float() * known[..., None]).permute(2, 0, 1)[None]
    w = known.float()[None, None]
    levels = [(x, w)]
    while min(levels[-1][0].shape[-2:]) > 1:
        cx, cw = levels[-1]
        ph, pw = cx.shape[-2] % 2, cx.shape[-1] % 2  # odd sizes: pad with zero weight
        cx, cw = F.pad(cx, (0, pw, 0, ph)), F.pad(cw, (0, pw, 0, ph))
        levels.append((F.avg_pool2d(cx, 2) * 4, F.avg_pool2d(cw, 2) * 4))  # sums of colour*weight and weight
    fx, fw = levels[-1]
    filled = fx / fw.clamp_min(1e-12)
    for cx, cw in reversed(levels[:-1]):
        up = F.interpolate(filled, scale_factor=2, mode="bilinear", align_corners=False)[..., :cx.shape[-2], :cx.shape[-1]]
        mean = cx / cw.clamp_min(1e-12)
        a = cw.clamp(0, 1)  # a texel with total weight >= 1 keeps its own average
        filled = a * mean + (1 - a) * up
    out = filled[0].permute(1, 2, 0)
    return torch.where(known[..., None], img.float(), out)


def fill_gutter(tex: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Texels outside the charts copy the nearest covered texel."""
    from scipy import ndimage

    if covered.all() or not covered.any():
        return tex
    _, (ii, jj) = ndimage.distance_transform_edt(~covered, return_indices=True)
    return tex[ii, jj]
