"""A synthetic test scene made by the project: a striped ellipsoid resting on a box.

The scene is ray-cast analytically in torch, so every camera gives exact RGBA, depth and
normals. :func:`make_scene` writes the reference view as the datamodule's inputs:

* ``rgba.png``   8-bit RGBA (straight alpha, anti-aliased edges by 2x2 supersampling)
* ``depth.png``  16-bit grayscale, *disparity-like*: 0 = background; foreground values are
  ``1 + 65534 * (z_far - z) / (z_far - z_near)`` (linear in the true z-depth, near = bright) —
  the same "larger = nearer" convention as RealFusion15 / DPT maps, read by ``single-image``
  with ``depth_convention: disparity``.
* ``normal.png`` 8-bit RGB camera-space normals, OpenGL axes (x right, y up, z towards the
  viewer), encoded ``(n + 1) / 2 * 255``; background 0.
* ``depth.npy`` (optional) float32 true z-depth along the camera axis, 0 on background.

``python -m it3d.testing.scene load/synthetic [size]`` writes the example input in ``load/``.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

from ..core import cameras
from ..core import io
from ..core.typing import Float, Tensor


@dataclass
class SceneSpec:
    ellipsoid_center: tuple = (0.0, 0.0, 0.06)
    ellipsoid_radii: tuple = (0.22, 0.22, 0.26)
    box_center: tuple = (0.0, 0.0, -0.24)
    box_half: tuple = (0.2, 0.2, 0.06)
    light_dir: tuple = (0.6, 0.3, 0.75)
    # reference camera used by make_scene (the datamodule recentres the object anyway)
    elevation: float = 0.0
    azimuth: float = 0.0
    distance: float = 1.5
    fovy: float = 40.0


def _ellipsoid_hit(o, d, center, radii):
    c = torch.tensor(center, dtype=o.dtype)
    r = torch.tensor(radii, dtype=o.dtype)
    oc, ds = (o - c) / r, d / r
    a = (ds * ds).sum(-1)
    b = 2 * (oc * ds).sum(-1)
    cc = (oc * oc).sum(-1) - 1
    disc = b * b - 4 * a * cc
    t = (-b - disc.clamp_min(0).sqrt()) / (2 * a)
    t = torch.where((disc > 0) & (t > 0), t, torch.full_like(t, float("inf")))
    p = o + t[..., None] * d
    n = F.normalize((p - c) / (r * r), dim=-1)
    return t, p, n


def _box_hit(o, d, center, half):
    c = torch.tensor(center, dtype=o.dtype)
    h = torch.tensor(half, dtype=o.dtype)
    inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    t0, t1 = (c - h - o) * inv, (c + h - o) * inv
    tmin, tmax = torch.minimum(t0, t1), torch.maximum(t0, t1)
    tn, axis = tmin.max(-1)
    tf = tmax.min(-1).values
    hit = (tn <= tf) & (tn > 0)
    t = torch.where(hit, tn, torch.full_like(tn, float("inf")))
    n = F.one_hot(axis, 3).to(o.dtype) * -torch.sign(torch.gather(d, -1, axis[..., None]))
    return t, o + t[..., None] * d, n


def _albedo(p, which, spec: SceneSpec):
    c = torch.tensor(spec.ellipsoid_center, dtype=p.dtype)
    q = p - c
    phi = torch.atan2(q[..., 1], q[..., 0])
    zz = q[..., 2] / spec.ellipsoid_radii[2]
    ell = torch.stack([0.55 + 0.35 * torch.cos(3 * phi), 0.45 + 0.3 * torch.sin(2.5 * zz + 0.5), 0.65 - 0.25 * zz], -1)
    bx = p - torch.tensor(spec.box_center, dtype=p.dtype)
    box = torch.stack([0.85 + 0 * bx[..., 0], 0.45 + 0.5 * bx[..., 1], 0.2 + 0.5 * bx[..., 0]], -1)
    return torch.where(which[..., None], ell, box).clamp(0, 1)


def cast(rays_o: Float[Tensor, "*B 3"], rays_d: Float[Tensor, "*B 3"], spec: SceneSpec = SceneSpec()) -> Dict[str, Tensor]:
    """Ray-cast the scene: ``rgb`` (shaded albedo), ``mask``, ``t`` (inf on miss), ``normal`` (world)."""
    te, pe, ne = _ellipsoid_hit(rays_o, rays_d, spec.ellipsoid_center, spec.ellipsoid_radii)
    tb, pb, nb = _box_hit(rays_o, rays_d, spec.box_center, spec.box_half)
    is_ell = te <= tb
    t = torch.minimum(te, tb)
    p = torch.where(is_ell[..., None], pe, pb)
    n = torch.where(is_ell[..., None], ne, nb)
    mask = torch.isfinite(t)
    light = F.normalize(torch.tensor(spec.light_dir, dtype=p.dtype), dim=-1)
    shade = 0.75 + 0.25 * (n * light).sum(-1, keepdim=True).clamp_min(0)
    rgb = torch.where(mask[..., None], _albedo(p, is_ell, spec) * shade, torch.ones_like(p))
    return {"rgb": rgb, "mask": mask, "t": t, "normal": torch.where(mask[..., None], n, torch.zeros_like(n))}


def render_view(c2w: Float[Tensor, "4 4"], fovy_deg: float, height: int, width: int,
                spec: SceneSpec = SceneSpec(), supersample: int = 2) -> Dict[str, Tensor]:
    """Render one view: ``rgba`` H W 4 (anti-aliased), ``mask`` H W 1 (soft coverage), ``depth`` H W 1
    (z-depth along the camera axis, 0 on background), ``normal`` H W 3 (world), ``normal_cam`` H W 3."""
    s = supersample
    rays_o, rays_d = cameras.get_rays(c2w, height * s, width * s, fovy_deg)
    out = cast(rays_o.double(), rays_d.double(), spec)
    fwd = -c2w[:3, 2].double()
    z = out["t"] * (rays_d.double() * fwd).sum(-1)
    m = out["mask"].double()

    def pool(x):  # H*s W*s C -> H W C (mean over the s x s block)
        return F.avg_pool2d(x.permute(2, 0, 1)[None], s)[0].permute(1, 2, 0)

    cov = pool(m[..., None])
    rgb_pre = pool(out["rgb"] * m[..., None])
    safe = cov.clamp_min(1e-8)
    depth = pool(torch.where(out["mask"], z, torch.zeros_like(z))[..., None]) / safe
    normal = F.normalize(pool(out["normal"]), dim=-1) * (cov > 0)
    normal_cam = normal @ c2w[:3, :3].double()  # world -> camera (rotation transpose)
    rgb = rgb_pre / safe
    return {"rgba": torch.cat([rgb, cov], -1).float(), "mask": cov.float(), "depth": (depth * (cov > 0)).float(),
            "normal": normal.float(), "normal_cam": (normal_cam * (cov > 0)).float()}


def reference_camera(spec: SceneSpec = SceneSpec()) -> Tensor:
    return cameras.spherical_c2w(spec.elevation, spec.azimuth, spec.distance)


def encode_depth16(depth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """z-depth (0 = background) -> uint16 disparity-like map (near = bright, background 0)."""
    fg = mask & (depth > 0)
    out = np.zeros(depth.shape, np.uint16)
    if fg.any():
        lo, hi = depth[fg].min(), depth[fg].max()
        out[fg] = np.round(1 + 65534 * (hi - depth[fg]) / max(hi - lo, 1e-12)).astype(np.uint16)
    return out


def save_png16(path: str, arr: np.ndarray) -> str:
    from PIL import Image

    with io.atomic_path(path) as tmp:
        Image.fromarray(arr.astype(np.uint16)).save(tmp, format="PNG")
    return path


def make_scene(out_dir: str, size: int = 256, spec: SceneSpec = SceneSpec(), save_npy: bool = False) -> Dict[str, str]:
    """Write rgba.png, depth.png, normal.png (and depth.npy) of the reference view to ``out_dir``."""
    v = render_view(reference_camera(spec), spec.fovy, size, size, spec)
    mask = v["mask"][..., 0].numpy()
    paths = {
        "rgba": io.save_image(os.path.join(out_dir, "rgba.png"), v["rgba"]),
        "depth": save_png16(os.path.join(out_dir, "depth.png"), encode_depth16(v["depth"][..., 0].numpy(), mask > 0.5)),
        "normal": io.save_image(os.path.join(out_dir, "normal.png"), (v["normal_cam"] + 1) / 2 * (v["mask"] > 0.5)),
    }
    if save_npy:
        with io.atomic_path(os.path.join(out_dir, "depth.npy")) as tmp:
            np.save(tmp, v["depth"][..., 0].numpy())
        paths["depth_npy"] = os.path.join(out_dir, "depth.npy")
    return paths


if __name__ == "__main__":  # python -m it3d.testing.scene load/synthetic [size]
    out = sys.argv[1] if len(sys.argv) > 1 else "load/synthetic"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    for k, p in make_scene(out, n).items():
        print(f"{k}: {p}")
