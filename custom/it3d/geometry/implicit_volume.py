"""``implicit-volume``: a density + albedo field on a multi-resolution hash grid.

``density = act(mlp_density(enc(x)) + blob(x))`` with the Gaussian blob
``blob(x) = d * exp(-|x|^2 / (2 mu^2))`` (d = ``density_blob_scale`` = 5, mu = ``density_blob_std`` = 0.2,
world units; stable-dreamfusion / Make-It-3D's initialisation, threestudio's "blob_magic3d"),
``albedo = sigmoid(mlp_features(enc(x)))``. ``act`` is ``trunc_exp`` (exp whose gradient is
clamped at exp(15); Make-It-3D's choice, the default) or ``softplus``.

Scene bound: ``radius`` = 0.5, i.e. the box [-0.5, 0.5]^3. The reference camera sits at distance 1
(0.8 - 1.2 in the random views) with a vertical fov of 40 - 80 degrees: at distance 1 a 40 degree
view spans +-0.36 at the origin, so an object that fills the reference view fits in the box,
every camera at distance >= 0.87 (the box corner) is outside it, and the blob (1/e^2 radius 0.4)
sits well inside. A camera inside the box (distance 0.8 looking along a diagonal) is handled by
the renderer (near = max(near_plane, 0)).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Tuple

import torch
import torch.nn.functional as F

from ..core.config import ConfigError
from ..core.registry import register
from ..core.typing import Float, Tensor
from ..encodings.factory import build_encoding, make_mlp, validate_encoding
from .base_implicit import BaseImplicitGeometry


class _TruncExp(torch.autograd.Function):
    """exp(x) whose gradient uses exp(min(x, 15)) (Instant-NGP / stable-dreamfusion); the backward
    is made of differentiable ops, so analytic normals can be trained (double backward)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: Tensor) -> Tensor:
    return _TruncExp.apply(x)


DENSITY_ACTIVATIONS = {
    "trunc_exp": trunc_exp,
    "exp": torch.exp,
    "softplus": F.softplus,
    "relu": F.relu,
}


def _default_encoding() -> dict:
    return {"otype": "HashGrid", "n_levels": 16, "n_features_per_level": 2, "log2_hashmap_size": 19,
            "base_resolution": 16, "max_resolution": 2048, "backend": "auto"}


@register("implicit-volume", kind="geometry")
class ImplicitVolume(BaseImplicitGeometry):
    @dataclass
    class Config:
        radius: float = 0.5
        pos_encoding: dict = field(default_factory=_default_encoding)
        mlp_n_neurons: int = 64
        mlp_n_layers: int = 3  # linear layers (2 hidden layers of mlp_n_neurons)
        mlp_activation: str = "relu"
        n_feature_dims: int = 3
        density_activation: str = "trunc_exp"  # trunc_exp | softplus | exp | relu
        density_bias: str = "blob"  # blob | none
        density_blob_scale: float = 5.0
        density_blob_std: float = 0.2
        normal_type: str = "analytic"  # analytic | finite_difference
        finite_difference_eps: float = 5.0e-3  # world units
        isosurface_resolution: int = 128
        isosurface_threshold: Any = "auto"  # "auto": min(mean density, 10) (Make-It-3D) | a density value
        isosurface_chunk_size: int = 262144

    cfg: Config

    @classmethod
    def validate_config(cls, cfg: Any, path: str) -> Any:
        parsed = super().validate_config(cfg, path)
        validate_encoding(parsed.pos_encoding, f"{path}.pos_encoding")
        return parsed

    def configure(self, **kwargs) -> None:
        c = self.cfg
        if c.radius <= 0:
            raise ConfigError(f"geometry.radius must be > 0, got {c.radius}")
        if c.density_activation not in DENSITY_ACTIVATIONS:
            raise ConfigError(f"geometry.density_activation: unknown '{c.density_activation}' "
                              f"(known: {', '.join(DENSITY_ACTIVATIONS)})")
        if c.density_bias not in ("blob", "none"):
            raise ConfigError(f"geometry.density_bias: expected 'blob' or 'none', got '{c.density_bias}'")
        if c.normal_type not in ("analytic", "finite_difference"):
            raise ConfigError(
                f"geometry.normal_type: expected 'analytic' or 'finite_difference', got '{c.normal_type}'")
        self.radius = float(c.radius)
        self.normal_type = c.normal_type
        self.finite_difference_eps = float(c.finite_difference_eps)
        self.isosurface_chunk_size = int(c.isosurface_chunk_size)
        self.encoding = build_encoding(c.pos_encoding, 3, "geometry.pos_encoding")
        self.mlp = make_mlp(self.encoding.n_output_dims, 1 + c.n_feature_dims, c.mlp_n_neurons, c.mlp_n_layers,
                            c.mlp_activation, "geometry.mlp")
        self._act = DENSITY_ACTIVATIONS[c.density_activation]
        if getattr(self.encoding, "backend", "torch") == "tcnn" and c.normal_type == "analytic":
            logging.getLogger("it3d").warning(
                "geometry: tiny-cuda-nn hash grid with analytic normals: losses on normals need second derivatives "
                "that tcnn may not provide; use normal_type: finite_difference (or pos_encoding.backend: torch)")

    def density_blob(self, points: Float[Tensor, "N 3"]) -> Float[Tensor, "N 1"]:
        if self.cfg.density_bias == "none":
            return torch.zeros_like(points[:, :1])
        r2 = (points ** 2).sum(-1, keepdim=True)
        return self.cfg.density_blob_scale * torch.exp(-0.5 * r2 / self.cfg.density_blob_std ** 2)

    def forward_raw(self, points: Float[Tensor, "N 3"], twice_differentiable: bool = False) -> Tuple[
            Float[Tensor, "N 1"], Float[Tensor, "N C"]]:
        enc = self.encoding(self.normalize_points(points), twice_differentiable)
        with torch.profiler.record_function("it3d::network"):
            h = self.mlp(enc).float()
        return h[:, :1] + self.density_blob(points), h[:, 1:]

    def activate_density(self, raw: Tensor) -> Tensor:
        return self._act(raw)

    def activate_features(self, raw: Tensor) -> Tensor:
        return torch.sigmoid(raw)

    def isosurface(self, resolution: int = None, threshold: Any = None):
        """Marching cubes; defaults from ``isosurface_resolution`` / ``isosurface_threshold``."""
        return super().isosurface(self.cfg.isosurface_resolution if resolution is None else resolution,
                                  self.cfg.isosurface_threshold if threshold is None else threshold)
