"""Image-comparison metrics, pure tensor maths (used by systems for a reference-view figure and by
:mod:`it3d.eval.metrics`, which documents them and adds the learned metrics).

* PSNR: 10 log10(1 / MSE) for images in [0, 1] (infinite for identical images).
  Masked PSNR: the MSE is the mask-weighted mean over pixels (all channels).
* SSIM (Wang et al. 2004): Gaussian window 11 x 11, sigma 1.5, C1 = 0.01^2, C2 = 0.03^2,
  data range 1, per channel, "valid" filtering (no padding: the map is (H-10) x (W-10)).
  Full SSIM: the mean of the map over pixels and channels. Masked SSIM: the mean of the
  map over the pixels whose window CENTRE lies in the mask (mask-weighted, all channels).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .errors import It3dError
from .typing import Float, Tensor

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03

def _mask_weights(mask: Optional[Tensor], like: Tensor) -> Tensor:
    if mask is None:
        return torch.ones_like(like[..., :1])
    return mask.to(like.dtype)


def mse(pred: Float[Tensor, "B H W C"], target: Float[Tensor, "B H W C"],
        mask: Optional[Float[Tensor, "B H W 1"]] = None) -> Float[Tensor, "B"]:
    w = _mask_weights(mask, pred).expand_as(pred)
    se = (pred.double() - target.double()) ** 2 * w
    return (se.sum(dim=(1, 2, 3)) / w.double().sum(dim=(1, 2, 3)).clamp_min(1e-12)).to(pred.dtype)


def psnr(pred: Float[Tensor, "B H W C"], target: Float[Tensor, "B H W C"],
         mask: Optional[Float[Tensor, "B H W 1"]] = None) -> Float[Tensor, "B"]:
    """PSNR in dB for images in [0, 1]; ``mask`` restricts the MSE to the masked pixels."""
    return 10.0 * torch.log10(1.0 / mse(pred, target, mask))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Float[Tensor, "K"]:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim_map(pred: Float[Tensor, "B H W C"], target: Float[Tensor, "B H W C"], window: int = SSIM_WINDOW,
             sigma: float = SSIM_SIGMA) -> Float[Tensor, "B h w C"]:
    """Per-pixel SSIM over the valid region (h = H - window + 1)."""
    b, h, w, c = pred.shape
    if h < window or w < window:
        raise It3dError(f"SSIM needs images of at least {window}x{window} pixels, got {h}x{w}")
    g = gaussian_window(window, sigma).to(pred.device)
    gx = g.view(1, 1, 1, window).repeat(c, 1, 1, 1)
    gy = g.view(1, 1, window, 1).repeat(c, 1, 1, 1)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(t, gx, groups=c), gy, groups=c)

    x = pred.permute(0, 3, 1, 2).double()
    y = target.permute(0, 3, 1, 2).double()
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return m.permute(0, 2, 3, 1).to(pred.dtype)


def ssim(pred: Float[Tensor, "B H W C"], target: Float[Tensor, "B H W C"],
         mask: Optional[Float[Tensor, "B H W 1"]] = None) -> Float[Tensor, "B"]:
    """Mean SSIM; with ``mask``, averaged over the pixels whose window centre is in the mask."""
    m = ssim_map(pred, target).double()
    if mask is None:
        return m.mean(dim=(1, 2, 3)).to(pred.dtype)
    r = SSIM_WINDOW // 2
    wts = mask[:, r: mask.shape[1] - r, r: mask.shape[2] - r].double().expand_as(m)
    return ((m * wts).sum(dim=(1, 2, 3)) / wts.sum(dim=(1, 2, 3)).clamp_min(1e-12)).to(pred.dtype)
