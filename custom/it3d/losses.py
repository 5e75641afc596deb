"""Registered loss terms (kind ``loss``).

Each term is called as ``term(out, ref)`` with the renderer's output dict ``out`` (``comp_rgb``
B H W 3, ``opacity`` B H W 1, ``depth`` B H W 1, ``comp_normal`` B H W 3, and for the orientation
loss the per-sample ``weights``, ``normal``, ``t_dirs`` / ``ray_indices`` of the volume renderer)
and the batch dict ``ref`` (``rgb``, ``mask``, ``depth`` of the reference view) and returns a
scalar. ``view`` says which renders a term applies to: ``ref`` (reference view only), ``random``
(novel views only) or ``any``. Systems sum ``weight * term`` with :func:`weighted_terms`, which
never calls a term whose weight is 0 at the current step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .core import registry
from .core.base import BaseLoss
from .core.config import C, ConfigError
from .core.typing import Float, Tensor


def pearson(x: Float[Tensor, "N"], y: Float[Tensor, "N"], eps: float = 1e-8) -> Float[Tensor, ""]:
    """Pearson correlation coefficient of two 1-D tensors."""
    xc, yc = x - x.mean(), y - y.mean()
    return (xc * yc).sum() / (xc.norm() * yc.norm() + eps)


def masked_pearson(x: Tensor, y: Tensor, m: Tensor, eps: float = 1e-8) -> Float[Tensor, ""]:
    """:func:`pearson` of the entries where the 0/1 weights ``m`` are 1 (any shape), computed with the
    weights instead of a boolean index: no data-dependent shape, no host sync. 0 when ``m`` has < 2 ones."""
    n = m.sum().clamp_min(1.0)
    xc = (x - (x * m).sum() / n) * m
    yc = (y - (y * m).sum() / n) * m
    return (xc * yc).sum() / (xc.norm() * yc.norm() + eps)


def weighted_terms(modules: Any, weights: Any, step: int, call: Callable[[str, Any], Optional[Tensor]],
                   skip: Callable[[str, Any], bool] = lambda n, m: False) -> Tuple[Optional[Tensor], Dict[str, Any]]:
    """``sum_i C(weight_i, step) * call(name_i, module_i)``; a zero weight (or ``skip``) never calls the term.
    Returns (total, {name: unweighted value})."""
    total, logs = None, {}
    for name, mod in modules.items():
        w = C(weights[name], step)
        if w == 0 or skip(name, mod):
            continue
        val = call(name, mod)
        if val is None:
            continue
        logs[name] = val
        total = w * val if total is None else total + w * val
    return total, logs


class _Term(BaseLoss):
    @dataclass
    class Config:
        view: str = "ref"  # ref | random | any

    def configure(self, **kwargs) -> None:
        if self.cfg.view not in ("ref", "random", "any"):
            raise ConfigError(f"loss view must be ref, random or any, got '{self.cfg.view}'")

    def applies_to(self, view: str) -> bool:
        return self.cfg.view == "any" or self.cfg.view == view


def _fg(ref: Dict, threshold: float) -> Tensor:
    return ref["mask"] > threshold


@registry.register("ref-rgb", kind="loss")
class RefRGBLoss(_Term):
    """Make-It-3D Eq. 2: mean over pixels of ``|M * (I_ref - render)|`` (``masked: false`` = plain L1)."""

    @dataclass
    class Config(_Term.Config):
        masked: bool = True

    def forward(self, out: Dict, ref: Dict) -> Tensor:
        diff = (out["comp_rgb"] - ref["rgb"]).abs()
        if self.cfg.masked:
            diff = diff * ref["mask"]
        return diff.mean()


@registry.register("white-bg", kind="loss")
class WhiteBackgroundLoss(_Term):
    """The refine stage's white-background regulariser: the L1 distance to white of the pixels the render
    does not cover, ``mean((1 - opacity) * |1 - comp_rgb|)`` over all pixels. The refine system averages a
    ``view: any`` term over the step's renders (reference and, with guidance, novel)."""

    @dataclass
    class Config(_Term.Config):
        view: str = "any"

    def forward(self, out: Dict, ref: Dict) -> Tensor:
        return ((1.0 - out["opacity"]) * (1.0 - out["comp_rgb"]).abs()).mean()


@registry.register("color-reg", kind="loss")
class PointColorLoss(_Term):
    """The refine stage's colour regulariser (Make-It-3D / Customize-It-3D refine): the squared distance of
    each point descriptor's RGB channels to the point's initial colour, summed over RGB and averaged over
    the reference points (``points: ref``) or the novel points (``points: novel``); 0 when there are none.
    Reads the point-cloud geometry given at construction (``geometry=``: ``descriptors``, ``init_colors``,
    ``is_ref``), not the render; the refine system computes it with the reference view's terms."""

    @dataclass
    class Config(_Term.Config):
        points: str = "ref"  # ref | novel

    def configure(self, geometry: Any = None, **kwargs) -> None:
        super().configure(**kwargs)
        if self.cfg.points not in ("ref", "novel"):
            raise ConfigError(f"loss 'color-reg': points must be ref or novel, got '{self.cfg.points}'")
        if geometry is None or not all(hasattr(geometry, k) for k in ("descriptors", "init_colors", "is_ref")):
            raise ConfigError("loss 'color-reg' needs a point-cloud geometry (descriptors, init_colors, is_ref), "
                              "given by the system that builds it (geometry=)")
        self._geometry = [geometry]  # a list: the geometry belongs to the system, not to this term

    def forward(self, out: Dict, ref: Dict) -> Tensor:
        geo = self._geometry[0]
        err = ((geo.descriptors[:, :3] - geo.init_colors) ** 2).sum(-1)
        m = geo.is_ref.to(err.dtype)  # means by 0/1 weights: no `.any()` / boolean index (host syncs)
        if self.cfg.points == "novel":
            m = 1.0 - m
        return (err * m).sum() / m.sum().clamp_min(1.0)


@registry.register("mask", kind="loss")
class MaskLoss(_Term):
    """Rendered opacity vs the reference mask: ``mse`` or ``bce``."""

    @dataclass
    class Config(_Term.Config):
        mode: str = "mse"

    def forward(self, out: Dict, ref: Dict) -> Tensor:
        op, m = out["opacity"], ref["mask"].float()
        if self.cfg.mode == "mse":
            return F.mse_loss(op, m)
        if self.cfg.mode == "bce":
            return F.binary_cross_entropy(op.clamp(1e-5, 1 - 1e-5), m)
        raise ConfigError(f"mask loss mode must be mse or bce, got '{self.cfg.mode}'")


@registry.register("depth-pearson", kind="loss")
class DepthPearsonLoss(_Term):
    """Make-It-3D Eq. 5: ``-pearson(rendered depth, reference depth)`` over foreground pixels
    (reference depth "larger = farther", any scale / shift). Uses ``out[key]`` (default the
    z-depth ``z_depth`` the volume renderer returns given ``c2w``, falling back to ``depth``)."""

    @dataclass
    class Config(_Term.Config):
        key: str = "z_depth"
        mask_threshold: float = 0.5

    def forward(self, out: Dict, ref: Dict) -> Optional[Tensor]:
        if "depth" not in ref:
            return None
        pred = out.get(self.cfg.key, out["depth"])
        fg = _fg(ref, self.cfg.mask_threshold).to(pred.dtype)  # weights, not an index: no host sync
        # fewer than 2 foreground pixels: no correlation to measure (0, no gradient)
        return -masked_pearson(pred, ref["depth"].to(pred.dtype), fg)


@registry.register("sparsity", kind="loss")
class SparsityLoss(_Term):
    """Opacity sparsity over the pixels: ``mode: sqrt`` (threestudio) ``mean(sqrt(opacity^2 + eps))``,
    ``mode: square`` (Make-It-3D / Customize-It-3D official ``loss_opacity``) ``mean(opacity^2)``."""

    @dataclass
    class Config(_Term.Config):
        view: str = "any"
        mode: str = "sqrt"  # sqrt | square
        eps: float = 0.01  # mode sqrt

    def configure(self, **kwargs) -> None:
        super().configure(**kwargs)
        if self.cfg.mode not in ("sqrt", "square"):
            raise ConfigError(f"sparsity loss mode must be sqrt or square, got '{self.cfg.mode}'")

    def forward(self, out: Dict, ref: Dict) -> Tensor:
        if self.cfg.mode == "square":
            return (out["opacity"] ** 2).mean()
        return (out["opacity"] ** 2 + self.cfg.eps).sqrt().mean()


@registry.register("entropy", kind="loss")
class OpacityEntropyLoss(_Term):
    """Binary entropy of the opacity (pushes it to 0 or 1), in nats, or in bits with ``bits: true``
    (the official Make-It-3D code uses log2)."""

    @dataclass
    class Config(_Term.Config):
        view: str = "any"
        eps: float = 1e-5
        bits: bool = False

    def forward(self, out: Dict, ref: Dict) -> Tensor:
        o = out["opacity"].clamp(self.cfg.eps, 1 - self.cfg.eps)
        h = (-o * torch.log(o) - (1 - o) * torch.log(1 - o)).mean()
        return h / math.log(2.0) if self.cfg.bits else h


@registry.register("orient", kind="loss")
class OrientLoss(_Term):
    """Ref-NeRF orientation loss: ``sum(w * relu(n . d)^2) / #visible rays`` over volume samples.
    Needs the renderer's per-sample ``weights`` (B H W S), ``sample_normal`` and ``t_dirs`` (B H W S*3);
    the coarse system asks the renderer for normals while this term's weight is non-zero."""
    needs_normals = True
    normal_loss = True  # gradients flow through the normals (their second-order graph with analytic normals)

    @dataclass
    class Config(_Term.Config):
        view: str = "any"

    def forward(self, out: Dict, ref: Dict) -> Tensor:
        missing = [k for k in ("weights", "sample_normal", "t_dirs") if k not in out]
        if missing:
            raise ConfigError(f"loss 'orient' needs the renderer outputs {missing} (per-sample weights/normals); "
                              f"set the loss weight to 0 or use a renderer that returns them")
        w = out["weights"].detach().reshape(-1)
        n, d = out["sample_normal"].reshape(-1, 3), out["t_dirs"].reshape(-1, 3)
        val = (w * ((n * d).sum(-1).clamp_min(0) ** 2)).sum()
        return val / (out["opacity"] > 0).sum().clamp_min(1)


@registry.register("normal-smooth", kind="loss")
class NormalSmoothLoss(_Term):
    """Squared difference of ``comp_normal`` between neighbouring pixels, where both are opaque."""

    needs_normals = True
    normal_loss = True

    @dataclass
    class Config(_Term.Config):
        view: str = "any"

    def forward(self, out: Dict, ref: Dict) -> Optional[Tensor]:
        n, o = out["comp_normal"], out["opacity"].detach()
        if n.shape[1] < 2 or n.shape[2] < 2:  # not an image (e.g. a random subset of reference rays): no neighbours
            return None
        dx = ((n[:, :, 1:] - n[:, :, :-1]) ** 2).sum(-1, keepdim=True) * o[:, :, 1:] * o[:, :, :-1]
        dy = ((n[:, 1:] - n[:, :-1]) ** 2).sum(-1, keepdim=True) * o[:, 1:] * o[:, :-1]
        return dx.mean() + dy.mean()


@registry.register("normal-smooth-3d", kind="loss")
class NormalSmooth3DLoss(_Term):
    """Surface smoothness in 3D (the official Make-It-3D / Customize-It-3D ``loss_smooth``): the mean
    ``|n(x) - n(x + N(0, perturb^2))|`` over the volume samples that reach the image -- rendering
    weight > 0 (in an occupied grid cell) and transmittance still above ``transmittance_threshold``
    (the official CUDA marcher stops there). Needs the renderer's ``weights`` and the system's
    ``sample_positions`` (B H W S*3); ``n(x)`` is the render's ``sample_normal`` when it has one (another
    term asked for normals), else evaluated here on the chosen samples only. The geometry is given at
    construction (``geometry=``; the coarse system passes its own). ``max_samples`` > 0 draws that many
    of the samples at random (a cost cap for CPU runs)."""

    needs_positions = True
    normal_loss = True

    @dataclass
    class Config(_Term.Config):
        view: str = "any"
        perturb: float = 0.01
        transmittance_threshold: float = 1e-4
        max_samples: int = 0

    def configure(self, geometry: Any = None, **kwargs) -> None:
        super().configure(**kwargs)
        self._geometry = [geometry]  # a list: the geometry belongs to the system, not to this term

    def forward(self, out: Dict, ref: Dict) -> Optional[Tensor]:
        geometry = self._geometry[0]
        if geometry is None:
            raise ConfigError("loss 'normal-smooth-3d' needs the geometry (built by a system that passes geometry=)")
        missing = [k for k in ("weights", "sample_positions") if k not in out]
        if missing:
            raise ConfigError(f"loss 'normal-smooth-3d' needs the outputs {missing}; set its weight to 0 or render "
                              f"with a volume renderer through the coarse system")
        w = out["weights"].detach().reshape(-1, out["weights"].shape[-1])
        trans = 1.0 - (torch.cumsum(w, -1) - w)  # transmittance before each sample
        keep = ((w > 0) & (trans > self.cfg.transmittance_threshold)).reshape(-1)
        idx = keep.nonzero().squeeze(1)
        if self.cfg.max_samples > 0 and idx.numel() > self.cfg.max_samples:
            idx = idx[torch.randperm(idx.numel(), device=idx.device)[:self.cfg.max_samples]]
        if idx.numel() == 0:
            return None
        pts = out["sample_positions"].reshape(-1, 3).index_select(0, idx)
        moved = pts + torch.randn_like(pts) * self.cfg.perturb
        if "sample_normal" in out:
            n = out["sample_normal"].reshape(-1, 3).index_select(0, idx)
            n_moved = geometry(moved, output_normal=True)["normal"]
        else:  # one pass over both point sets
            both = geometry(torch.cat([pts, moved]), output_normal=True)["normal"]
            n, n_moved = both[:idx.numel()], both[idx.numel():]
        return (n - n_moved).abs().mean()
