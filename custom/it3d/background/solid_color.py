"""``solid-color`` background: ``forward(dirs B H W 3) -> B H W 3`` filled with ``color``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from ..core.base import BaseBackground
from ..core.registry import register
from ..core.typing import Float, Tensor
from .common import color_tensor


@register("solid-color", kind="background")
class SolidColor(BaseBackground):
    @dataclass
    class Config:
        color: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])

    def configure(self, **kwargs) -> None:
        self.register_buffer("color", color_tensor(self.cfg.color, "background.color"), persistent=False)

    def forward(self, dirs: Float[Tensor, "B H W 3"]) -> Float[Tensor, "B H W 3"]:
        return self.color.to(dirs.dtype).expand(dirs.shape).contiguous()
