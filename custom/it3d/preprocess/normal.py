"""``normal-from-depth``: camera-space normals from a depth map (the registered default normal estimator).

transformers has no normal-estimation model class on the hub that loads like the depth models,
so normals are derived from monocular depth: the depth-like map ``d`` in [0, 1] (larger =
farther, from the ``depth`` estimator or passed in) is placed at camera distance
``z = 1 + relief * 2 tan(fovy / 2) * d`` (``relief``: the foreground's depth range as a fraction
of the image height seen at unit distance), unprojected through the reference camera
(``fovy_deg``, pixel centres as in ``core.cameras``) and differentiated: ``n = normalize(dP/dcol x
dP/drow_up)``. Differences are central inside the mask and one-sided at its edge, so the
silhouette does not tilt the normals towards the background (pixels with no foreground neighbour
along an axis face the camera). Output: OpenGL camera space
(x right, y up, z towards the viewer), zeros outside the mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..core.base import BaseEstimator, build
from ..core.config import component
from ..core.registry import register
from ..core.typing import Bool, Float, Tensor
from ..core.cameras import ray_directions


def _diff(p: Float[Tensor, "H W 3"], fg: Bool[Tensor, "H W"], dim: int) -> Float[Tensor, "H W 3"]:
    """Derivative of ``p`` along ``dim`` (0 rows, 1 cols): central where both neighbours are foreground."""
    n = p.shape[dim]
    idx = torch.arange(n, device=p.device)
    nxt, prv = (idx + 1).clamp(max=n - 1), (idx - 1).clamp(min=0)
    p_n, p_p = p.index_select(dim, nxt), p.index_select(dim, prv)
    f_n, f_p = fg.index_select(dim, nxt) & fg, fg.index_select(dim, prv) & fg
    shape = [1, 1]
    shape[dim] = n
    at_end, at_start = (idx == n - 1).reshape(shape), (idx == 0).reshape(shape)
    f_n, f_p = f_n & ~at_end, f_p & ~at_start
    fwd, bwd, cen = p_n - p, p - p_p, (p_n - p_p) / 2
    out = torch.where((f_n & f_p)[..., None], cen, torch.where(f_n[..., None], fwd, bwd))
    return torch.where((f_n | f_p)[..., None], out, torch.zeros_like(out))


def normals_from_depth(depth: Float[Tensor, "1 H W 1"], fovy_deg: float, relief: float,
                       mask: Optional[Float[Tensor, "1 H W 1"]] = None) -> Float[Tensor, "1 H W 3"]:
    h, w = depth.shape[1:3]
    fg = torch.ones(h, w, dtype=torch.bool, device=depth.device) if mask is None else mask[0, ..., 0] > 0.5
    z = 1.0 + relief * 2.0 * math.tan(math.radians(fovy_deg) / 2.0) * depth[0, ..., 0].float()
    points = ray_directions(h, w, fovy_deg, device=depth.device) * z[..., None]  # camera space, z = -distance
    d_col = _diff(points, fg, 1)
    d_row_up = -_diff(points, fg, 0)  # rows grow downwards; y grows upwards
    n = torch.cross(d_col, d_row_up, dim=-1)
    facing = torch.tensor([0.0, 0.0, 1.0], device=n.device).expand_as(n)
    n = torch.where(n.norm(dim=-1, keepdim=True) > 1e-12, F.normalize(n, dim=-1), facing)  # 1-pixel-thin parts
    return torch.where(fg[..., None], n, torch.zeros_like(n))[None]


@register("normal-from-depth", kind="estimator")
class NormalFromDepth(BaseEstimator):
    @dataclass
    class Config:
        fovy_deg: float = 60.0  # the reference camera's vertical field of view (data.ref_fovy)
        relief: float = 0.5
        depth_type: str = component("estimator", "transformers-depth")  # used when no depth is passed
        depth: dict = field(default_factory=dict)

    def __init__(self, cfg: Any = None, path: str = "", **kwargs) -> None:
        self.cfg_path = path
        super().__init__(cfg, path, **kwargs)

    def configure(self, **kwargs) -> None:
        self._kwargs = kwargs
        self._depth = None
        self.n_calls = 0

    @property
    def depth_estimator(self):
        if self._depth is None:
            self._depth = build("estimator", self.cfg.depth_type, self.cfg.depth, f"{self.cfg_path}.depth",
                                **self._kwargs)
        return self._depth

    @torch.no_grad()
    def __call__(self, image: Float[Tensor, "1 H W 3"], mask: Optional[Float[Tensor, "1 H W 1"]] = None,
                 depth: Optional[Float[Tensor, "1 H W 1"]] = None) -> Float[Tensor, "1 H W 3"]:
        if depth is None:
            depth = self.depth_estimator(image, mask)
        self.n_calls += 1
        return normals_from_depth(depth, self.cfg.fovy_deg, self.cfg.relief, mask)
