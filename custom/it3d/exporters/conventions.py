"""The asset frame every export is written in (glTF 2.0 conventions), and its inverse.

it3d's world frame is z-up with the reference camera at (elevation e0, azimuth a0) looking at the
origin (``it3d.core.cameras``). Exported assets use glTF's frame instead:

* **+Y up**: world +z becomes +Y;
* **front = +Z**: the object's front, the side the reference photo shows (the reference camera's
  horizontal direction ``(cos a0, sin a0, 0)``), faces +Z; +X = Y x Z is the viewer's right in the
  reference photo (right-handed, as glTF requires). The reference elevation does not tilt the asset;
* **metres**: ``scale: auto`` (the default) makes the object ``height`` metres tall (1.0: a 1 m
  object, whatever the NeRF's units); a number instead is metres per scene unit (1.0 keeps NeRF units);
* **origin**: ``base`` (the default) puts (0, 0, 0) at the centre of the bounding box's bottom face,
  so the asset stands on the ground plane Y = 0 in Blender or a web viewer; ``center`` puts it at
  the bounding-box centre.

``asset = scale * (R @ world - offset)``; :attr:`AssetFrame.matrix` is that map as a 4x4 matrix
(written to ``fidelity.json`` so a tool can map an asset back onto the trained stage's cameras).
OBJ and PLY files use the same frame (OBJ has no standard axis; this is Blender's and three.js'
"Y up, -Z forward" import default, which keeps the front facing the viewer's default +Z side).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Union

import numpy as np

from ..core.errors import It3dError

ORIGINS = ("base", "center")


@dataclass
class AssetFrame:
    rotation: np.ndarray  # 3 3: rows are the asset's X, Y, Z axes in world coordinates
    offset: np.ndarray  # 3: subtracted after rotating (scene units)
    scale: float  # metres per scene unit

    @property
    def matrix(self) -> np.ndarray:
        """4 4 world -> asset."""
        m = np.eye(4)
        m[:3, :3] = self.scale * self.rotation
        m[:3, 3] = -self.scale * self.offset
        return m

    def to_asset(self, points) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return self.scale * (p @ self.rotation.T - self.offset)

    def to_world(self, points) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return (p / self.scale + self.offset) @ self.rotation

    def rotate(self, directions) -> np.ndarray:
        """Directions (normals) world -> asset (unit length kept)."""
        return np.asarray(directions, dtype=np.float64).reshape(-1, 3) @ self.rotation.T

    def describe(self) -> Dict[str, Any]:
        return {"up": "+Y", "front": "+Z", "units": "metres", "scale_m_per_scene_unit": self.scale,
                "world_to_asset": self.matrix.round(8).tolist()}


def world_to_gltf_rotation(ref_azimuth_deg: float) -> np.ndarray:
    """Rows X, Y, Z: X = (-sin a, cos a, 0) (the reference view's right), Y = world z, Z = (cos a, sin a, 0)."""
    a = math.radians(float(ref_azimuth_deg))
    return np.array([[-math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0], [math.cos(a), math.sin(a), 0.0]])


def asset_frame(points, ref_azimuth_deg: float, scale: Union[str, float] = "auto", height: float = 1.0,
                origin: str = "base") -> AssetFrame:
    """The frame of an asset whose world-space points are ``points`` (N 3), seen from a reference camera
    at azimuth ``ref_azimuth_deg``."""
    if origin not in ORIGINS:
        raise It3dError(f"export.origin must be one of {', '.join(ORIGINS)}, got '{origin}'")
    rot = world_to_gltf_rotation(ref_azimuth_deg)
    q = np.asarray(points, dtype=np.float64).reshape(-1, 3) @ rot.T
    if q.shape[0] == 0:
        raise It3dError("export: no points to place in the asset frame")
    lo, hi = q.min(0), q.max(0)
    centre = (lo + hi) / 2
    offset = np.array([centre[0], lo[1] if origin == "base" else centre[1], centre[2]])
    if isinstance(scale, str):
        if scale != "auto":
            raise It3dError(f"export.scale must be 'auto' or a number of metres per scene unit, got '{scale}'")
        if not height > 0:
            raise It3dError(f"export.height must be > 0 metres, got {height}")
        extent = float(hi[1] - lo[1])
        if extent <= 0:
            raise It3dError("export.scale=auto: the asset has zero height; give export.scale as a number")
        s = float(height) / extent
    else:
        s = float(scale)
        if not s > 0:
            raise It3dError(f"export.scale must be > 0 (metres per scene unit), got {scale}")
    return AssetFrame(rot, offset, s)
