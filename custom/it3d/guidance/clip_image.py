"""Differentiable CLIP image embedding (preprocessing in torch: resize + CLIP mean/std)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ..core.typing import Float, Tensor

# OpenAI CLIP normalisation (the values in every OpenAI CLIP / Zero-1-to-3 preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(img: Float[Tensor, "B 3 H W"], size: int) -> Float[Tensor, "B 3 S S"]:
    """Images in [0, 1] -> the CLIP vision input: bicubic resize to ``size`` (antialiased), normalise."""
    x = img.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, (size, size), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def clip_image_embeds(model: Any, img: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B D"]:
    """Projected image embeddings of a ``CLIPVisionModelWithProjection`` (gradient flows to ``img``)."""
    dtype = next(model.parameters()).dtype
    pixels = clip_preprocess(img, int(model.config.image_size)).to(dtype)
    return model(pixel_values=pixels).image_embeds.float()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (a CLIPModel folder loaded as its vision half lists every text weight)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
