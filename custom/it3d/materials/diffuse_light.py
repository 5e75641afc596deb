"""``diffuse-light``: albedo lit by ambient light plus one point light (DreamFusion shading).

Shading modes (``shading`` argument):

* ``albedo``: the albedo itself;
* ``lambertian``: ``albedo * (ambient + diffuse * max(0, n . l))`` with ``l`` the unit direction
  from the sample to the light;
* ``textureless``: ``ambient + diffuse * max(0, n . l)`` (white albedo);
* ``normal``: ``(n + 1) / 2``.

During training the system (or the renderer) draws the mode per step with
:meth:`DiffuseLight.sample_shading`: ``shading_probs`` maps each mode to a schedule (``C()``);
the values at the step are relative weights, normalised by their sum. Customize-It-3D's "normal
shading for the first 1000 steps of the 360 degree phase (steps 2000-3000)" is::

    shading_probs:
      albedo: [[2000, 1], [2000, 0], [3000, 0], [3000, 1]]
      normal: [[2000, 0], [2000, 1], [3000, 1], [3000, 0]]

(piecewise schedules are right-continuous, so steps 2000..2999 use normal shading). In eval mode
the mode is ``test_shading`` (albedo).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..core.base import BaseMaterial
from ..core.config import C, ConfigError, check_schedule
from ..core.errors import It3dError
from ..core.registry import register
from ..core.typing import Float, Tensor

SHADINGS = ("albedo", "lambertian", "textureless", "normal")
NEEDS_NORMAL = ("lambertian", "textureless", "normal")


@register("diffuse-light", kind="material")
class DiffuseLight(BaseMaterial):
    @dataclass
    class Config:
        ambient_light_color: List[float] = field(default_factory=lambda: [0.1, 0.1, 0.1])
        diffuse_light_color: List[float] = field(default_factory=lambda: [0.9, 0.9, 0.9])
        shading_probs: dict = field(default_factory=lambda: {"albedo": 1.0})
        test_shading: str = "albedo"

    cfg: "DiffuseLight.Config"

    def configure(self, **kwargs) -> None:
        for mode, prob in self.cfg.shading_probs.items():
            if mode not in SHADINGS:
                raise ConfigError(f"material.shading_probs: unknown shading '{mode}' (known: {', '.join(SHADINGS)})")
            check_schedule(prob, f"material.shading_probs.{mode}")
        if self.cfg.test_shading not in SHADINGS:
            raise ConfigError(f"material.test_shading: unknown shading '{self.cfg.test_shading}'")
        for name, value in (("ambient", self.cfg.ambient_light_color), ("diffuse", self.cfg.diffuse_light_color)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=False)
        self.global_step = 0

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        self.global_step = global_step

    # ------------------------------------------------------------------ shading choice
    def shading_weights(self, step: int) -> dict:
        return {mode: max(float(C(p, step)), 0.0) for mode, p in self.cfg.shading_probs.items()}

    def sample_shading(self, step: int, generator: Optional[torch.Generator] = None) -> str:
        """Draw a shading mode for ``step`` from ``shading_probs`` (weights normalised by their sum)."""
        weights = self.shading_weights(step)
        total = sum(weights.values())
        if total <= 0:
            raise ConfigError(f"material.shading_probs: all weights are 0 at step {step}; give some mode a weight > 0")
        u = float(torch.rand((), generator=generator)) * total
        acc = 0.0
        last = None
        for mode, w in weights.items():
            if w <= 0:
                continue
            acc += w
            last = mode
            if u < acc:
                return mode
        return last

    def current_shading(self, generator: Optional[torch.Generator] = None) -> str:
        """Training: a mode drawn for the current step; eval: ``test_shading``."""
        return self.sample_shading(self.global_step, generator) if self.training else self.cfg.test_shading

    # ------------------------------------------------------------------ shading
    def forward(self, features: Float[Tensor, "N Nf"], viewdirs: Optional[Float[Tensor, "N 3"]] = None,
                shading_normal: Optional[Float[Tensor, "N 3"]] = None,
                light_positions: Optional[Float[Tensor, "N 3"]] = None, shading: Optional[str] = None,
                positions: Optional[Float[Tensor, "N 3"]] = None) -> Float[Tensor, "N 3"]:
        """``light_positions``: per-sample world light position; ``positions``: the sample points
        (needed for lambertian / textureless). ``shading=None`` -> :meth:`current_shading`."""
        if shading is None:
            shading = self.current_shading()
        if shading not in SHADINGS:
            raise It3dError(f"material: unknown shading '{shading}' (known: {', '.join(SHADINGS)})")
        albedo = features[..., :3]
        if shading == "albedo":
            return albedo
        if shading_normal is None:
            raise It3dError(f"material: '{shading}' shading needs normals (render with output_normal=True)")
        if shading == "normal":
            return (shading_normal + 1.0) * 0.5
        if light_positions is None or positions is None:
            raise It3dError(
                f"material: '{shading}' shading needs light_positions (B 3 in the batch) and sample positions")
        light_dir = F.normalize(light_positions - positions, dim=-1)
        cos = (shading_normal * light_dir).sum(-1, keepdim=True).clamp_min(0.0)
        light = self.ambient + self.diffuse * cos
        if shading == "textureless":
            return light.clamp(0.0, 1.0).expand_as(albedo).contiguous()
        return (albedo * light).clamp(0.0, 1.0)
