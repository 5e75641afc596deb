"""``blip-caption``: a caption of the reference image with BLIP (transformers), and the class name
DreamBooth derives from it.

Loaded with ``BlipForConditionalGeneration`` + ``BlipProcessor`` through the hub (default
``Salesforce/blip-image-captioning-large``); greedy / beam decoding as configured. The decoded text
is cleaned by :func:`clean_caption` (``clean: false`` keeps it raw).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..core import hub
from ..core.registry import register
from ..core.typing import Float, Tensor
from .base import HubEstimator, to_uint8_image

_LEAD = re.compile(r"^(there is |this is |it is )?((a|an|the) )?((close[- ]up |black and white )?"
                   r"(photo|photograph|picture|image|painting|drawing|rendering|render) of )?((a|an|the) )?")
# the official Make-It-3D / Customize-It-3D main.py: drop "there is ", "close up" -> "photo",
# "black background" / "white background" -> "ground"
_REPLACE = ((re.compile(r"\bthere (is|are) "), ""), (re.compile(r"\bclose[- ]up\b"), "photo"),
            (re.compile(r"\b(black|white) background\b"), "ground"),
            # ours: BLIP-large's non-words ("arafed", "araffe", "arafly", ...) name nothing
            (re.compile(r"\baraf+\w*\s*"), ""))
_STOP = {"on", "in", "with", "at", "of", "near", "by", "next", "under", "over", "sitting", "standing", "lying",
         "is", "are", "and", "that", "which", "against", "from", "to", "for", "holding", "inside", "behind"}


def clean_caption(caption: str) -> str:
    """BLIP caption -> prompt text without BLIP's artefacts: "there is an arafed teddy bear on a white background"
    -> "a teddy bear on a ground" (the official code's replacements, plus BLIP-large's "araf..." non-words;
    an "an" left before a consonant becomes "a")."""
    text = " ".join(caption.split())
    for pattern, repl in _REPLACE:
        text = pattern.sub(repl, text)
    text = re.sub(r"\b([Aa])n (?=[b-df-hj-np-tv-z])", r"\1 ", text)
    return " ".join(text.split())


def class_from_caption(caption: str, max_words: int = 3) -> str:
    """The caption's head noun phrase: "a photo of a small teddy bear sitting on a table" -> "small teddy bear".

    Leading "a photo of" / articles are dropped, the phrase ends before the first preposition,
    verb-like "-ing" word or conjunction, and its last ``max_words`` words are kept (the head noun
    is last in English noun phrases). Empty when the caption has no words.
    """
    text = _LEAD.sub("", re.sub(r"[^a-z0-9' -]", " ", caption.lower()).strip())
    words = []
    for word in text.split():
        if word in _STOP or (word.endswith("ing") and len(word) > 4 and words):
            break
        words.append(word)
    return " ".join(words[-max_words:])


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
