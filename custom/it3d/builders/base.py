"""Shared machinery of the point-cloud builders (kind "builder").

A builder turns a trained coarse stage into the refine stage's starting point cloud:
``builder.build(coarse, reference) -> {"positions" N 3, "colors" N 3 in [0, 1], "is_ref" N bool}``
(plus ``"view"`` N int64: -1 for points coloured from the reference image, ``v`` for points
taken from build view ``v``, -2 for points coloured by nearest-neighbour fill).

Build views: the reference camera plus ``len(elevations) * len(azimuths)`` novel cameras on the
reference camera's sphere (elevation absolute, azimuth relative to the reference azimuth),
processed nearest-to-the-reference first.

Visible surface layer (used by both builders). For a view with z-depth map ``D`` (along the
camera axis), foreground ``M`` and focal ``f`` (pixels), a point ``p`` projecting (depth ``z``)
into pixel ``q = floor(projection)`` is *on the view's visible layer* iff ``M[q]`` and
``|z - D[q]| <= tau[q]`` with ``tau = depth_tol * D + 0.75 * min(s, max_slope) * D / f`` where
``s = |grad D| * f / D`` is the surface slope (tan of the slant angle: 1 = 45 degrees) measured with
one-sided differences over foreground neighbours, the smaller of the two sides per axis (so a
depth discontinuity next to a pixel does not widen its tolerance). The second term absorbs the
depth change across the half pixel between ``p``'s projection and the pixel centre.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

from ..core import cameras
from ..core.base import BaseBuilder
from ..core.cameras import Camera
from ..core.errors import It3dError
from ..core.typing import Bool, Float, Tensor
from .enhance import EnhanceConfig, Img2ImgEnhancer, SamMaskUnion, SamUnionConfig


@dataclass
class View:
    """One rendered build view: ``rgb`` H W 3 (object colour), ``depth`` H W (z-depth along the camera
    axis), ``mask`` H W bool (rendered opacity > threshold, maybe united with SAM)."""

    camera: Camera
    rgb: Tensor
    depth: Tensor
    mask: Tensor
    angle: float = 0.0  # degrees between this view's direction and the reference view's
    sam_applied: bool = False


# ----------------------------------------------------------------------------- geometry helpers
def pixel_of(points: Float[Tensor, "N 3"], cam: Camera) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Project points into ``cam``: (row i, col j) of the pixel each lands in, its depth and whether
    it lands inside the image in front of the camera. i, j are clamped to the image for indexing."""
    uv, z = cameras.project(points, cam.c2w.to(points), cam.fovy, cam.height, cam.width)
    j = torch.floor(uv[:, 0]).long()
    i = torch.floor(uv[:, 1]).long()
    inside = (z > 0) & (i >= 0) & (i < cam.height) & (j >= 0) & (j < cam.width)
    return i.clamp(0, cam.height - 1), j.clamp(0, cam.width - 1), z, inside


def depth_slope(depth: Float[Tensor, "H W"], mask: Bool[Tensor, "H W"], focal: float,
                reduce: str = "max") -> Float[Tensor, "H W"]:
    """Surface slope ``|grad D| * f / D`` (tan of the slant angle) with one-sided differences over
    foreground neighbours, per axis the larger (``reduce="max"``: finds depth edges) or the smaller
    (``"min"``: the local surface slope, blind to a discontinuity on one side) of the two sides;
    a side without a foreground neighbour does not count (0 when neither has one); 0 on background."""
    d = torch.where(mask, depth, torch.zeros_like(depth))
    dp = F.pad(d[None, None], (1, 1, 1, 1), mode="replicate")[0, 0]
    mp = F.pad(mask[None, None].float(), (1, 1, 1, 1))[0, 0] > 0.5
    c = dp[1:-1, 1:-1]

    def side(di: int, dj: int) -> Tuple[Tensor, Tensor]:
        h, w = d.shape
        nb = dp[1 + di:1 + di + h, 1 + dj:1 + dj + w]
        ok = mp[1 + di:1 + di + h, 1 + dj:1 + dj + w] & mask
        return (nb - c).abs(), ok

    def axis(a: Tuple[Tensor, Tensor], b: Tuple[Tensor, Tensor]) -> Tensor:
        (ga, oka), (gb, okb) = a, b
        zero = torch.zeros_like(ga)
        ga0, gb0 = torch.where(oka, ga, zero), torch.where(okb, gb, zero)
        if reduce == "max":
            return torch.maximum(ga0, gb0)
        both = torch.minimum(ga, gb)
        return torch.where(oka & okb, both, torch.maximum(ga0, gb0))

    gx = axis(side(0, 1), side(0, -1))
    gy = axis(side(1, 0), side(-1, 0))
    slope = torch.sqrt(gx * gx + gy * gy) * focal / d.clamp_min(1e-8)
    return torch.where(mask, slope, torch.zeros_like(slope))


def layer_slack(depth: Float[Tensor, "H W"], slope: Float[Tensor, "H W"], focal: float, depth_tol: float,
                max_slope: float, pixels: float = 0.75) -> Float[Tensor, "H W"]:
    """Depth tolerance ``tau`` of the visible-layer test (module docstring); ``pixels`` is how far (in
    pixels) a point may sit from the pixel centre whose depth it is compared with."""
    return depth_tol * depth + pixels * slope.clamp_max(max_slope) * depth / focal


def on_visible_layer(points: Float[Tensor, "N 3"], cam: Camera, depth: Float[Tensor, "H W"], mask: Bool[Tensor, "H W"],
                     depth_tol: float, max_slope: float, pixels: float = 0.75) -> Tuple[Tensor, Tensor, Tensor]:
    """(visible N bool, row i N, col j N): which points lie on the view's visible surface layer."""
    i, j, z, inside = pixel_of(points, cam)
    slack = layer_slack(depth, depth_slope(depth, mask, cam.focal, "min"), cam.focal, depth_tol, max_slope, pixels)
    vis = inside & mask[i, j] & ((z - depth[i, j]).abs() <= slack[i, j])
    return vis, i, j


def point_zbuffer(points: Float[Tensor, "N 3"], cam: Camera, radius: int = 0) -> Tuple[Tensor, Tensor]:
    """Nearest point depth per pixel (a point z-buffer; ``radius`` > 0 min-pools it over a
    (2r+1)^2 window to close gaps between samples) -> (depth H W, covered H W bool)."""
    i, j, z, inside = pixel_of(points, cam)
    flat = torch.full((cam.height * cam.width,), float("inf"), device=points.device)
    flat = flat.scatter_reduce(0, (i * cam.width + j)[inside], z[inside], reduce="amin")
    zb = flat.view(cam.height, cam.width)
    if radius > 0:
        zb = -F.max_pool2d(-zb[None, None], 2 * radius + 1, stride=1, padding=radius)[0, 0]
    covered = torch.isfinite(zb)
    return torch.where(covered, zb, torch.zeros_like(zb)), covered


def splat_disc(uv: Float[Tensor, "N 2"], height: int, width: int, radius: float) -> Bool[Tensor, "H W"]:
    """Pixels whose centre lies within ``radius`` pixels of one of the projections ``uv`` (x = col, y = row,
    continuous), plus the pixel each projection falls in."""
    j0, i0 = torch.floor(uv[:, 0]).long(), torch.floor(uv[:, 1]).long()
    m = torch.zeros(height * width, dtype=torch.bool, device=uv.device)
    k = int(math.ceil(radius))
    off = torch.arange(-k, k + 1, device=uv.device)
    for di in off.tolist():  # a loop over the (2k+1)^2 window offsets, not over points
        for dj in off.tolist():
            i, j = i0 + di, j0 + dj
            d2 = (j.float() + 0.5 - uv[:, 0]) ** 2 + (i.float() + 0.5 - uv[:, 1]) ** 2
            ok = (i >= 0) & (i < height) & (j >= 0) & (j < width) & ((d2 <= radius * radius) | ((di == 0) & (dj == 0)))
            m[(i * width + j)[ok]] = True
    return m.view(height, width)


# ----------------------------------------------------------------------------- base builder
class ViewBuilder(BaseBuilder):
    """Base of the builders: build cameras, rendering the coarse stage, optional img2img enhancement
    and SAM mask union of the novel views. Not registered itself."""

    @dataclass
    class Config:
        elevations: List[float] = field(default_factory=lambda: [0.0, 30.0, -20.0])  # degrees, absolute
        azimuths: List[float] = field(default_factory=lambda: [30.0 * k for k in range(1, 12)])  # relative to ref
        height: int = 0  # novel-view render size; 0 = the reference image's
        width: int = 0
        camera_distance: float = 0.0  # 0 = the reference camera's
        fovy: float = 0.0  # degrees; 0 = the reference camera's
        opacity_threshold: float = 0.5  # novel-view foreground: rendered opacity above this
        depth_is_ray_distance: bool = True  # renderer depth is t along the normalised ray (contract), not z
        normalize_depth: bool = True  # divide the expected depth by the opacity (depth of the surface hit)
        unblend_background: bool = True  # recover the object colour from comp_rgb = a * c + (1 - a) * white
        depth_tol: float = 0.01  # relative depth tolerance of the visible-layer test
        max_slope: float = 3.0  # cap of the slope term of the visible-layer test (tan 71.6 deg); steeper = unsure
        render_shading: str = "albedo"
        seed: int = 0
        enhance: EnhanceConfig = field(default_factory=EnhanceConfig)
        sam: SamUnionConfig = field(default_factory=SamUnionConfig)

    cfg: Config

    def configure(self, device: Any = "cpu", **kwargs) -> None:
        self.device = torch.device(device)
        self.enhancer = Img2ImgEnhancer(self.cfg.enhance, self.device) if self.cfg.enhance.enabled else None
        self.sam_union = SamMaskUnion(self.cfg.sam, self.device) if self.cfg.sam.enabled else None
        self.stats: Dict[str, Any] = {}

    # ------------------------------------------------------------------ cameras
    def start(self, reference: Dict[str, Any]) -> Camera:
        """Reset the stats, hand the caption to the enhancer; returns the reference camera."""
        self.stats = {}
        if self.enhancer is not None:
            self.enhancer.set_caption(str(reference.get("caption", "") or ""))
        return self.reference_camera(reference)

    def reference_camera(self, reference: Dict[str, Any]) -> Camera:
        for key in ("rgb", "mask", "c2w", "fovy"):
            if key not in reference:
                raise It3dError(f"{type(self).__name__}.build: the reference dict has no '{key}' "
                                "(expected the single-image datamodule's reference: rgb, mask, c2w, fovy)")
        _, h, w, _ = reference["rgb"].shape
        c2w = reference["c2w"].reshape(4, 4).float().to(self.device)
        eye = c2w[:3, 3]
        dist = float(reference["camera_distances"].reshape(-1)[0]) if "camera_distances" in reference \
            else float(eye.norm())
        if "elevation" in reference and "azimuth" in reference:
            elev = float(reference["elevation"].reshape(-1)[0])
            azim = float(reference["azimuth"].reshape(-1)[0])
        else:
            elev = math.degrees(math.asin(float(eye[2] / eye.norm().clamp_min(1e-8))))
            azim = math.degrees(math.atan2(float(eye[1]), float(eye[0])))
        return Camera(c2w, float(reference["fovy"].reshape(-1)[0]), h, w, elev, azim, dist, "reference", True)

    def novel_cameras(self, ref: Camera) -> List[Camera]:
        """The build views, sorted by angle from the reference view (nearest first; stable)."""
        h = self.cfg.height or ref.height
        w = self.cfg.width or ref.width
        dist = self.cfg.camera_distance or ref.distance
        fovy = self.cfg.fovy or ref.fovy
        cams = cameras.cameras_around(self.cfg.elevations, self.cfg.azimuths, ref.azimuth, dist, fovy, h, w,
                                      self.device)
        angles = [self.angle_to_reference(c, ref) for c in cams]
        order = sorted(range(len(cams)), key=lambda k: angles[k])
        return [cams[k] for k in order]

    @staticmethod
    def angle_to_reference(cam: Camera, ref: Camera) -> float:
        return float(cameras.angle_from_view(torch.tensor(cam.elevation), torch.tensor(cam.azimuth),
                                             ref.elevation, ref.azimuth))

    # ------------------------------------------------------------------ rendering
    @torch.no_grad()
    def render(self, coarse: Any, cam: Camera) -> View:
        """Render the coarse stage from ``cam``: object colour, opacity, z-depth, foreground mask."""
        white = torch.ones(3, device=self.device)
        out = coarse.render_view(cam.c2w, cam.fovy, cam.height, cam.width, shading=self.cfg.render_shading,
                                 bg_color=white, normals=False)
        for key in ("comp_rgb", "opacity", "depth"):
            if key not in out:
                raise It3dError(f"{type(self).__name__}: coarse.render_view returned no '{key}' "
                                f"(got {sorted(out)}); the builder needs comp_rgb, opacity and depth")
        rgb = out["comp_rgb"].reshape(cam.height, cam.width, 3).float().to(self.device)
        alpha = out["opacity"].reshape(cam.height, cam.width).float().to(self.device).clamp(0, 1)
        depth = out["depth"].reshape(cam.height, cam.width).float().to(self.device)
        mask = alpha > self.cfg.opacity_threshold
        safe_a = alpha.clamp_min(1e-6)
        if self.cfg.normalize_depth:
            depth = depth / safe_a
        if self.cfg.depth_is_ray_distance:  # t along the normalised ray -> distance along the camera axis
            dirs = cameras.ray_directions(cam.height, cam.width, cam.fovy, self.device)
            depth = depth / dirs.norm(dim=-1)
        depth = torch.where(mask, depth, torch.zeros_like(depth))
        if self.cfg.unblend_background:
            rgb = ((rgb - (1.0 - alpha[..., None])) / safe_a[..., None]).clamp(0, 1)
        rgb = torch.where(mask[..., None], rgb, torch.ones_like(rgb))
        return View(cam, rgb, depth, mask)

    def novel_view(self, coarse: Any, cam: Camera, ref: Camera) -> View:
        """Render a novel view, then enhance its image (img2img) and unite its mask with SAM's if enabled."""
        view = self.render(coarse, cam)
        view.angle = self.angle_to_reference(cam, ref)
        if self.enhancer is not None:
            view.rgb = self.enhancer(view.rgb[None], view.angle)[0]
        if self.sam_union is not None:
            view.mask, view.sam_applied, score = self.sam_union(view.rgb[None], view.mask)
            self.stats.setdefault("sam_applied", []).append(view.sam_applied)
            self.stats.setdefault("sam_scores", []).append(score)
        return view

    def reference_mask(self, reference: Dict[str, Any], cam: Camera) -> Tensor:
        return reference["mask"].reshape(cam.height, cam.width).to(self.device) > 0.5

    @staticmethod
    def pack(positions: Tensor, colors: Tensor, is_ref: Tensor, view: Tensor) -> Dict[str, Tensor]:
        return {"positions": positions.float().contiguous(), "colors": colors.float().clamp(0, 1).contiguous(),
                "is_ref": is_ref.bool(), "view": view.long()}

    def build(self, coarse: Any, reference: Dict[str, Any]) -> Dict[str, Tensor]:
        raise NotImplementedError

    def release(self) -> None:
        """Let go of the img2img pipeline and SAM (the refine system calls it once the cloud is built)."""
        for part in (self.enhancer, self.sam_union):
            if part is not None:
                part.release()
