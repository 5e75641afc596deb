"""Score distillation sampling: the base every diffusion guidance extends.

A subclass supplies only its conditioning -- how to turn the rendered image into latents
(:meth:`SDSGuidance.encode_images`) and how to predict the guided noise of noisy latents
(:meth:`SDSGuidance.predict_noise`). The base does the rest:

* timesteps ``t ~ U{t_min, ..., t_max}`` with ``t_min = min_step_percent * T`` and
  ``t_max = max_step_percent * T`` (both schedules, evaluated at the step given to ``forward``);
* ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps`` (``eps`` drawn from the optional seeded generator
  or passed in);
* classifier-free guidance ``eps_hat = eps_u + s (eps_c - eps_u)`` (:meth:`guided_unet`); a
  v-prediction model's output is turned into noise, ``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t``
  (the model's ``scheduler.config.prediction_type`` decides; ``sample`` models are refused);
* weighting ``w(t)`` = ``1 - abar_t`` (``sds``) or ``1`` (``uniform``), optional clamp of the gradient;
* the loss ``0.5 * sum_i s_i ||x_i - sg(x_i - g_i)||^2 / B`` whose gradient w.r.t. latent ``x_i`` is
  ``s_i g_i / B`` with ``g = w(t)(eps_hat - eps)`` (``s_i`` a per-sample scale, default 1). The UNet
  runs under ``torch.no_grad``: nothing is back-propagated through it.

Pretrained models are held in ``self.models`` (a plain dict, not sub-modules), so they are shared
through the hub cache and never end up in a system's checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..core import hub
from ..core.base import BaseGuidance
from ..core.config import C, ConfigError, schedule
from ..core.typing import Float, Tensor


@dataclass
class SDSConfig:
    pretrained_model_name_or_path: str = "???"
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU; or fp32 / fp16 / bf16
    guidance_scale: Any = schedule(10.0)
    min_step_percent: Any = schedule(0.2)
    max_step_percent: Any = schedule(0.6)
    weighting: str = "sds"  # sds: w(t) = 1 - alpha_bar_t; uniform: w(t) = 1
    grad_clip: Optional[Any] = None  # clamp each element of w(t)(eps_hat - eps) to [-c, c] (schedule)
    resolution: int = 512  # rendered images are resized to this before encoding
    seed: Optional[int] = None  # seeds t and noise sampling (None: the global torch RNG)


class SDSGuidance(BaseGuidance):
    """Abstract SDS guidance; subclasses implement ``encode_images`` and ``predict_noise``."""

    Config = SDSConfig
    model_subfolder_scheduler = "scheduler"

    def __init__(self, cfg: Any = None, path: str = "", **kwargs) -> None:
        object.__setattr__(self, "cfg_path", path)
        super().__init__(cfg, path, **kwargs)

    # ------------------------------------------------------------------ set-up
    def configure(self, device: Any = "cpu", **kwargs) -> None:
        if self.cfg.weighting not in ("sds", "uniform"):
            raise ConfigError(f"{self.cfg_path}.weighting: unknown weighting '{self.cfg.weighting}' (use sds or uniform)")
        self.device = torch.device(device)
        self.dtype = hub.resolve_dtype(self.cfg.dtype, self.device)
        self.models: Dict[str, Any] = {}
        from diffusers import DDIMScheduler

        sched = self.load(DDIMScheduler, self.model_subfolder_scheduler)
        self.prediction_type = str(sched.config.get("prediction_type", "epsilon"))
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"{self.cfg_path}.pretrained_model_name_or_path: the model predicts "
                              f"'{self.prediction_type}' (scheduler prediction_type); SDS supports epsilon and "
                              "v_prediction models")
        self.num_train_timesteps = int(sched.config.num_train_timesteps)
        self.alphas_cumprod = sched.alphas_cumprod.to(self.device, torch.float32)
        self.generator = None if self.cfg.seed is None else torch.Generator(self.device).manual_seed(int(self.cfg.seed))
        self.set_step(0)

    def load(self, cls: Any, subfolder: Optional[str] = None, model: Optional[str] = None,
             key: str = "pretrained_model_name_or_path"):
        """Load (once per process, through the hub cache) a component of this guidance's model."""
        return hub.load(cls, model or getattr(self.cfg, key), subfolder=subfolder, dtype=self.dtype, device=self.device,
                        config_key=f"{self.cfg_path}.{key}" if self.cfg_path else key)

    def __getattr__(self, name: str):
        models = self.__dict__.get("models")
        if models is not None and name in models:
            return models[name]
        return super().__getattr__(name)

    # ------------------------------------------------------------------ schedules
    def set_step(self, step: int) -> None:
        T = self.num_train_timesteps
        lo, hi = float(C(self.cfg.min_step_percent, step)), float(C(self.cfg.max_step_percent, step))
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"{self.cfg_path}: need 0 <= min_step_percent ({lo}) <= max_step_percent ({hi}) <= 1")
        self.min_step = int(T * lo)
        self.max_step = min(int(T * hi), T - 1)
        self.step = step

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        self.set_step(global_step)

    def sample_timesteps(self, batch_size: int) -> Tensor:
        """(B,) integer timesteps uniform in [min_step, max_step]."""
        return torch.randint(self.min_step, self.max_step + 1, (batch_size,), generator=self.generator,
                             device=self.device, dtype=torch.long)

    def sample_noise(self, like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=self.generator, device=like.device, dtype=torch.float32)

    def w(self, t: Tensor) -> Tensor:
        if self.cfg.weighting == "sds":
            return 1.0 - self.alphas_cumprod[t]
        return torch.ones_like(self.alphas_cumprod[t])

    def batch_values(self, batch: Dict[str, Any], key: str, default: float, batch_size: int) -> Float[Tensor, "B"]:
        """``batch[key]`` (a number or (B,) / (1,) tensor, e.g. angles in degrees) as a float (B,) tensor."""
        value = torch.as_tensor(batch.get(key, default), dtype=torch.float32, device=self.device)
        return value.reshape(-1).expand(batch_size)

    # ------------------------------------------------------------------ diffusion helpers
    def resize(self, rgb: Float[Tensor, "B H W 3"], size: Optional[int] = None) -> Float[Tensor, "B 3 S S"]:
        x = rgb.permute(0, 3, 1, 2)
        size = size or self.cfg.resolution
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False)
        return x

    def vae_encode(self, x: Float[Tensor, "B 3 S S"], vae: Any = None, scaled: bool = True, mode: bool = True) -> Tensor:
        """Images in [0, 1] -> ``vae.encode(2x - 1).latent_dist.mean`` (or a sample, ``mode=False``), times
        ``vae.config.scaling_factor`` when ``scaled``. The mean keeps SDS free of the posterior's noise."""
        vae = vae or self.models["vae"]
        dist = vae.encode((x * 2.0 - 1.0).to(self.dtype)).latent_dist
        z = dist.mode() if mode else dist.sample(generator=self.generator)
        return z.float() * (vae.config.scaling_factor if scaled else 1.0)

    def vae_decode(self, latents: Tensor, vae: Any = None) -> Tensor:
        """Scaled latents -> images B 3 H W in [0, 1] (differentiable)."""
        vae = vae or self.models["vae"]
        img = vae.decode((latents / vae.config.scaling_factor).to(self.dtype)).sample.float()
        return (img * 0.5 + 0.5).clamp(0.0, 1.0)

    def add_noise(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a = self.alphas_cumprod[t].view(-1, *([1] * (latents.dim() - 1)))
        return a.sqrt() * latents + (1.0 - a).sqrt() * noise

    def predict_x0(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """One-step denoising ``(x_t - sqrt(1 - abar) eps) / sqrt(abar)``."""
        a = self.alphas_cumprod[t].view(-1, *([1] * (x_t.dim() - 1)))
        return (x_t - (1.0 - a).sqrt() * eps) / a.sqrt()

    @torch.no_grad()
    def guided_unet(self, unet: Any, x_t: Tensor, t: Tensor, cond: Tensor, uncond: Tensor, scale: float,
                    concat_cond: Optional[Tensor] = None, concat_uncond: Optional[Tensor] = None) -> Tensor:
        """Classifier-free guided noise ``eps_u + scale (eps_c - eps_u)`` from one batched UNet call."""
        x_in = torch.cat([x_t, x_t], 0)
        if concat_cond is not None:
            x_in = torch.cat([x_in, torch.cat([concat_cond, concat_uncond], 0)], 1)
        context = torch.cat([cond, uncond], 0).to(self.dtype)
        eps = unet(x_in.to(self.dtype), torch.cat([t, t], 0), encoder_hidden_states=context).sample
        eps_c, eps_u = eps.float().chunk(2)
        return self.to_noise(eps_u + scale * (eps_c - eps_u), x_t, t)

    def to_noise(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The model's (guided) output as a noise prediction: identity for epsilon models; for
        v-prediction ``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t`` (linear, so CFG commutes with it)."""
        if getattr(self, "prediction_type", "epsilon") != "v_prediction":
            return pred
        a = self.alphas_cumprod[t].view(-1, *([1] * (pred.dim() - 1)))
        return a.sqrt() * pred + (1.0 - a).sqrt() * x_t.float()

    # ------------------------------------------------------------------ subclass hooks
    def encode_images(self, rgb: Float[Tensor, "B H W 3"], batch: Dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def predict_noise(self, x_t: Tensor, t: Tensor, batch: Dict[str, Any]) -> Tensor:
        """Guided noise prediction for noisy latents (no gradient)."""
        raise NotImplementedError

    def sample_scale(self, batch: Dict[str, Any], batch_size: int) -> Optional[Tensor]:
        """Per-sample multiplier of the loss (B,), or None."""
        return None

    # ------------------------------------------------------------------ loss
    def sds_grad(self, eps_hat: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        grad = self.w(t).view(-1, *([1] * (noise.dim() - 1))) * (eps_hat - noise)
        if self.cfg.grad_clip is not None:
            c = float(C(self.cfg.grad_clip, self.step))
            grad = grad.clamp(-c, c)
        return torch.nan_to_num(grad)

    @staticmethod
    def sds_loss(latents: Tensor, grad: Tensor, scale: Optional[Tensor] = None) -> Tensor:
        """Per-sample ``0.5 ||x - sg(x - g)||^2`` (times ``scale``); its gradient w.r.t. x is ``scale * g``."""
        target = (latents - grad).detach()
        per = 0.5 * ((latents.float() - target) ** 2).flatten(1).sum(1)
        return per if scale is None else per * scale

    def forward(self, rgb: Float[Tensor, "B H W 3"], batch: Dict[str, Any], step: Optional[int] = None, *,
                t: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> Dict[str, Any]:
        """SDS loss for rendered ``rgb``; ``t`` / ``noise`` may be given (tests, analysis)."""
        if step is not None and step != self.step:
            self.set_step(step)
        latents = self.encode_images(rgb, batch)
        B = latents.shape[0]
        t = self.sample_timesteps(B) if t is None else t.to(self.device, torch.long).expand(B)
        noise = self.sample_noise(latents) if noise is None else noise.to(latents)
        x_t = self.add_noise(latents.detach(), noise, t)
        eps_hat = self.predict_noise(x_t, t, batch)
        return self.make_output(latents, noise, eps_hat, t, batch)

    def adjust_loss(self, per: Tensor, latents: Tensor, noise: Tensor, eps_hat: Tensor, t: Tensor,
                    batch: Dict[str, Any]) -> Tuple[Tensor, Dict[str, Any]]:
        """Hook: change the per-sample losses (B,); returns (losses, extra values to log)."""
        return per, {}

    def make_output(self, latents: Tensor, noise: Tensor, eps_hat: Tensor, t: Tensor,
                    batch: Dict[str, Any]) -> Dict[str, Any]:
        grad = self.sds_grad(eps_hat, noise, t)
        per = self.sds_loss(latents, grad, self.sample_scale(batch, latents.shape[0]))
        sds = per.detach().mean()
        per, extra = self.adjust_loss(per, latents, noise, eps_hat, t, batch)
        return {"loss": per.sum() / latents.shape[0], "loss_sds": sds, "grad_norm": grad.norm().detach(),
                "t": t.float().mean().detach(), "min_step": self.min_step, "max_step": self.max_step, **extra}
