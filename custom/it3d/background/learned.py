"""``learned`` background: a learnable colour (``mode: color``) or a small MLP on the
frequency-encoded view direction (``mode: mlp``), sigmoid output; optional random colours in training."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

import torch
import torch.nn as nn

from ..core.base import BaseBackground
from ..core.config import ConfigError, schedule
from ..core.registry import register
from ..core.typing import Float, Tensor
from ..encodings.factory import build_encoding, make_mlp
from .common import RandomColorMixin, color_tensor


@register("learned", kind="background")
class Learned(RandomColorMixin, BaseBackground):
    @dataclass
    class Config:
        mode: str = "mlp"  # mlp | color
        init_color: List[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # mode: color
        dir_encoding: dict = field(default_factory=lambda: {"otype": "Frequency", "n_frequencies": 4})
        mlp_n_neurons: int = 32
        mlp_n_layers: int = 2
        random_prob: Any = schedule(0.0)  # random colours in training (threestudio's random_aug)

    def configure(self, **kwargs) -> None:
        c = self.cfg
        if c.mode == "color":
            init = color_tensor(c.init_color, "background.init_color").clamp(1e-3, 1 - 1e-3)
            self.logit = nn.Parameter(torch.log(init / (1 - init)))
        elif c.mode == "mlp":
            self.encoding = build_encoding(c.dir_encoding, 3, "background.dir_encoding")
            self.mlp = make_mlp(self.encoding.n_output_dims, 3, c.mlp_n_neurons, c.mlp_n_layers, "relu",
                                "background.mlp")
        else:
            raise ConfigError(f"background.mode: expected 'mlp' or 'color', got '{c.mode}'")

    def forward(self, dirs: Float[Tensor, "B H W 3"]) -> Float[Tensor, "B H W 3"]:
        if self.cfg.mode == "color":
            out = torch.sigmoid(self.logit).to(dirs.dtype).expand(dirs.shape)
        else:
            flat = dirs.reshape(-1, 3)
            out = torch.sigmoid(self.mlp(self.encoding(flat))).reshape(dirs.shape)
        return self._random_mix(out, self.cfg.random_prob).expand(dirs.shape).contiguous()
