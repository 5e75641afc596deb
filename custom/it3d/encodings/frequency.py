"""Frequency (positional) encoding: ``[x, sin(2^k pi x), cos(2^k pi x)]`` for k < n_frequencies."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core.config import parse_structured
from ..core.typing import Float, Tensor


@dataclass
class FrequencyConfig:
    otype: str = "Frequency"
    n_frequencies: int = 6
    include_input: bool = True
    scale_pi: bool = True  # multiply by pi (inputs in [0, 1] or [-1, 1])


class FrequencyEncoding(nn.Module):
    """``forward(x: N x D) -> N x D * (include_input + 2 * n_frequencies)``; the layout is
    ``[x, sin(f_0 x), ..., sin(f_{K-1} x), cos(f_0 x), ..., cos(f_{K-1} x)]`` per call, features of
    all dimensions grouped by frequency."""

    def __init__(self, cfg=None, n_input_dims: int = 3, path: str = "encoding") -> None:
        super().__init__()
        self.cfg = parse_structured(FrequencyConfig, cfg, path)
        self.n_input_dims = n_input_dims
        k = self.cfg.n_frequencies
        freqs = (2.0 ** torch.arange(k, dtype=torch.float32)) * (math.pi if self.cfg.scale_pi else 1.0)
        self.register_buffer("freqs", freqs, persistent=False)
        self.n_output_dims = n_input_dims * (int(self.cfg.include_input) + 2 * k)

    def forward(self, x: Float[Tensor, "N D"], twice_differentiable: bool = False) -> Float[Tensor, "N F"]:
        xf = (x[:, None, :] * self.freqs[None, :, None]).reshape(x.shape[0], -1)
        parts = [x] if self.cfg.include_input else []
        parts += [torch.sin(xf), torch.cos(xf)]
        return torch.cat(parts, -1)
