"""Shared machinery of implicit (density-field) geometries: bounds, normals from the density
gradient, and isosurface extraction by marching cubes. Not registered itself."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..core.base import BaseGeometry
from ..core.errors import It3dError
from ..core.typing import Float, Int, Tensor
from ..encodings.hash_grid import own_input_gradient


AUTO_THRESHOLD_CAP = 10.0  # Make-It-3D main.py: --density_thresh default 10


class BaseImplicitGeometry(BaseGeometry):
    """Subclasses define ``radius`` (scene bound: the box [-radius, radius]^3), ``forward_raw(points,
    twice_differentiable) -> (raw density N 1 before activation, raw features N C)``,
    ``activate_density(raw) -> density`` and ``activate_features(raw) -> features``."""

    radius: float
    normal_type: str = "analytic"
    finite_difference_eps: float = 5.0e-3
    isosurface_chunk_size: int = 262144

    # ------------------------------------------------------------------ to implement
    def forward_raw(self, points: Tensor, twice_differentiable: bool = False) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def activate_density(self, raw: Tensor) -> Tensor:
        raise NotImplementedError

    def activate_features(self, raw: Tensor) -> Tensor:
        return raw

    # ------------------------------------------------------------------ helpers
    def normalize_points(self, points: Float[Tensor, "N 3"]) -> Float[Tensor, "N 3"]:
        """World points in [-radius, radius]^3 -> [0, 1]^3 (the encodings' input range)."""
        return (points + self.radius) / (2.0 * self.radius)

    def forward(self, points: Float[Tensor, "N 3"], output_normal: bool = False,
                normal_grad: Optional[bool] = None) -> dict:
        """-> ``density`` (N 1, >= 0), ``features`` (N 3, albedo in [0, 1]) and, when asked,
        ``normal`` (N 3, unit, outward = -grad density).

        ``normal_grad``: whether gradients must flow through the normals (a normal loss is on, or the
        shading should train the surface orientation); None = in training with autograd on. Analytic
        normals build the second-order graph (``create_graph``) only then -- otherwise the density
        gradient is taken once and the normals are constants of the step; finite differences evaluate
        their six shifted points with a graph only then."""
        grad_on = torch.is_grad_enabled()
        normal_grad = (self.training if normal_grad is None else bool(normal_grad)) and grad_on
        if output_normal and self.normal_type == "analytic":
            # autograd also under no_grad / inference_mode (Lightning's validation and test loops)
            with torch.inference_mode(False), torch.enable_grad():
                own = not points.requires_grad  # a leaf of our own: its .grad is never read
                pts = points.clone().requires_grad_(True) if own else points
                with own_input_gradient() if own else nullcontext():
                    raw_d, raw_f = self.forward_raw(pts, twice_differentiable=normal_grad)
                    # the density's own graph is kept when the step back-propagates through it (first order)
                    grad = torch.autograd.grad(raw_d.sum(), pts, create_graph=normal_grad,
                                               retain_graph=normal_grad or grad_on)[0]
            if not grad_on:
                raw_d, raw_f = raw_d.detach(), raw_f.detach()
            normal = -F.normalize(grad if normal_grad else grad.detach(), dim=-1)
        else:
            raw_d, raw_f = self.forward_raw(points)
            normal = None
            if output_normal:
                with torch.set_grad_enabled(normal_grad):
                    normal = self.finite_difference_normal(points)
        out = {"density": self.activate_density(raw_d), "features": self.activate_features(raw_f)}
        if normal is not None:
            out["normal"] = normal
        return out

    def forward_density(self, points: Float[Tensor, "N 3"]) -> Float[Tensor, "N 1"]:
        return self.activate_density(self.forward_raw(points)[0])

    def finite_difference_normal(self, points: Float[Tensor, "N 3"]) -> Float[Tensor, "N 3"]:
        """Central differences of the raw (pre-activation) density with step ``finite_difference_eps``."""
        eps = self.finite_difference_eps
        offsets = torch.eye(3, device=points.device, dtype=points.dtype) * eps
        shifted = torch.cat([points[:, None, :] + offsets[None], points[:, None, :] - offsets[None]], 1)  # N 6 3
        raw = self.forward_raw(shifted.reshape(-1, 3))[0].reshape(-1, 6)
        grad = (raw[:, :3] - raw[:, 3:]) / (2 * eps)
        return -F.normalize(grad, dim=-1)

    # ------------------------------------------------------------------ isosurface
    @torch.no_grad()
    def density_grid(self, resolution: int) -> Float[Tensor, "R R R"]:
        """Density at ``resolution^3`` points spanning [-radius, radius]^3 (index order x, y, z)."""
        device = next(iter(self.parameters())).device if any(True for _ in self.parameters()) else torch.device("cpu")
        lin = torch.linspace(-self.radius, self.radius, resolution, device=device)
        xx, yy, zz = torch.meshgrid(lin, lin, lin, indexing="ij")
        pts = torch.stack([xx, yy, zz], -1).reshape(-1, 3)
        vals = [self.forward_density(c)[:, 0] for c in torch.split(pts, self.isosurface_chunk_size)]
        return torch.cat(vals).reshape(resolution, resolution, resolution)

    @torch.no_grad()
    def isosurface(self, resolution: int = 128, threshold: Union[str, float] = "auto") -> Tuple[
            Float[Tensor, "V 3"], Int[Tensor, "F 3"]]:
        """Marching cubes of the activated density at ``threshold`` -> (vertices V 3 float32 world
        coordinates, faces F 3 int64, counter-clockwise seen from outside).

        ``threshold="auto"``: Make-It-3D's rule, ``min(mean density over the grid, 10)`` (official
        ``nerf/renderer.py`` ``export_mesh``: ``min(self.mean_density, self.density_thresh)`` with
        ``--density_thresh`` 10 in ``main.py``; their mean is over the 128^3 occupancy grid, ours over the
        extraction grid). The grid is padded with a layer below the threshold so the mesh is closed
        inside the scene bound."""
        from skimage import measure

        grid = self.density_grid(resolution).float()
        eps = 1.0e-5
        if not torch.isfinite(grid).all():
            raise It3dError("isosurface: the density field has non-finite values (diverged training?)")
        if threshold == "auto":
            if not bool((grid > eps).any()):
                raise It3dError("isosurface: the density field is empty (all densities <= 1e-5); nothing to extract")
            level = min(float(grid.clamp_min(0).mean()), AUTO_THRESHOLD_CAP)
        else:
            level = float(threshold)
        lo, hi = float(grid.min()), float(grid.max())
        if not lo < level < hi:
            raise It3dError(
                f"isosurface: threshold {level:.4g} is outside the density range [{lo:.4g}, {hi:.4g}] of the field "
                f"at resolution {resolution}; choose a threshold inside it (or 'auto')")
        vol = F.pad(grid[None, None], (1, 1, 1, 1, 1, 1), value=min(lo, level) - 1.0)[0, 0].cpu().numpy()
        verts, faces, _, _ = measure.marching_cubes(vol, level=level, gradient_direction="descent")
        step = 2.0 * self.radius / (resolution - 1)
        verts = (verts - 1.0) * step - self.radius
        faces = faces.astype(np.int64)
        v = torch.from_numpy(np.ascontiguousarray(verts, dtype=np.float32))
        f = torch.from_numpy(np.ascontiguousarray(faces))
        if _signed_volume(v, f) < 0:  # make the winding counter-clockwise seen from outside
            f = f[:, [0, 2, 1]].contiguous()
        return v, f


def _signed_volume(v: Tensor, f: Tensor) -> float:
    a, b, c = v[f[:, 0]].double(), v[f[:, 1]].double(), v[f[:, 2]].double()
    return float((a * torch.cross(b, c, dim=-1)).sum() / 6.0)
