"""Surface clean-up before the UV unwrap: quadric decimation and a watertight repair.

* :func:`decimate` — quadric edge collapse (Garland & Heckbert) to ``target_faces`` via
  ``fast-simplification`` (pyvista's binding of Fast-Quadric-Mesh-Simplification, the library
  trimesh's own ``simplify_quadric_decimation`` calls). Run it before xatlas: the unwrap's time
  grows much faster than linearly with the face count.
* :func:`make_watertight` — merge coincident vertices, drop degenerate and duplicate faces, drop
  components smaller than ``min_component_fraction`` of the faces (floaters), fill holes and make
  the winding consistent and outward; reports whether the result is watertight (every edge
  shared by exactly two faces) instead of pretending.
* :func:`vertex_normals` — area-weighted vertex normals of the unsplit mesh (carried to the
  UV-split vertices of the GLB, so shading has no seams along chart borders).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from ..core.errors import It3dError
from ..core.typing import Float, Int, Tensor


def decimate(vertices: Float[Tensor, "V 3"], faces: Int[Tensor, "F 3"], target_faces: int) -> Tuple[Tensor, Tensor]:
    """-> (vertices, faces) with at most about ``target_faces`` faces (unchanged when already fewer)."""
    if target_faces <= 0:
        raise It3dError(f"export.target_faces must be > 0 (or null to keep every face), got {target_faces}")
    if faces.shape[0] <= target_faces:
        return vertices, faces
    import fast_simplification

    v, f = fast_simplification.simplify(vertices.cpu().numpy().astype(np.float32), faces.cpu().numpy().astype(np.int64),
                                        target_count=int(target_faces))
    if len(f) == 0:
        raise It3dError(f"export.target_faces={target_faces}: decimation removed every face")
    return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)), torch.from_numpy(np.ascontiguousarray(f, dtype=np.int64))


def make_watertight(vertices: Float[Tensor, "V 3"], faces: Int[Tensor, "F 3"], min_component_fraction: float = 0.01
                    ) -> Tuple[Tensor, Tensor, bool]:
    """-> (vertices, faces, is_watertight) after the repair described in the module docstring."""
    import trimesh

    m = trimesh.Trimesh(vertices.cpu().numpy().astype(np.float64), faces.cpu().numpy(), process=True, validate=True)
    parts = m.split(only_watertight=False)
    if len(parts) > 1:
        keep = [p for p in parts if len(p.faces) >= min_component_fraction * len(m.faces)]
        m = trimesh.util.concatenate(keep or [max(parts, key=lambda p: len(p.faces))])
        m.merge_vertices()
    trimesh.repair.fill_holes(m)
    trimesh.repair.fix_normals(m, multibody=True)
    if len(m.faces) == 0:
        raise It3dError("export.watertight: nothing left after removing degenerate faces")
    return (torch.from_numpy(np.asarray(m.vertices, dtype=np.float32)), torch.from_numpy(np.asarray(m.faces, dtype=np.int64)),
            bool(m.is_watertight))


def vertex_normals(vertices: Float[Tensor, "V 3"], faces: Int[Tensor, "F 3"]) -> Float[Tensor, "V 3"]:
    """Area-weighted unit vertex normals (counter-clockwise faces seen from outside)."""
    v, f = vertices.double(), faces.long()
    fn = torch.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]], dim=-1)  # length = 2 * area
    n = torch.zeros_like(v).index_add_(0, f.reshape(-1), fn.repeat_interleave(3, 0))
    return torch.nn.functional.normalize(n, dim=-1).float()
