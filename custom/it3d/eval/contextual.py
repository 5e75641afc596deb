"""Contextual distance (Mechrez et al. 2018, "The Contextual Loss") on VGG16 features.

For feature sets X = {x_i} (a novel view) and Y = {y_j} (the reference), each a
C-vector per spatial position:

1. centre both on the mean of Y: x_i - mu_Y, y_j - mu_Y; L2-normalise over channels;
2. cosine distance d_ij = 1 - <x_i, y_j>;
3. relative normalisation d~_ij = d_ij / (min_k d_ik + eps), eps = 1e-5;
4. w_ij = exp((1 - d~_ij) / h), h = 0.5 (bandwidth);
5. CX_ij = w_ij / sum_k w_ik;
6. CX(X, Y) = mean_j max_i CX_ij   (in [0, 1]; 1 when every y_j has its own exact match);
7. distance = -log(CX)             (0 is the minimum; identical images give ~0).

Features come from the VGG16 backbone of the LPIPS weights (``it3d.eval.lpips``),
layers ``relu3_3`` and ``relu4_3`` by default; the distance is averaged over layers.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..core.typing import Float, Tensor

H_BANDWIDTH = 0.5
EPS = 1e-5


def contextual_similarity(x: Float[Tensor, "B C N"], y: Float[Tensor, "B C M"], h: float = H_BANDWIDTH,
                          eps: float = EPS) -> Float[Tensor, "B"]:
    """CX(X, Y) per batch element (steps 1-6 above)."""
    x, y = x.double(), y.double()
    mu = y.mean(dim=2, keepdim=True)
    xn = F.normalize(x - mu, dim=1)
    yn = F.normalize(y - mu, dim=1)
    d = (1.0 - torch.einsum("bcn,bcm->bnm", xn, yn)).clamp_min(0.0)  # B N M: d_ij, i over X
    d_rel = d / (d.min(dim=2, keepdim=True).values + eps)
    w = torch.exp((1.0 - d_rel) / h)
    cx = w / w.sum(dim=2, keepdim=True)
    return cx.max(dim=1).values.mean(dim=1).float()


def contextual_distance(x: Float[Tensor, "B C N"], y: Float[Tensor, "B C M"], h: float = H_BANDWIDTH) -> Float[Tensor, "B"]:
    """-log CX(X, Y): 0 for identical feature sets, larger = less similar."""
    return -torch.log(contextual_similarity(x, y, h).clamp_min(1e-12))


def image_contextual_distance(model, views: Float[Tensor, "B H W 3"], reference: Float[Tensor, "1 H W 3"],
                              layers: Sequence[str] = ("relu3_3", "relu4_3"), size: int = 128,
                              h: float = H_BANDWIDTH) -> Float[Tensor, "B"]:
    """Contextual distance of each view to the reference on ``model``'s (an ``LPIPS``) VGG features."""

    def prep(img: Tensor) -> Tensor:
        img = img.permute(0, 3, 1, 2).float()
        if img.shape[-1] != size or img.shape[-2] != size:
            img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return img.permute(0, 2, 3, 1)

    fv = model.vgg_features(prep(views), layers)
    fr = model.vgg_features(prep(reference), layers)
    total = torch.zeros(views.shape[0], device=views.device)
    for name in layers:
        a = fv[name].flatten(2)
        b = fr[name].flatten(2).expand(a.shape[0], -1, -1)
        total = total + contextual_distance(a, b, h).to(total.device)
    return total / len(layers)
