"""Zero-1-to-3 guidance (Customize-It-3D Eq. 3) and the two published camera-projection layouts.

Diffusers-format Zero-1-to-3 checkpoints come in two conversions, told apart by their
``model_index.json``:

* ``"clip_camera_projection": ["zero123", "CLIPCameraProjection"]`` -- bennyguo/zero123-xl-diffusers,
  ashawkey/zero123-xl-diffusers (what threestudio and DreamGaussian load; class in threestudio
  ``extern/zero123.py``): ``CLIPCameraProjection(embedding_dim=768, additional_embeddings=4)`` with one
  layer ``proj = Linear(embedding_dim + additional_embeddings, embedding_dim)`` (weights ``proj.*``);
* ``"cc_projection": [..., "CCProjection"]`` -- kxic/zero123-xl (diffusers' community
  ``pipeline_zero1to3.py``): ``CCProjection(in_channel=772, out_channel=768)`` with
  ``projection = Linear(in_channel, out_channel)`` (weights ``projection.*``).

Both map ``[CLIP image embedding, d_polar, sin d_az, cos d_az, d_radius]`` to the UNet's
cross-attention width; :func:`projection_layout` picks the class from the folder's index.
"""
from __future__ import annotations

from dataclasses import dataclass
import json
import os
from typing import Any, Dict, Optional, Tuple

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..core import hub
from ..core.config import C
from ..core.errors import It3dError
from ..core.registry import register
from ..core.typing import Float, Tensor
from ..core.cameras import angle_from_view, relative_camera
from .clip_image import clip_image_embeds
from .sds import SDSConfig, SDSGuidance


class CLIPCameraProjection(ModelMixin, ConfigMixin):
    """``clip_camera_projection/`` of bennyguo/ashawkey zero123-xl-diffusers (threestudio ``extern/zero123.py``)."""

    @register_to_config
    def __init__(self, embedding_dim: int = 768, additional_embeddings: int = 4):
        super().__init__()
        self.proj = torch.nn.Linear(embedding_dim + additional_embeddings, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class CCProjection(ModelMixin, ConfigMixin):
    """``cc_projection/`` of kxic/zero123-xl (diffusers community ``pipeline_zero1to3.py``)."""

    @register_to_config
    def __init__(self, in_channel: int = 772, out_channel: int = 768):
        super().__init__()
        self.projection = torch.nn.Linear(in_channel, out_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


PROJECTION_LAYOUTS = {"clip_camera_projection": CLIPCameraProjection, "cc_projection": CCProjection}


def projection_layout(model_dir: Optional[str], config_key: str = "") -> Tuple[str, type]:
    """(subfolder, class) of the camera projection named by ``<model_dir>/model_index.json``.

    Without a readable index (a hub id not resolved to a folder yet) the published default,
    ``clip_camera_projection``, is used.
    """
    index_path = os.path.join(model_dir, "model_index.json") if model_dir else None
    if not index_path or not os.path.isfile(index_path):
        if model_dir:
            for sub, cls in PROJECTION_LAYOUTS.items():
                if os.path.isdir(os.path.join(model_dir, sub)):
                    return sub, cls
        return "clip_camera_projection", CLIPCameraProjection
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    for sub, cls in PROJECTION_LAYOUTS.items():
        if sub in index:
            return sub, cls
    raise It3dError(f"{config_key or model_dir}: {index_path} names no camera projection "
                    f"(expected one of {', '.join(PROJECTION_LAYOUTS)}): is this a Zero-1-to-3 model?")


def projection_sizes(model_dir: Optional[str], sub: str) -> Dict[str, int]:
    """``in_channel`` / ``out_channel`` of a ``cc_projection`` whose config.json omits them (kxic's does:
    its class registers no config), read from the weight's shape; nothing for other layouts."""
    folder = os.path.join(model_dir, sub) if model_dir else None
    if sub != "cc_projection" or not folder or not os.path.isdir(folder):
        return {}
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        if {"in_channel", "out_channel"} <= set(json.load(f)):
            return {}
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                shape = f.get_slice("projection.weight").get_shape()
        else:
            shape = torch.load(path, map_location="cpu", weights_only=True)["projection.weight"].shape
        return {"out_channel": int(shape[0]), "in_channel": int(shape[1])}
    return {}


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
        model = self.cfg.pretrained_model_name_or_path
        folder = hub.local_dir(model) or hub.hf_cache_snapshot(model)
        sub, proj_cls = projection_layout(folder, f"{self.cfg_path}.pretrained_model_name_or_path")
        self.models["camera_projection"] = hub.load(
            proj_cls, model, subfolder=sub, dtype=self.dtype, device=self.device,
            config_key=f"{self.cfg_path}.pretrained_model_name_or_path", **projection_sizes(folder, sub))
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
            cond = self.models["camera_projection"](torch.cat([ref["clip"].expand(B, -1, -1), cam], -1).to(self.dtype))
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
