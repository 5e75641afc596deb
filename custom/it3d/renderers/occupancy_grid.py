"""Occupancy grid for empty-space skipping (Instant-NGP / nerfacc style), pure PyTorch.

A ``resolution^3`` grid over the scene box [-radius, radius]^3 keeps a running density per cell:
every ``update_every`` training steps the density is sampled once per cell at a point jittered
uniformly inside the cell and merged as ``d = max(ema_decay * d, new)`` (Instant-NGP's decayed
maximum, decay 0.95). A cell is occupied when a render step through it would be visible:
``1 - exp(-d * step_size) > alpha_threshold`` with ``step_size`` the renderer's uniform sample
spacing; the occupied set is then dilated by ``dilation`` cells so a cell whose one jittered
sample missed a thin surface is not skipped. Until the first update every cell is occupied.

Nothing here reads a tensor on the host: "before the first update" is the ``initialized`` buffer
used inside the tensor expressions (``torch.where``), so a training step that queries or updates
the grid never waits for the device (and the state survives a checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import ConfigError, parse_structured
from ..core.typing import Bool, Float, Tensor


@dataclass
class OccupancyGridConfig:
    enabled: bool = True
    resolution: int = 64  # 128 is a better choice on a GPU
    update_every: int = 16  # training steps between updates
    ema_decay: float = 0.95
    alpha_threshold: float = 0.01
    dilation: int = 1  # cells
    jitter: bool = True
    chunk_size: int = 65536  # density queries per chunk during an update


class OccupancyGrid(nn.Module):
    def __init__(self, cfg=None, radius: float = 0.5, step_size: float = 0.01, path: str = "renderer.grid") -> None:
        super().__init__()
        self.cfg = parse_structured(OccupancyGridConfig, cfg, path)
        if self.cfg.resolution < 1:
            raise ConfigError(f"{path}.resolution must be >= 1")
        if self.cfg.update_every < 1:
            raise ConfigError(f"{path}.update_every must be >= 1")
        self.radius = float(radius)
        self.step_size = float(step_size)
        r = self.cfg.resolution
        self.register_buffer("density", torch.zeros(r, r, r))
        self.register_buffer("occupied", torch.ones(r, r, r, dtype=torch.bool))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.last_update_step = -1

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.enabled)

    def cell_index(self, points: Float[Tensor, "N 3"]) -> Tensor:
        r = self.cfg.resolution
        ijk = torch.floor((points + self.radius) / (2 * self.radius) * r).long().clamp(0, r - 1)
        return (ijk[:, 0] * r + ijk[:, 1]) * r + ijk[:, 2]

    def query(self, points: Float[Tensor, "N 3"]) -> Bool[Tensor, "N"]:
        """True where the point lies in an occupied cell (all True before the first update or when disabled)."""
        if not self.enabled:
            return torch.ones(points.shape[0], dtype=torch.bool, device=points.device)
        inside = (points.abs() <= self.radius).all(-1)
        return (self.occupied.reshape(-1)[self.cell_index(points)] & inside) | ~self.initialized

    def occupied_fraction(self) -> float:
        return float(self.occupied.float().mean())

    @torch.no_grad()
    def update(self, density_fn: Callable[[Tensor], Tensor], step: int = -1) -> None:
        """Sample ``density_fn`` (N 3 world points -> N 1 density) at jittered cell centres and refresh."""
        r = self.cfg.resolution
        dev = self.density.device
        idx = torch.arange(r, device=dev, dtype=torch.float32)
        ii, jj, kk = torch.meshgrid(idx, idx, idx, indexing="ij")
        cells = torch.stack([ii, jj, kk], -1).reshape(-1, 3)
        offset = torch.rand_like(cells) if self.cfg.jitter else torch.full_like(cells, 0.5)
        pts = (cells + offset) / r * (2 * self.radius) - self.radius
        new = torch.cat([density_fn(c).reshape(-1) for c in torch.split(pts, self.cfg.chunk_size)]).reshape(r, r, r)
        new = torch.nan_to_num(new.float(), nan=0.0, posinf=1e6).clamp_min(0.0)
        self.density.copy_(torch.where(self.initialized, torch.maximum(self.density * self.cfg.ema_decay, new), new))
        alpha = 1.0 - torch.exp(-self.density * self.step_size)
        occ = alpha > self.cfg.alpha_threshold
        d = self.cfg.dilation
        if d > 0:
            occ = F.max_pool3d(occ[None, None].float(), kernel_size=2 * d + 1, stride=1, padding=d)[0, 0] > 0
        self.occupied.copy_(occ)
        self.initialized.fill_(True)
        self.last_update_step = step
