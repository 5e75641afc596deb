"""Camera math (no data loading). Conventions used everywhere in it3d:

* world frame is z-up; a camera at elevation ``e`` (degrees above the xy plane; polar = 90 - e),
  azimuth ``a`` (degrees, counter-clockwise from +x) and distance ``r`` sits at
  ``r * (cos e cos a, cos e sin a, sin e)`` and looks at the origin;
* camera-to-world matrices are 4x4 in the OpenGL convention (camera x right, y up,
  looking down -z);
* pixel (row i, col j) has its centre at (j + 0.5, i + 0.5); ``fovy`` is the vertical field
  of view; pixels are square.
* the reference view is elevation 0 (polar 90), azimuth 0, distance 1 by default.

:class:`Camera` is the one camera record (pose, field of view, image size, where on the sphere it sits)
that the builders render the coarse stage from and the exporters bake and check their files with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Number = Union[float, int, Tensor]


@dataclass
class Camera:
    """One pinhole camera: ``c2w`` (4 4, OpenGL), vertical ``fovy`` (degrees), image ``height`` x ``width``,
    and its place on the sphere (``elevation``, ``azimuth`` in degrees, ``distance``); ``name`` labels it in
    reports, ``is_reference`` marks the reference view."""

    c2w: Tensor  # 4 4
    fovy: float  # degrees
    height: int
    width: int
    elevation: float = 0.0
    azimuth: float = 0.0
    distance: float = 0.0
    name: str = ""
    is_reference: bool = False

    @property
    def focal(self) -> float:
        """Focal length in pixels."""
        return float(focal_from_fovy(self.fovy, self.height))


def _t(x: Number, ref: Tensor = None) -> Tensor:
    if isinstance(x, Tensor):
        return x.float()
    return torch.tensor(float(x), dtype=torch.float32, device=None if ref is None else ref.device)


def _same_device(*xs: Number) -> Tuple[Tensor, ...]:
    """Numbers and tensors -> float tensors on the device of the first tensor among them (a Python number
    becomes a tensor there, not on the CPU: broadcasting a CPU tensor with a CUDA one fails)."""
    ref = next((x for x in xs if isinstance(x, Tensor)), None)
    return tuple(_t(x, ref).to(ref.device) if ref is not None else _t(x) for x in xs)


def camera_position(elevation_deg: Number, azimuth_deg: Number, distance: Number) -> Tensor:
    """(..., 3) camera centres for angles in degrees."""
    e, a, r = torch.broadcast_tensors(*_same_device(elevation_deg, azimuth_deg, distance))
    e, a = torch.deg2rad(e), torch.deg2rad(a)
    return torch.stack([r * torch.cos(e) * torch.cos(a), r * torch.cos(e) * torch.sin(a), r * torch.sin(e)], -1)


def look_at(eye: Tensor, center: Tensor = None, up: Tensor = None) -> Tensor:
    """(..., 3) eyes -> (..., 4, 4) OpenGL camera-to-world matrices looking at ``center`` (default origin)."""
    eye = eye.float()
    if center is None:
        center = torch.zeros_like(eye)
    if up is None:
        up = torch.tensor([0.0, 0.0, 1.0], device=eye.device).expand_as(eye)
    forward = F.normalize(center - eye, dim=-1)
    right = torch.cross(forward, up, dim=-1)
    # looking straight up or down: pick another up vector
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    alt = torch.tensor([0.0, 1.0, 0.0], device=eye.device).expand_as(eye)
    right = torch.where(degenerate, torch.cross(forward, alt, dim=-1), right)
    right = F.normalize(right, dim=-1)
    cam_up = torch.cross(right, forward, dim=-1)
    c2w = torch.zeros(*eye.shape[:-1], 4, 4, device=eye.device)
    c2w[..., :3, 0] = right
    c2w[..., :3, 1] = cam_up
    c2w[..., :3, 2] = -forward
    c2w[..., :3, 3] = eye
    c2w[..., 3, 3] = 1.0
    return c2w


def spherical_c2w(elevation_deg: Number, azimuth_deg: Number, distance: Number) -> Tensor:
    """(..., 4, 4) camera-to-world for cameras on a sphere looking at the origin."""
    return look_at(camera_position(elevation_deg, azimuth_deg, distance))


def focal_from_fovy(fovy_deg: Number, height: int) -> Tensor:
    return 0.5 * height / torch.tan(torch.deg2rad(_t(fovy_deg)) / 2)


def ray_directions(height: int, width: int, fovy_deg: Number, device=None) -> Tensor:
    """(H, W, 3) camera-space directions (z = -1) through pixel centres."""
    f = focal_from_fovy(fovy_deg, height).to(device)
    j = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    i = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    ii, jj = torch.meshgrid(i, j, indexing="ij")
    return torch.stack([(jj - width / 2) / f, -(ii - height / 2) / f, -torch.ones_like(ii)], -1)


def get_rays(c2w: Tensor, height: int, width: int, fovy_deg: Number, normalize: bool = True) -> Tuple[Tensor, Tensor]:
    """c2w (B, 4, 4), fovy (B,) or scalar -> rays_o, rays_d each (B, H, W, 3) in world space."""
    squeeze = c2w.dim() == 2
    if squeeze:
        c2w = c2w[None]
    fov = _t(fovy_deg).to(c2w.device).reshape(-1)
    if fov.numel() == 1:
        fov = fov.expand(c2w.shape[0])
    dirs = torch.stack([ray_directions(height, width, fv, c2w.device) for fv in fov])  # B H W 3
    rays_d = torch.einsum("bij,bhwj->bhwi", c2w[:, :3, :3], dirs)
    if normalize:
        rays_d = F.normalize(rays_d, dim=-1)
    rays_o = c2w[:, None, None, :3, 3].expand_as(rays_d)
    if squeeze:
        return rays_o[0], rays_d[0]
    return rays_o, rays_d


def world_to_camera(points: Tensor, c2w: Tensor) -> Tensor:
    """(N, 3) world points -> (N, 3) camera-space points (OpenGL: visible points have z < 0)."""
    w2c = torch.linalg.inv_ex(c2w.float()).inverse  # inv_ex: no host-side singularity check (a sync on CUDA)
    return points @ w2c[:3, :3].T + w2c[:3, 3]


def project(points: Tensor, c2w: Tensor, fovy_deg: Number, height: int, width: int) -> Tuple[Tensor, Tensor]:
    """(N, 3) world points -> pixel coordinates (N, 2) as (x = col, y = row), continuous
    (a point projecting to pixel (i, j)'s centre gives (j + 0.5, i + 0.5)), and depth (N,)
    = distance along the viewing axis (positive in front of the camera)."""
    cam = world_to_camera(points, c2w)
    depth = -cam[:, 2]
    f = focal_from_fovy(fovy_deg, height).to(points.device)
    safe = torch.where(depth.abs() < 1e-8, torch.full_like(depth, 1e-8), depth)
    x = cam[:, 0] / safe * f + width / 2
    y = -cam[:, 1] / safe * f + height / 2
    return torch.stack([x, y], -1), depth


def unproject(depth: Tensor, c2w: Tensor, fovy_deg: Number) -> Tensor:
    """(H, W) depth along the viewing axis -> (H, W, 3) world points (inverse of :func:`project`)."""
    h, w = depth.shape[-2:]
    dirs = ray_directions(h, w, fovy_deg, depth.device)  # z = -1, so scaling by depth gives the point
    cam = dirs * depth[..., None]
    return cam @ c2w[:3, :3].T + c2w[:3, 3]


def relative_camera(elev_ref: Tensor, azim_ref: Tensor, dist_ref: Tensor,
                    elev: Tensor, azim: Tensor, dist: Tensor) -> Tensor:
    """Zero-1-to-3 relative camera ``[d_polar, sin d_azimuth, cos d_azimuth, d_radius]`` (radians),
    polar = 90 - elevation. Shapes broadcast to (B, 4)."""
    elev, azim, dist, elev_ref, azim_ref, dist_ref = _same_device(elev, azim, dist, elev_ref, azim_ref, dist_ref)
    d_polar = torch.deg2rad((90 - elev) - (90 - elev_ref))
    d_az = torch.deg2rad(azim - azim_ref)
    d_r = dist - dist_ref
    d_polar, d_az, d_r = torch.broadcast_tensors(d_polar, d_az, d_r)
    return torch.stack([d_polar, torch.sin(d_az), torch.cos(d_az), d_r], -1)


def angle_from_view(elev: Tensor, azim: Tensor, elev_ref: Number = 0.0, azim_ref: Number = 0.0) -> Tensor:
    """Angle in degrees between the view directions of two cameras on the sphere (0..180)."""
    a = F.normalize(camera_position(elev, azim, 1.0), dim=-1)
    b = F.normalize(camera_position(elev_ref, azim_ref, 1.0), dim=-1).to(a.device)
    return torch.rad2deg(torch.arccos((a * b).sum(-1).clamp(-1, 1)))


def cameras_around(elevations: Sequence[float], azimuths: Sequence[float], azimuth0: float, distance: float,
                   fovy: float, height: int, width: int, device=None) -> List[Camera]:
    """A :class:`Camera` at every (elevation, ``azimuth0`` + azimuth) pair, elevations first (elevations absolute,
    azimuths relative to ``azimuth0``, degrees), ``distance`` from the origin and looking at it, named
    ``el<e>_az<a>``: the builders' build views and the exporters' bake and check views around the reference."""
    out = []
    for e in elevations:
        for a in azimuths:
            az = azimuth0 + float(a)
            c2w = spherical_c2w(float(e), az, distance)
            out.append(Camera(c2w if device is None else c2w.to(device), fovy, height, width, float(e), az, distance,
                              f"el{float(e):g}_az{float(a):g}"))
    return out


def orbit_views(n_views: int, elevation: float, distance: float, fovy: float,
                start_azimuth: float = 0.0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """A 360° orbit of ``n_views`` cameras whose first is at ``start_azimuth`` (the reference view) ->
    (elevations, azimuths wrapped to [-180, 180), distances, fovys), each (N,) in degrees / scene units."""
    az = start_azimuth + torch.arange(n_views, dtype=torch.float32) * 360.0 / max(n_views, 1)
    az = torch.remainder(az + 180.0, 360.0) - 180.0
    full = lambda v: torch.full_like(az, float(v))  # noqa: E731
    return full(elevation), az, full(distance), full(fovy)
