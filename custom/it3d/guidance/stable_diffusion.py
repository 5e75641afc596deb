"""Latent SDS with a text-conditioned Stable Diffusion model (Make-It-3D Eq. 3)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from ..core import registry
from ..core.config import C, component
from ..core.registry import register
from ..core.typing import Float, Tensor
from .sds import SDSConfig, SDSGuidance


@register("stable-diffusion", kind="guidance")
class StableDiffusionGuidance(SDSGuidance):
    @dataclass
    class Config(SDSConfig):
        pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-2-base"
        guidance_scale: Any = 10.0
        resolution: int = 512
        prompt_processor_type: str = component("prompt-processor", "stable-diffusion")
        prompt_processor: dict = field(default_factory=dict)

    def configure(self, device: Any = "cpu", **kwargs) -> None:
        super().configure(device=device, **kwargs)
        from diffusers import AutoencoderKL, UNet2DConditionModel

        self.models["unet"] = self.load(UNet2DConditionModel, "unet")
        self.models["vae"] = self.load(AutoencoderKL, "vae")
        cls = registry.get("prompt-processor", self.cfg.prompt_processor_type)
        self.prompt_processor = cls(self.cfg.prompt_processor, path=f"{self.cfg_path}.prompt_processor",
                                    model=self.cfg.pretrained_model_name_or_path, device=self.device, dtype=self.dtype)

    def set_prompt(self, text: str) -> None:
        self.prompt_processor.set_prompt(text)

    def set_reference(self, ref: Dict[str, Any]) -> None:
        self.prompt_processor.set_reference(ref)

    def prompt_for(self, batch: Dict[str, Any]) -> Optional[str]:
        """The text prompt for this batch (None: the prompt processor's own prompt)."""
        return None

    def encode_images(self, rgb: Float[Tensor, "B H W 3"], batch: Dict[str, Any]) -> Tensor:
        return self.vae_encode(self.resize(rgb))

    def predict_noise(self, x_t: Tensor, t: Tensor, batch: Dict[str, Any]) -> Tensor:
        B = x_t.shape[0]
        elev, azim = self.batch_values(batch, "elevation", 0.0, B), self.batch_values(batch, "azimuth", 0.0, B)
        cond, uncond = self.prompt_processor.get_text_embeddings(elev, azim, prompt=self.prompt_for(batch))
        return self.guided_unet(self.models["unet"], x_t, t, cond, uncond, float(C(self.cfg.guidance_scale, self.step)))
