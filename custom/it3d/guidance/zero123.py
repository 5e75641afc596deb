"""Zero-1-to-3 guidance (Customize-It-3D Eq. 3) and the ``cc_projection`` model class."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..core.config import C
from ..core.errors import It3dError
from ..core.registry import register
from ..core.typing import Float, Tensor
from ..data.cameras import angle_from_view, relative_camera
from .clip_image import clip_image_embeds
from .sds import SDSConfig, SDSGuidance


class CCProjection(ModelMixin, ConfigMixin):
    """Projects [CLIP image embedding, relative camera (4)] back to the embedding size
    (the ``cc_projection`` folder of diffusers-format Zero-1-to-3 checkpoints)."""

    @register_to_config
    def __init__(self, in_channel: int = 772, out_channel: int = 768):
        super().__init__()
        self.projection = torch.nn.Linear(in_channel, out_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


@register("zero123", kind="guidance")
class Zero123Guidance(SDSGuidance):
    """SDS with a view-conditioned Zero-1-to-3 model (diffusers format).

    Conditioning for a view at (elevation, azimuth, distance) relative to the reference:
    cross-attention ``cc_projection([CLIP(ref), d_polar, sin d_az, cos d_az, d_radius])`` and the
    reference's (unscaled) VAE latent mode concatenated to the noisy latents; the unconditional
    branch uses zeros for both. With ``angle_scaled`` each sample's loss is multiplied by its angle
    from the reference view / 180 (so the reference view itself gets no Zero123 gradient).
    """

    @dataclass
    class Config(SDSConfig):
        pretrained_model_name_or_path: str = "bennyguo/zero123-xl-diffusers"
        guidance_scale: Any = 5.0
        resolution: int = 256
        angle_scaled: bool = True

    def configure(self, device: Any = "cpu", **kwargs) -> None:
        super().configure(device=device, **kwargs)
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPVisionModelWithProjection

        self.models["unet"] = self.load(UNet2DConditionModel, "unet")
        self.models["vae"] = self.load(AutoencoderKL, "vae")
        self.models["image_encoder"] = self.load(CLIPVisionModelWithProjection, "image_encoder")
        self.models["cc_projection"] = self.load(CCProjection, "cc_projection")
        self.ref: Optional[Dict[str, Tensor]] = None

    @torch.no_grad()
    def set_reference(self, ref: Dict[str, Any]) -> None:
        img = self.resize(ref["rgb"].to(self.device).float())
        self.ref = {
            "clip": clip_image_embeds(self.models["image_encoder"], img)[:, None],  # 1 1 D
            "latent": self.vae_encode(img, scaled=False, mode=True),  # 1 4 h w, unscaled
            **{k: torch.as_tensor(ref.get(k, d), dtype=torch.float32, device=self.device).reshape(-1)[:1]
               for k, d in (("elevation", 0.0), ("azimuth", 0.0), ("camera_distances", 1.0))},
        }

    def _require_ref(self) -> Dict[str, Tensor]:
        if self.ref is None:
            raise It3dError(f"{self.cfg_path}: zero123 needs the reference view (call set_reference first)")
        return self.ref

    def camera(self, batch: Dict[str, Any], batch_size: int) -> Float[Tensor, "B 4"]:
        """Relative camera [d_polar (rad), sin d_azimuth, cos d_azimuth, d_radius] of each view."""
        ref = self._require_ref()
        elev, azim, dist = (self.batch_values(batch, k, d, batch_size)
                            for k, d in (("elevation", 0.0), ("azimuth", 0.0), ("camera_distances", 1.0)))
        return relative_camera(ref["elevation"], ref["azimuth"], ref["camera_distances"], elev, azim, dist)

    def encode_images(self, rgb: Float[Tensor, "B H W 3"], batch: Dict[str, Any]) -> Tensor:
        return self.vae_encode(self.resize(rgb))

    def predict_noise(self, x_t: Tensor, t: Tensor, batch: Dict[str, Any]) -> Tensor:
        ref = self._require_ref()
        B = x_t.shape[0]
        with torch.no_grad():
            cam = self.camera(batch, B)[:, None].to(ref["clip"])
            cond = self.models["cc_projection"](torch.cat([ref["clip"].expand(B, -1, -1), cam], -1).to(self.dtype))
            concat = ref["latent"].expand(B, -1, -1, -1)
        return self.guided_unet(self.models["unet"], x_t, t, cond, torch.zeros_like(cond),
                                float(C(self.cfg.guidance_scale, self.step)), concat, torch.zeros_like(concat))

    def sample_scale(self, batch: Dict[str, Any], batch_size: int) -> Optional[Tensor]:
        if not self.cfg.angle_scaled:
            return None
        ref = self._require_ref()
        elev = self.batch_values(batch, "elevation", 0.0, batch_size)
        azim = self.batch_values(batch, "azimuth", 0.0, batch_size)
        return angle_from_view(elev, azim, ref["elevation"], ref["azimuth"]).to(self.device) / 180.0
