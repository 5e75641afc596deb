"""Cameras the exporters render from: the reference view and orbit views around it
(:class:`it3d.core.cameras.Camera`, the builders' camera record too)."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from ..core import cameras
from ..core.base import ExportParts
from ..core.cameras import Camera
from ..core.errors import It3dError


def reference_view(parts: ExportParts, exporter: Any) -> Dict[str, Any]:
    """The stage's reference view record, or an error (naming ``exporter``) that says how to get one."""
    if parts.reference is None:
        name = getattr(exporter, "registered_name", type(exporter).__name__)
        raise It3dError(f"{name} exporter: the stage has no reference view (no datamodule with one; run --export "
                        "through launch.py, which attaches the stage's single-image datamodule)")
    return parts.reference


def bake_views(reference: Dict[str, Any], elevations: Sequence[float], azimuths: Sequence[float],
               size: int) -> List[Camera]:
    """The reference camera (re-rendered at ``size`` x ``size``) and the cameras at every
    (elevation, reference azimuth + azimuth) at the reference distance and field of view."""
    fovy = float(reference["fovy"].reshape(-1)[0])
    dist = float(reference["camera_distances"].reshape(-1)[0])
    az0 = float(reference["azimuth"].reshape(-1)[0])
    el0 = float(reference["elevation"].reshape(-1)[0]) if "elevation" in reference else 0.0
    ref = Camera(reference["c2w"].reshape(4, 4).float(), fovy, size, size, el0, az0, dist, "reference", True)
    return [ref] + cameras.cameras_around(elevations, azimuths, az0, dist, fovy, size, size)
