"""CLIP-D: SDS plus CLIP similarity to the reference on one-step denoised images (Make-It-3D Eq. 4).

For samples with ``t < clip_threshold`` the noisy latent is denoised in one step,
``x0_hat = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar)``, where ``eps_hat`` is the (no-grad) guided
UNet prediction but ``x_t`` is built from the rendered image's latents *with* gradient; ``x0_hat`` is
decoded by the VAE and embedded by a CLIP image encoder, and the loss is
``-cos(E(ref), E(decode(x0_hat)))`` times ``clip_weight``. Other samples get the SDS loss. ``t`` is
drawn once per sample and decides the branch, so the gradient reaches the rendered image (and the
NeRF) in both. With ``skip_back_views`` (the official code's ``is_large``) views whose azimuth is
within ``back_threshold`` degrees of the back (opposite the reference azimuth) always get SDS: the
reference's CLIP embedding describes its front, and pulling the back towards it breeds Janus faces.
The reference is embedded from the image given to :meth:`set_reference` (its full resolution; the
CLIP preprocessing resizes it with antialiasing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..core.config import C, schedule
from ..core.errors import It3dError
from ..core.registry import register
from ..core.typing import Float, Tensor
from .clip_image import clip_image_embeds, quiet_transformers
from .stable_diffusion import StableDiffusionGuidance


@register("clip-d", kind="guidance")
class ClipDGuidance(StableDiffusionGuidance):
    @dataclass
    class Config(StableDiffusionGuidance.Config):
        clip_model_name_or_path: str = "openai/clip-vit-large-patch14"
        clip_subfolder: Optional[str] = None
        clip_threshold: int = 400  # timesteps below this use the CLIP loss, the rest SDS
        clip_weight: Any = schedule(1.0)  # multiplier of the CLIP term relative to the SDS term
        skip_back_views: bool = True  # views near the back always get SDS (official Make-It-3D: is_large)
        back_threshold: float = 45.0  # degrees of azimuth from the back counted as "back"

    def configure(self, device: Any = "cpu", **kwargs) -> None:
        super().configure(device=device, **kwargs)
        from transformers import CLIPVisionModelWithProjection

        with quiet_transformers():
            self.models["clip"] = self.load(CLIPVisionModelWithProjection, self.cfg.clip_subfolder,
                                            key="clip_model_name_or_path")
        self.ref_embeds: Optional[Tensor] = None
        self.front_azimuth = 0.0

    @torch.no_grad()
    def set_reference(self, ref: Dict[str, Any]) -> None:
        super().set_reference(ref)
        rgb = ref["rgb"].to(self.device).float().permute(0, 3, 1, 2)
        self.ref_embeds = clip_image_embeds(self.models["clip"], rgb)
        if "azimuth" in ref:
            self.front_azimuth = float(torch.as_tensor(ref["azimuth"]).reshape(-1)[0])

    def back_views(self, batch: Dict[str, Any], batch_size: int) -> Tensor:
        """(B,) bool: the view's azimuth is within ``back_threshold`` degrees of the back."""
        azim = self.batch_values(batch, "azimuth", self.front_azimuth, batch_size)
        rel = torch.remainder(azim - self.front_azimuth + 180.0, 360.0) - 180.0
        return rel.abs() >= 180.0 - self.cfg.back_threshold

    def clip_loss(self, img: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B"]:
        if self.ref_embeds is None:
            raise It3dError(f"{self.cfg_path}: clip-d needs the reference image (call set_reference first)")
        emb = clip_image_embeds(self.models["clip"], img)
        return -F.cosine_similarity(emb, self.ref_embeds.expand_as(emb), dim=-1)

    def adjust_loss(self, per: Tensor, latents: Tensor, noise: Tensor, eps_hat: Tensor, t: Tensor,
                    batch: Dict[str, Any]) -> Tuple[Tensor, Dict[str, Any]]:
        use_clip = t < self.cfg.clip_threshold
        if self.cfg.skip_back_views:
            use_clip = use_clip & ~self.back_views(batch, t.shape[0])
        extra = {"clip_fraction": use_clip.float().mean()}
        if not bool(use_clip.any()):
            return per, extra
        idx = use_clip.nonzero().squeeze(1)
        x_t = self.add_noise(latents[idx], noise[idx], t[idx])  # with gradient to the latents
        x0 = self.predict_x0(x_t, eps_hat[idx].detach(), t[idx])
        clip = self.clip_loss(self.vae_decode(x0))
        weight = float(C(self.cfg.clip_weight, self.step))
        per = per.masked_fill(use_clip, 0.0).index_add(0, idx, weight * clip)
        return per, {**extra, "loss_clip": clip.detach().mean()}
