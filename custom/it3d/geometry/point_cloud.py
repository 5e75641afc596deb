"""Point cloud with learnable neural descriptors (Make-It-3D sec 3.3, Customize-It-3D sec 3.3).

Each point has a fixed position, a learnable ``descriptor_dim``-dim descriptor whose first
three channels start at the point's colour (RGB in [0, 1]) and whose other channels start
as small random numbers, a flag ``is_ref`` (the point is seen in the reference view) and its
initial colour (kept for the colour regulariser).

The number of points is not part of the config: the geometry starts empty and is filled
either by :meth:`set_points` (from a builder's dict) or by ``load_state_dict`` — loading a
state dict whose tensors have another number of points resizes the buffers first, so a
system can be rebuilt from its config and then restored from ``last.ckpt``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import torch
import torch.nn as nn

from ..core.base import BaseGeometry
from ..core.errors import It3dError
from ..core.registry import register
from ..core.typing import Bool, Float, Tensor


@register("point-cloud", kind="geometry")
class PointCloudGeometry(BaseGeometry):
    @dataclass
    class Config:
        descriptor_dim: int = 19  # first 3 channels = RGB
        init_std: float = 0.01  # std of the random non-colour channels at initialisation
        seed: int = 0  # for the random channels (so two builds of one cloud agree)

    cfg: Config

    def configure(self, **kwargs) -> None:
        if self.cfg.descriptor_dim < 3:
            raise It3dError(f"point-cloud: descriptor_dim must be >= 3 (RGB first), got {self.cfg.descriptor_dim}")
        self._allocate(0)

    # ------------------------------------------------------------------ storage
    def _allocate(self, n: int, device=None) -> None:
        c = self.cfg.descriptor_dim
        self.register_buffer("positions", torch.zeros(n, 3, device=device))
        self.register_buffer("init_colors", torch.zeros(n, 3, device=device))
        self.register_buffer("is_ref", torch.zeros(n, dtype=torch.bool, device=device))
        self.descriptors = nn.Parameter(torch.zeros(n, c, device=device))

    @property
    def num_points(self) -> int:
        return int(self.positions.shape[0])

    @torch.no_grad()
    def set_points(self, positions: Float[Tensor, "N 3"], colors: Float[Tensor, "N 3"],
                   is_ref: Bool[Tensor, "N"]) -> None:
        """(Re)initialise from a builder's output; the descriptors restart from ``colors``."""
        n = positions.shape[0]
        if colors.shape != (n, 3) or is_ref.shape != (n,):
            raise It3dError(f"point-cloud: positions {tuple(positions.shape)}, colors {tuple(colors.shape)} and "
                            f"is_ref {tuple(is_ref.shape)} disagree (expected N 3, N 3, N)")
        if n == 0:
            raise It3dError("point-cloud: the builder returned no points (is the reference mask empty?)")
        device = self.positions.device
        self._allocate(n, device)
        self.positions.copy_(positions.float())
        self.init_colors.copy_(colors.float().clamp(0, 1))
        self.is_ref.copy_(is_ref.bool())
        gen = torch.Generator().manual_seed(self.cfg.seed)
        rest = torch.randn(n, self.cfg.descriptor_dim - 3, generator=gen) * self.cfg.init_std
        self.descriptors.data = torch.cat([self.init_colors, rest.to(device)], -1)

    def colors(self) -> Float[Tensor, "N 3"]:
        """Learned colour: the descriptor's first three channels, clamped to [0, 1]."""
        return self.descriptors[:, :3].clamp(0, 1)

    # ------------------------------------------------------------------ checkpoint resize
    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args, **kwargs) -> None:
        key = prefix + "descriptors"
        if key in state_dict:
            shape = tuple(state_dict[key].shape)
            if len(shape) != 2 or shape[1] != self.cfg.descriptor_dim:
                raise It3dError(f"point-cloud: checkpoint descriptors have shape {shape}, but "
                                f"descriptor_dim is {self.cfg.descriptor_dim}")
            if shape[0] != self.num_points:
                self._allocate(shape[0], self.positions.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
