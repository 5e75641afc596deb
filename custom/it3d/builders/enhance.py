"""Novel-view clean-up used by the builders (Customize-It-3D, Sec. "conflict-free projection").

* :class:`Img2ImgEnhancer`: a light img2img pass with a Stable Diffusion / DreamBooth model
  (diffusers ``StableDiffusionImg2ImgPipeline`` loaded through ``it3d.core.hub``) — strength
  ``strength_front`` (0.15) for views within ``front_angle`` degrees of the reference view,
  ``strength_other`` (0.05) elsewhere. The prompt is ``prompt`` if set, else
  ``"sks rgb photo of <class_name>"`` if ``class_name`` is set (the DreamBooth identifier), else
  the caption given to :meth:`Img2ImgEnhancer.set_caption`.
* :class:`SamMaskUnion`: unite a rendered foreground mask with SAM's mask for the box around it,
  when SAM's predicted IoU score is at least ``score_threshold``. SAM runs through
  ``it3d.core.segment.SamSegmenter`` (transformers ``SamModel`` / ``facebook/sam-vit-*``: pure
  PyTorch, no torchvision, runs on CPU and GPU alike).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

from ..core import hub
from ..core.errors import It3dError
from ..core.typing import Bool, Float, Tensor



@dataclass
class EnhanceConfig:
    enabled: bool = False
    # the base model the configs already load (runwayml/stable-diffusion-v1-5 left the hub); Customize-It-3D
    # wires <dreambooth stage>/save/pipeline here
    pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-2-base"
    prompt: str = ""
    class_name: str = ""
    negative_prompt: str = ""
    strength_front: float = 0.15
    strength_other: float = 0.05
    front_angle: float = 45.0  # degrees from the reference view direction
    num_inference_steps: int = 50  # raised to ceil(1 / strength) when fewer would run no step at all
    guidance_scale: float = 7.5
    resolution: int = 512  # images are resized to this (a multiple of the VAE factor) and back
    dtype: str = "auto"
    seed: int = 0


@dataclass
class SamUnionConfig:
    enabled: bool = False
    pretrained_model_name_or_path: str = "facebook/sam-vit-huge"
    score_threshold: float = 0.8
    box_margin: int = 0  # pixels added around the mask's bounding box
    dtype: str = "auto"


def _config_key(name: str) -> str:
    return f"system.builder.{name}.pretrained_model_name_or_path"


class Img2ImgEnhancer:
    def __init__(self, cfg: EnhanceConfig, device: Any = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.caption = ""
        self._pipe = None

    def set_caption(self, caption: str) -> None:
        self.caption = caption or ""

    @property
    def prompt(self) -> str:
        if self.cfg.prompt:
            return self.cfg.prompt
        if self.cfg.class_name:
            return f"sks rgb photo of {self.cfg.class_name}"
        return self.caption

    @property
    def pipe(self):
        if self._pipe is None:
            self._pipe = self._build_pipe()
        return self._pipe

    def _build_pipe(self):
        """``StableDiffusionImg2ImgPipeline`` assembled from components loaded one by one through the hub
        cache, under the same keys (model, subfolder, dtype, device) as the guidance terms' own loads: when
        the refine guidance names the same model (Customize-It-3D: the DreamBooth pipeline), the UNet, VAE
        and text encoder here *are* the guidance's -- no second copy on the device."""
        from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline,
                               UNet2DConditionModel)
        from transformers import CLIPTextModel, CLIPTokenizer

        name, key = self.cfg.pretrained_model_name_or_path, _config_key("enhance")
        dtype = hub.resolve_dtype(self.cfg.dtype, self.device)

        def part(cls, sub, **kw):
            return hub.load(cls, name, subfolder=sub, device=self.device, config_key=key, **kw)

        # a light pass re-runs 1-8 steps: DDIM, not the repo's PNDM (SD2-base), whose multistep warm-up needs more
        pipe = StableDiffusionImg2ImgPipeline(
            vae=part(AutoencoderKL, "vae", dtype=dtype), text_encoder=part(CLIPTextModel, "text_encoder", dtype=dtype),
            tokenizer=part(CLIPTokenizer, "tokenizer"), unet=part(UNet2DConditionModel, "unet", dtype=dtype),
            scheduler=DDIMScheduler.from_config(part(DDIMScheduler, "scheduler").config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def release(self) -> None:
        """Drop the pipeline (its models are freed once the hub cache and the guidance no longer hold them)."""
        self._pipe = None

    def strength_for(self, angle_deg: float) -> float:
        return self.cfg.strength_front if angle_deg <= self.cfg.front_angle else self.cfg.strength_other

    @torch.no_grad()
    def enhance(self, image: Float[Tensor, "B H W 3"], strength: float) -> Float[Tensor, "B H W 3"]:
        """img2img at ``strength`` (fraction of the noise schedule re-run); same size out as in."""
        if not 0.0 < strength <= 1.0:
            raise It3dError(f"system.builder.enhance: strength must be in (0, 1], got {strength}")
        pipe = self.pipe
        _, h, w, _ = image.shape
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        res = max(factor, int(round(self.cfg.resolution / factor)) * factor)
        x = image.permute(0, 3, 1, 2).float().to(self.device)
        x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        steps = max(int(self.cfg.num_inference_steps), int(math.ceil(1.0 / strength - 1e-9)))
        dtype = next(pipe.unet.parameters()).dtype
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        # encode to the posterior mean ourselves (4-channel input = latents for the pipeline): the pipeline
        # would add a VAE sample's noise on top of the strength's
        latents = pipe.vae.encode((x * 2.0 - 1.0).to(pipe.vae.dtype)).latent_dist.mean * pipe.vae.config.scaling_factor
        out = pipe(prompt=[self.prompt] * x.shape[0], image=latents.to(dtype), strength=float(strength),
                   num_inference_steps=steps, guidance_scale=self.cfg.guidance_scale,
                   negative_prompt=[self.cfg.negative_prompt] * x.shape[0] if self.cfg.negative_prompt else None,
                   generator=gen, output_type="pt").images
        out = F.interpolate(out.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return out.clamp(0, 1).permute(0, 2, 3, 1).to(image.device)

    def __call__(self, image: Float[Tensor, "B H W 3"], angle_deg: float) -> Float[Tensor, "B H W 3"]:
        return self.enhance(image, self.strength_for(angle_deg))


def mask_box(mask: Bool[Tensor, "H W"], margin: int = 0) -> Optional[Tuple[float, float, float, float]]:
    """Bounding box (x0, y0, x1, y1) in pixel units of a mask's True pixels (x1, y1 exclusive), or None."""
    rows = torch.nonzero(mask.any(1)).squeeze(1)
    cols = torch.nonzero(mask.any(0)).squeeze(1)
    if rows.numel() == 0:
        return None
    h, w = mask.shape
    return (float(max(int(cols[0]) - margin, 0)), float(max(int(rows[0]) - margin, 0)),
            float(min(int(cols[-1]) + 1 + margin, w)), float(min(int(rows[-1]) + 1 + margin, h)))


class SamMaskUnion:
    def __init__(self, cfg: SamUnionConfig, device: Any = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self._seg = None

    @property
    def segmenter(self):
        if self._seg is None:
            try:
                from ..core.segment import SamSegmenter
            except ImportError as e:
                raise It3dError(f"system.builder.sam: it3d.core.segment is not available ({e})") from None
            self._seg = SamSegmenter(self.cfg.pretrained_model_name_or_path, self.device, self.cfg.dtype,
                                     config_key=_config_key("sam"))
        return self._seg

    def release(self) -> None:
        self._seg = None

    @torch.no_grad()
    def __call__(self, image: Float[Tensor, "1 H W 3"], mask: Bool[Tensor, "H W"]) -> Tuple[Tensor, bool, float]:
        """-> (mask | SAM mask if SAM's best score >= threshold else mask, whether it was united, best score)."""
        box = mask_box(mask, self.cfg.box_margin)
        if box is None:
            return mask, False, 0.0
        masks, scores = self.segmenter.segment(image, boxes=torch.tensor([box], dtype=torch.float32))
        if masks.shape[0] == 0:
            return mask, False, 0.0
        best = int(torch.argmax(scores))
        score = float(scores[best])
        if score < self.cfg.score_threshold:
            return mask, False, score
        sam = masks[best].to(mask.device).bool()
        if sam.shape != mask.shape:
            raise It3dError(f"system.builder.sam: SAM returned a {tuple(sam.shape)} mask for a {tuple(mask.shape)} view")
        return mask | sam, True, score
