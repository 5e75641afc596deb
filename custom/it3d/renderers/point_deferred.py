"""Deferred point renderer (Make-It-3D sec 3.3 / B.2): the point cloud's descriptors are
rasterized at ``num_scales`` resolutions (H, ceil(H/2), ceil(H/4), ...), each map is
up-sampled to H x W, and a gated-convolution U-Net turns their concatenation into RGB.

* Empty pixels (and the transmittance left behind the last point) take a learnable
  background descriptor — declared and actually composited here (the official code declares
  one and never uses it). Its RGB channels start white and its other channels at
  ``bg_feature_init`` (1), far from the points' (~0), so from the first step the U-Net can tell
  empty and partly covered pixels apart (with 0 the silhouette took ~3x more steps to fit).
* ``rgb_skip`` (default on): the U-Net predicts a correction added to the composited first
  three descriptor channels (which start as the points' colours), and its last layer starts
  at zero, so the first render is the plain coloured point cloud; off: ``sigmoid(U-Net)``.
* The point radius is in pixels at full resolution; at a coarser scale it is scaled with the
  image (same size in the world) but never below ``min_radius`` so every point still reaches
  the pixel it falls in.
* No host sync in training: the (pixel, point) pairs of each scale are gathered into a buffer of
  fixed size (:mod:`.sample_buffers`), all candidate pairs until measured, then every
  ``resize_every`` training steps ``fragment_capacity_margin`` x the largest fraction measured
  since (one host read then). Pairs past it are left out and reported by a warning at the next
  resize, which enlarges the buffer. ``fragment_capacity_margin``: ``auto`` = 1.25 on an
  accelerator, exact on CPU tensors; ``0`` = exact everywhere (one sync per scale); eval renders
  always size exactly.
* The U-Net runs under autocast in the run's half dtype (``unet_precision: auto``: fp16 on CUDA,
  bf16 with ``precision=bf16``, fp32 on CPU by default; its weights stay fp32) and, off the CPU, in
  the channels_last memory format (``channels_last: auto``), the layout tensor cores read directly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.base import BaseRenderer
from ..core.errors import It3dError
from ..core.ranges import unbounded
from ..core.registry import register
from ..core.typing import Float, Tensor
from .gated_unet import GatedUNet
from .point_rasterizer import composite, project_points, rasterize_projected, scale_coords
from .sample_buffers import CompactionBuffers


def scale_sizes(height: int, width: int, num_scales: int) -> List[tuple]:
    """[(H, W), (ceil(H/2), ceil(W/2)), (ceil(H/4), ceil(W/4)), ...]."""
    return [(-(-height // 2 ** s), -(-width // 2 ** s)) for s in range(num_scales)]


@register("point-deferred", kind="renderer")
class PointDeferredRenderer(BaseRenderer):
    @dataclass
    class Config:
        radius: float = 1.5  # point radius in pixels at full resolution
        min_radius: float = 0.75  # lower bound of the radius at coarser scales (pixels)
        points_per_pixel: int = 8
        num_scales: int = 3
        backend: str = "torch"  # torch | pytorch3d | auto (pytorch3d on CUDA when installed)
        unet_channels: List[int] = field(default_factory=lambda: [32, 64, 128, 256])
        rgb_skip: bool = True
        bg_init: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # RGB of the background descriptor
        bg_feature_init: float = 1.0  # its other channels (the points' start near 0): empty pixels stand out
        fragment_capacity_margin: Any = "auto"  # pair buffer / peak fraction: auto (exact on CPU, 1.25 else) | 0 | >= 1
        resize_every: int = 16  # training steps between buffer resizes (one host read each)
        # the U-Net's compute dtype: auto = the run's half dtype (precision; fp16 on CUDA, fp32 on CPU) under
        # autocast (fp32 weights, trained as such) | fp32 | fp16 | bf16
        unet_precision: str = "auto"
        channels_last: Any = unbounded("auto")  # the U-Net's memory format: auto = channels_last off the CPU | true | false

    cfg: Config

    def configure(self, geometry=None, **kwargs) -> None:
        if geometry is None:
            raise It3dError("point-deferred renderer needs the point-cloud geometry (geometry=...)")
        if self.cfg.backend not in ("torch", "pytorch3d", "auto"):
            raise It3dError(f"system.renderer.backend: unknown backend '{self.cfg.backend}' (torch, pytorch3d, auto)")
        if self.cfg.num_scales < 1:
            raise It3dError("system.renderer.num_scales must be >= 1")
        c = self.cfg
        if c.unet_precision not in ("auto", "fp32", "fp16", "bf16"):
            raise It3dError(f"system.renderer.unet_precision: expected auto, fp32, fp16 or bf16, got '{c.unet_precision}'")
        if str(c.channels_last).lower() not in ("auto", "true", "false"):
            raise It3dError(f"system.renderer.channels_last: expected auto, true or false, got '{c.channels_last}'")
        if c.resize_every < 1:
            raise It3dError(f"system.renderer.resize_every must be >= 1, got {c.resize_every}")
        self.sample_buffers = CompactionBuffers(c.fragment_capacity_margin, "point fragments",
                                                "left out of their pixels", "system.renderer.fragment_capacity_margin",
                                                auto_margin=1.25)
        self._last_resize = -1
        self._geometry = [geometry]  # a list: not a sub-module (the system owns it; no duplicate parameters)
        dim = geometry.cfg.descriptor_dim
        bg = torch.zeros(dim)
        bg[:3] = torch.tensor(self.cfg.bg_init, dtype=torch.float32)
        bg[3:] = self.cfg.bg_feature_init
        self.background = nn.Parameter(bg)
        self.unet = GatedUNet(dim * self.cfg.num_scales, 3, self.cfg.unet_channels, zero_init_output=self.cfg.rgb_skip)

    @property
    def geometry(self):
        return self._geometry[0]

    def unet_dtype(self, device: torch.device) -> Optional[torch.dtype]:
        """The U-Net's autocast dtype on ``device``, or None (fp32)."""
        from ..core import hub

        name = self.cfg.unet_precision
        dtype = hub.autocast_dtype(device) if name == "auto" else hub.resolve_dtype(name, device)
        return dtype if dtype in (torch.float16, torch.bfloat16) else None

    def run_unet(self, x: Float[Tensor, "B C H W"]) -> Float[Tensor, "B 3 H W"]:
        """The U-Net in its compute dtype (autocast; fp32 out) and memory format."""
        mode = str(self.cfg.channels_last).lower()
        if mode == "true" or (mode == "auto" and x.device.type != "cpu"):
            if not getattr(self, "_channels_last", False):
                self.unet.to(memory_format=torch.channels_last)
                self._channels_last = True
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = self.unet_dtype(x.device)
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return self.unet(x).float()

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        if not self.training or on_load_weights or global_step % self.cfg.resize_every or global_step == self._last_resize:
            return
        self._last_resize = global_step
        msg = self.sample_buffers.resize()
        if msg:
            logging.getLogger("it3d").warning(f"point renderer: {msg}")

    def forward(self, c2w: Float[Tensor, "B 4 4"], fovy: Union[Float[Tensor, "B"], float], height: int, width: int,
                bg_color: Optional[Float[Tensor, "3"]] = None, **kwargs: Any) -> Dict[str, Any]:
        """Render B views. ``bg_color``: when given, pixels that no point reaches are set to it.

        Returns ``comp_rgb`` (B H W 3), ``opacity`` (B H W 1, occupancy: 1 where a point reaches the
        pixel), ``alpha`` (B H W 1, composited point alpha), ``depth`` (B H W 1, depth of the nearest
        point, 0 where empty), ``features`` (list over scales of B h w C composited descriptors).
        """
        geo = self.geometry
        if geo.num_points == 0:
            raise It3dError("point-deferred renderer: the point cloud is empty (build it or load a checkpoint)")
        if torch.is_tensor(fovy):
            fovy = fovy.to(device=c2w.device, dtype=torch.float32).reshape(-1).expand(c2w.shape[0])
        else:  # filled on the device: no upload of a Python number per call
            fovy = torch.full((c2w.shape[0],), float(fovy), dtype=torch.float32, device=c2w.device)
        xy, z = project_points(geo.positions, c2w, fovy, height, width)
        feats, ups = [], []
        opacity = alpha = depth = None
        for s, (h, w) in enumerate(scale_sizes(height, width, self.cfg.num_scales)):
            r = self.cfg.radius if s == 0 else max(self.cfg.radius * h / height, self.cfg.min_radius)
            frags = rasterize_projected(scale_coords(xy, height, width, h, w), z, h, w, r,
                                        self.cfg.points_per_pixel, self.cfg.backend,
                                        buffers=self.sample_buffers if self.training else None, key=f"scale{s}")
            fmap, a, occ = composite(frags, geo.descriptors, r, self.background)
            feats.append(fmap)
            up = fmap.permute(0, 3, 1, 2)
            if (h, w) != (height, width):
                up = F.interpolate(up, size=(height, width), mode="bilinear", align_corners=False)
            ups.append(up)
            if s == 0:
                opacity, alpha = occ, a
                d = frags.depth[..., :1]
                depth = torch.where(torch.isfinite(d), d, torch.zeros_like(d))
        out = self.run_unet(torch.cat(ups, 1)).permute(0, 2, 3, 1)
        if self.cfg.rgb_skip:
            rgb = (feats[0][..., :3] + out).clamp(0.0, 1.0)
        else:
            rgb = torch.sigmoid(out)
        if bg_color is not None:
            rgb = torch.where(opacity > 0.5, rgb, bg_color.to(rgb).expand_as(rgb))
        return {"comp_rgb": rgb, "opacity": opacity, "alpha": alpha, "depth": depth, "features": feats}
