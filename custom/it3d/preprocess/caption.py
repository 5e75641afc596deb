"""``blip-caption``: a caption of the reference image with BLIP (transformers) (the class name DreamBooth
derives from it: :func:`it3d.core.caption.class_from_caption`).

Loaded with ``BlipForConditionalGeneration`` + ``BlipProcessor`` through the hub (default
``Salesforce/blip-image-captioning-large``); greedy / beam decoding as configured. The decoded text
is cleaned by :func:`it3d.core.caption.clean_caption` (``clean: false`` keeps it raw).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..core import hub
from ..core.caption import clean_caption
from ..core.image import to_uint8_image
from ..core.registry import register
from ..core.typing import Float, Tensor
from .base import HubEstimator

@register("blip-caption", kind="estimator")
class BlipCaptionEstimator(HubEstimator):
    @dataclass
    class Config(HubEstimator.Config):
        pretrained_model_name_or_path: str = "Salesforce/blip-image-captioning-large"
        text_prompt: str = ""  # conditional captioning prefix, e.g. "a photography of"
        max_new_tokens: int = 30
        num_beams: int = 3
        clean: bool = True  # strip BLIP's artefacts (clean_caption)

    def load(self):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        name = self.cfg.pretrained_model_name_or_path
        model = hub.load(BlipForConditionalGeneration, name, dtype=self.dtype, device=self.device,
                         config_key=self.config_key)
        return model, hub.load(BlipProcessor, name, config_key=self.config_key)

    @torch.no_grad()
    def __call__(self, image: Float[Tensor, "1 H W 3"], mask: Optional[Float[Tensor, "1 H W 1"]] = None) -> str:
        model, processor = self.loaded()
        kwargs = {"text": self.cfg.text_prompt} if self.cfg.text_prompt else {}
        inputs = processor(images=to_uint8_image(image), return_tensors="pt", **kwargs)
        inputs = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                  for k, v in inputs.items()}
        ids = model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens, num_beams=self.cfg.num_beams)
        self.n_calls += 1
        text = " ".join(processor.decode(ids[0], skip_special_tokens=True).split())
        return clean_caption(text) if self.cfg.clean else text
