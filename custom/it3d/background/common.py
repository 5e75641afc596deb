"""Helpers shared by the backgrounds (colour parsing, random-colour mixing)."""
from __future__ import annotations

import torch

from ..core.config import C, ConfigError
from ..core.typing import Tensor


def color_tensor(values, path: str) -> Tensor:
    if len(values) != 3:
        raise ConfigError(f"{path}: expected 3 values (r, g, b in [0, 1]), got {list(values)}")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


class RandomColorMixin:
    global_step: int = 0

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        self.global_step = global_step

    def _random_mix(self, colors: Tensor, prob) -> Tensor:
        """Replace each batch element's colour by a random one with probability ``prob`` (training only)."""
        p = float(C(prob, self.global_step))
        if not self.training or p <= 0:
            return colors
        b = colors.shape[0]
        pick = (torch.rand(b, 1, 1, 1, device=colors.device) < p).float()
        rand = torch.rand(b, 1, 1, 3, device=colors.device)
        return pick * rand + (1 - pick) * colors
