"""Cameras the exporters render from: the reference view and orbit views around it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

from ..core import cameras
from ..core.typing import Tensor


@dataclass
class BakeView:
    c2w: Tensor  # 4 4
    fovy: float
    height: int
    width: int
    is_reference: bool = False
    name: str = "reference"
    elevation: float = 0.0
    azimuth: float = 0.0


def bake_views(reference: Dict[str, Any], elevations: Sequence[float], azimuths: Sequence[float],
               size: int) -> List[BakeView]:
    """The reference camera (re-rendered at ``size`` x ``size``) and the cameras at every
    (elevation, reference azimuth + azimuth) at the reference distance and field of view."""
    fovy = float(reference["fovy"].reshape(-1)[0])
    dist = float(reference["camera_distances"].reshape(-1)[0])
    az0 = float(reference["azimuth"].reshape(-1)[0])
    el0 = float(reference["elevation"].reshape(-1)[0]) if "elevation" in reference else 0.0
    views = [BakeView(reference["c2w"].reshape(4, 4).float(), fovy, size, size, True, "reference", el0, az0)]
    for e in elevations:
        for a in azimuths:
            views.append(BakeView(cameras.spherical_c2w(float(e), az0 + float(a), dist), fovy, size, size, False,
                                  f"el{float(e):g}_az{float(a):g}", float(e), az0 + float(a)))
    return views
