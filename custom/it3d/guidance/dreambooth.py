"""Multi-modal DreamBooth guidance (Customize-It-3D): Stable Diffusion fine-tuned on the reference's
RGB and normal maps, prompted by the render's shading mode ("sks normal map of <caption>" for
normal renders, "sks rgb photo of <caption>" otherwise)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from ..core.errors import It3dError
from ..core.registry import register
from .stable_diffusion import StableDiffusionGuidance


@register("multimodal-dreambooth", kind="guidance")
class MultimodalDreamBoothGuidance(StableDiffusionGuidance):
    @dataclass
    class Config(StableDiffusionGuidance.Config):
        pretrained_model_name_or_path: str = "???"  # the fine-tuned pipeline dir (<dreambooth stage>/save/pipeline)
        identifier: str = "sks"
        templates: Dict[str, str] = field(default_factory=lambda: {
            "normal": "{id} normal map of {caption}", "default": "{id} rgb photo of {caption}"})

    def configure(self, device: Any = "cpu", **kwargs) -> None:
        if "default" not in self.cfg.templates:
            raise It3dError(f"{self.cfg_path}.templates: needs a 'default' entry (used for shadings without their own)")
        super().configure(device=device, **kwargs)

    def prompt_for(self, batch: Dict[str, Any]) -> Optional[str]:
        shading = batch.get("shading")
        if isinstance(shading, (list, tuple)):
            if len(set(shading)) > 1:
                raise It3dError(f"{self.cfg_path}: one shading mode per batch expected, got {sorted(set(shading))}")
            shading = shading[0] if shading else None
        template = self.cfg.templates.get(shading or "default", self.cfg.templates["default"])
        return template.format(id=self.cfg.identifier, caption=self.prompt_processor.prompt)
