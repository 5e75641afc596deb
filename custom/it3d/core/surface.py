"""Surface helpers shared by the point-cloud builders and the exporters (tensor code; no component imports).

* :func:`isosurface_mesh`: a geometry's marching-cubes mesh with only the settings given passed on
  (``None``: the geometry's own default, e.g. ``implicit-volume``'s ``isosurface_resolution`` /
  ``isosurface_threshold``) -> (vertices V 3 float32, faces F 3 int64) on the CPU. The one place that
  turns a component's optional ``isosurface_resolution`` / ``isosurface_threshold`` into the call.
* :func:`fill_nearest`: points of unknown colour copy the colour of the nearest point of known colour
  (3D Euclidean, ``scipy.spatial.cKDTree``).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
import torch

from .errors import It3dError
from .typing import Bool, Float, Int, Tensor


def isosurface_mesh(geometry: Any, resolution: Optional[int] = None,
                    threshold: Any = None) -> Tuple[Float[Tensor, "V 3"], Int[Tensor, "F 3"]]:
    """``geometry.isosurface(resolution=..., threshold=...)`` (each only when not None) as CPU float32 / int64."""
    kwargs = {k: v for k, v in (("resolution", resolution), ("threshold", threshold)) if v is not None}
    v, f = geometry.isosurface(**kwargs)
    return torch.as_tensor(v).detach().cpu().float(), torch.as_tensor(f).detach().cpu().long()


def fill_nearest(points: Float[Tensor, "N 3"], colors: Float[Tensor, "N C"],
                 known: Bool[Tensor, "N"]) -> Float[Tensor, "N C"]:
    """``colors`` with every row not ``known`` replaced by the colour of the nearest known point (a new
    tensor; ``colors`` itself when all are known). No known point at all is an error."""
    if bool(known.all()):
        return colors
    if not bool(known.any()):
        raise It3dError("nearest-neighbour colour fill: no point has a known colour")
    from scipy.spatial import cKDTree

    _, nn = cKDTree(points[known].cpu().numpy()).query(points[~known].cpu().numpy(), k=1)
    out = colors.clone()
    out[~known] = colors[known][torch.as_tensor(np.asarray(nn), device=colors.device)]
    return out
