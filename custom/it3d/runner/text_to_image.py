"""Text-to-3D's first step (Make-It-3D application): generate the reference image from a
prompt with a Stable Diffusion pipeline; the image pipeline then runs on it.

Used by the stage pipeline as ``{name: text2image, run: text-to-image, overrides: {prompt: ...}}``;
writes ``<stage dir>/image.png`` (skipped when it exists).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..core import hub, io
from ..core.config import parse_structured
from ..core.errors import It3dError

log = logging.getLogger("it3d")


@dataclass
class TextToImageConfig:
    prompt: str = "???"
    negative_prompt: str = "blurry, cropped, multiple objects, text, watermark"
    prompt_suffix: str = ", a single object centered on a plain white background, full view"
    pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-2-base"
    height: int = 512
    width: int = 512
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    dtype: str = "auto"


def generate_reference(cfg: Any, out_dir: str, device: str = "cpu", path: str = "stage.text2image") -> str:
    c = parse_structured(TextToImageConfig, cfg, path)
    out = os.path.join(out_dir, "image.png")
    if os.path.isfile(out):
        log.info(f"text-to-image: {out} exists, skipped")
        return out
    if not c.prompt.strip():
        raise It3dError(f"{path}.prompt: empty prompt")
    from diffusers import StableDiffusionPipeline

    pipe = hub.load(StableDiffusionPipeline, c.pretrained_model_name_or_path, dtype=c.dtype, device=device,
                    config_key=f"{path}.pretrained_model_name_or_path", safety_checker=None,
                    requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(device="cpu").manual_seed(c.seed)
    image = pipe(c.prompt + c.prompt_suffix, negative_prompt=c.negative_prompt, height=c.height, width=c.width,
                 num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale, generator=gen,
                 output_type="np").images[0]
    io.save_image(out, image)
    io.write_text(os.path.join(out_dir, "prompt.txt"), c.prompt + "\n")
    log.info(f"text-to-image: wrote {out}")
    return out
