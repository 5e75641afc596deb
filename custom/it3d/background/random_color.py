"""``random-color`` background: in training each batch element gets a random colour with
probability ``random_prob`` (a schedule), ``color`` otherwise; in eval mode always ``color`` (white)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

from ..core.base import BaseBackground
from ..core.config import schedule
from ..core.registry import register
from ..core.typing import Float, Tensor
from .common import RandomColorMixin, color_tensor


@register("random-color", kind="background")
class RandomColor(RandomColorMixin, BaseBackground):
    @dataclass
    class Config:
        color: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # eval colour / the non-random draw
        random_prob: Any = schedule(0.5)

    def configure(self, **kwargs) -> None:
        self.register_buffer("color", color_tensor(self.cfg.color, "background.color"), persistent=False)

    def forward(self, dirs: Float[Tensor, "B H W 3"]) -> Float[Tensor, "B H W 3"]:
        base = self.color.to(dirs.dtype).view(1, 1, 1, 3).expand(dirs.shape[0], 1, 1, 3)
        return self._random_mix(base, self.cfg.random_prob).expand(dirs.shape).contiguous()
