"""Differentiable point rasterizer in pure PyTorch (optional pytorch3d backend).

Every point is a disc of ``radius`` pixels in screen space. A pixel whose centre lies at
distance ``d`` from a point's projection receives that point as a fragment with alpha
``1 - d^2 / r^2``; each pixel keeps its ``k`` nearest-in-depth fragments, which are
alpha-composited front to back over a background feature:

    out = sum_k a_k prod_{j<k} (1 - a_j) f_k + prod_k (1 - a_k) f_bg

All of it is vectorised: every point of every view is tested against the pixels of its window
(the floor(2r) + 1 columns and rows whose centres can lie inside the disc); the (pixel, point)
pairs inside the disc, the image and the view frustum are gathered into a buffer
(:mod:`.sample_buffers`), sorted once by (pixel, depth) with a single int64 key (stable: equal
keys keep the (view, point, offset) order), and the first ``k`` of each pixel are scattered into
a dense (B, H, W, k) buffer. Nothing loops over points. Given ``buffers`` (the deferred renderer's,
in training) the pair buffer has a fixed size and nothing reads a count back from the device
(no ``nonzero``, no ``.item()``): a training step through it never waits for the GPU, and the
sort stays as small as the pairs that exist. Without them the buffer is sized exactly (one host
read).

Positions are treated as fixed (no gradient to them); gradients flow to the per-point
features and the background feature. :class:`WeightedGather` does the compositing sum
without keeping the (B, H, W, k, C) gathered features for the backward pass.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ..core.errors import It3dError
from ..core.typing import Float, Int, Tensor
from ..core.cameras import project
from .sample_buffers import CompactionBuffers

_DEPTH_BITS = 31


class Fragments(NamedTuple):
    idx: Int[Tensor, "B H W K"]  # point index, -1 where empty; sorted near to far
    dist2: Float[Tensor, "B H W K"]  # squared pixel distance from the pixel centre to the projection
    depth: Float[Tensor, "B H W K"]  # depth along the viewing axis (inf where empty)


def project_points(points: Float[Tensor, "N 3"], c2w: Float[Tensor, "B 4 4"], fovy: Float[Tensor, "B"],
                   height: int, width: int):
    """Pixel coordinates (B, N, 2) as (col, row), continuous, and depths (B, N) for each camera."""
    xys, zs = [], []
    for b in range(c2w.shape[0]):  # one camera at a time (a batch is a handful of views)
        xy, z = project(points.float(), c2w[b].float(), fovy[b], height, width)
        xys.append(xy)
        zs.append(z)
    return torch.stack(xys), torch.stack(zs)


def _candidates(xy: Tensor, z: Tensor, height: int, width: int, radius: float, near: float):
    """Every (view, point, window offset) candidate -> flat pixel id (B*H*W where the pixel centre is
    not inside the point's disc, outside the image, or the point is culled), squared distance, validity.
    Shapes (B, N, T) with T = (2 ceil(radius) + 1)^2."""
    bsz, n = z.shape
    # centres j + 0.5 inside (x - r, x + r): j from ceil(x - r - 0.5), at most floor(2r) + 1 of them
    span = int(math.floor(2 * radius)) + 1
    off = torch.arange(span, device=xy.device)
    oy, ox = torch.meshgrid(off, off, indexing="ij")
    oy, ox = oy.reshape(-1), ox.reshape(-1)  # T offsets
    x, y = xy[..., 0], xy[..., 1]
    ok = (z > near) & (x > -radius) & (x < width + radius) & (y > -radius) & (y < height + radius)
    # culled points may project anywhere (inf, nan): give them a harmless position before the integer cast
    x, y = torch.where(ok, x, torch.zeros_like(x)), torch.where(ok, y, torch.zeros_like(y))
    cx = torch.ceil(x - radius - 0.5).long()[..., None] + ox  # candidate pixel columns, (B, N, T)
    cy = torch.ceil(y - radius - 0.5).long()[..., None] + oy
    d2 = (cx.to(x.dtype) + 0.5 - x[..., None]) ** 2 + (cy.to(y.dtype) + 0.5 - y[..., None]) ** 2
    keep = ok[..., None] & (d2 < radius * radius) & (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    npix = bsz * height * width
    base = torch.arange(bsz, device=xy.device).view(bsz, 1, 1) * (height * width)
    pix = torch.where(keep, base + cy * width + cx, torch.full_like(cx, npix))
    return pix, d2, keep


EXACT = CompactionBuffers(0.0, "point fragments", "left out of their pixels", "")  # sized exactly, one host read


def rasterize_torch(xy: Float[Tensor, "B N 2"], z: Float[Tensor, "B N"], height: int, width: int, radius: float,
                    k: int, near: float = 1e-4, buffers: Optional[CompactionBuffers] = None,
                    key: str = "fragments") -> Fragments:
    """Rasterize projected points (pixel coordinates + depth) into per-pixel fragment lists. ``buffers``:
    fixed-size pair buffers (entry ``key``) for a sync-free training step; default exact."""
    if radius <= 0 or k < 1:
        raise It3dError(f"point rasterizer: radius must be > 0 and k >= 1 (got radius={radius}, k={k})")
    bsz, n = z.shape
    npix = bsz * height * width
    device = xy.device
    shape = (bsz, height, width, k)
    if n == 0:  # no points: every slot empty
        return Fragments(torch.full(shape, -1, dtype=torch.long, device=device), torch.zeros(shape, device=device),
                         torch.full(shape, float("inf"), device=device))
    with torch.no_grad():
        pix, d2, keep = _candidates(xy.detach(), z.detach(), height, width, float(radius), near)
        t = pix.shape[-1]
        # depths quantised to 31 bits over the range of the points with a kept candidate (in double:
        # float32 would round the top to 2^31 and spill into the pixel bits)
        dep, used = z.detach(), keep.any(-1)
        lo = torch.where(used, dep, torch.full_like(dep, float("inf"))).amin().double()
        hi = torch.where(used, dep, torch.full_like(dep, -float("inf"))).amax().double()
        top = (1 << _DEPTH_BITS) - 1
        q = (dep.double() - lo) / (hi - lo).clamp_min(1e-12) * top
        q = torch.where(used, q, torch.zeros_like(q)).long().clamp_(0, top)
        # the pairs inside the disc, in (view, point, offset) order; unused buffer slots hold pix.numel()
        slot, _, _ = (EXACT if buffers is None else buffers).compact(keep, key, exact=buffers is None)
        src = slot.clamp_max(pix.numel() - 1)
        spix = torch.where(slot < pix.numel(), pix.reshape(-1)[src], torch.full_like(src, npix))
        cand = src // t  # flat (view, point) of each pair
        skey, order = torch.sort((spix << _DEPTH_BITS) | q.reshape(-1)[cand], stable=True)  # pixel, then depth
        del pix, keep
        spix = skey >> _DEPTH_BITS
        first = torch.searchsorted(spix, spix)  # index of the first fragment of each pixel
        rank = torch.arange(spix.numel(), device=device) - first
        sel = (rank < k) & (spix < npix)
        # the first k of each pixel go to their slots; everything else to a discarded extra row
        p = torch.where(sel, spix, torch.full_like(spix, npix))
        r = torch.where(sel, rank, torch.zeros_like(rank))
        cand, src = cand[order], src[order]
        idx = torch.full((npix + 1, k), -1, dtype=torch.long, device=device)
        dist2 = torch.zeros(npix + 1, k, device=device)
        depth = torch.full((npix + 1, k), float("inf"), device=device)
        idx[p, r] = cand % n
        dist2[p, r] = d2.reshape(-1)[src].float()
        depth[p, r] = z.detach().reshape(-1)[cand].float()
    return Fragments(idx[:npix].view(shape), dist2[:npix].view(shape), depth[:npix].view(shape))


def rasterize_pytorch3d(xy: Float[Tensor, "B N 2"], z: Float[Tensor, "B N"], height: int, width: int,
                        radius: float, k: int, near: float = 1e-4) -> Fragments:
    """Same fragments through ``pytorch3d.renderer.points.rasterize_points`` (imported lazily).

    pytorch3d's screen NDC has +x left, +y up and the shorter side spanning [-1, 1]; its
    radius and distances are in NDC units, converted here to pixels.
    """
    try:
        from pytorch3d.renderer.points import rasterize_points
        from pytorch3d.structures import Pointclouds
    except ImportError as e:
        raise It3dError(f"point rasterizer backend 'pytorch3d' needs pytorch3d ({e}); use backend: torch") from None
    s = float(min(height, width))
    ndc = torch.stack([(width - 2 * xy[..., 0]) / s, (height - 2 * xy[..., 1]) / s, z], -1).float()
    ndc = torch.where((z > near)[..., None], ndc, torch.full_like(ndc, -10.0))  # culled: behind the camera
    clouds = Pointclouds(points=list(ndc.detach()))
    idx, _, dists = rasterize_points(clouds, image_size=(height, width), radius=radius * 2.0 / s,
                                     points_per_pixel=k)
    n = xy.shape[1]
    valid = idx >= 0
    local = torch.where(valid, idx % max(n, 1), torch.full_like(idx, -1))  # packed -> per-cloud index
    dist2 = torch.where(valid, dists * (s / 2.0) ** 2, torch.zeros_like(dists))
    zz = z.detach().reshape(-1)[idx.clamp_min(0).reshape(-1)].view(idx.shape)
    depth = torch.where(valid, zz, torch.full_like(zz, float("inf")))
    return Fragments(local.long(), dist2.float(), depth.float())


def pytorch3d_available() -> bool:
    try:
        import pytorch3d.renderer.points  # noqa: F401
    except ImportError:
        return False
    return True


def rasterize_projected(xy: Float[Tensor, "B N 2"], z: Float[Tensor, "B N"], height: int, width: int, radius: float,
                        k: int, backend: str = "torch", buffers: Optional[CompactionBuffers] = None,
                        key: str = "fragments") -> Fragments:
    """Rasterize already-projected points with the chosen backend (auto: pytorch3d on CUDA when installed)."""
    if backend == "auto":
        backend = "pytorch3d" if xy.is_cuda and pytorch3d_available() else "torch"
    if backend == "torch":
        return rasterize_torch(xy, z, height, width, radius, k, buffers=buffers, key=key)
    if backend == "pytorch3d":
        return rasterize_pytorch3d(xy, z, height, width, radius, k)
    raise It3dError(f"point rasterizer: unknown backend '{backend}' (expected auto, torch or pytorch3d)")


def rasterize(points: Float[Tensor, "N 3"], c2w: Float[Tensor, "B 4 4"], fovy: Float[Tensor, "B"], height: int,
              width: int, radius: float, k: int, backend: str = "torch") -> Fragments:
    """Project world points into each camera and rasterize them at ``height`` x ``width``."""
    xy, z = project_points(points, c2w, fovy, height, width)
    return rasterize_projected(xy, z, height, width, radius, k, backend)


def scale_coords(xy: Float[Tensor, "B N 2"], height: int, width: int, out_h: int, out_w: int) -> Float[Tensor, "B N 2"]:
    """Pixel coordinates at ``height`` x ``width`` -> those of an ``out_h`` x ``out_w`` image over the same
    field (the grid bilinear up-sampling with align_corners=False maps back onto the full image)."""
    return torch.stack([xy[..., 0] * (out_w / width), xy[..., 1] * (out_h / height)], -1)


# ---------------------------------------------------------------------------- compositing
class WeightedGather(torch.autograd.Function):
    """out[p] = sum_k w[p, k] * feats[idx[p, k]] (idx -1 contributes nothing), memory-light backward."""

    @staticmethod
    def forward(ctx, weights: Tensor, feats: Tensor, idx: Tensor) -> Tensor:
        safe = idx.clamp_min(0)
        w = torch.where(idx >= 0, weights, torch.zeros_like(weights))
        out = feats.new_zeros(idx.shape[0], feats.shape[1])
        for j in range(idx.shape[1]):  # k is small (<= 16): one gather per slot
            out += w[:, j:j + 1] * feats[safe[:, j]]
        ctx.save_for_backward(w, feats, idx)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        w, feats, idx = ctx.saved_tensors
        grad_w = grad_f = None
        valid = idx >= 0
        safe = idx.clamp_min(0)
        if ctx.needs_input_grad[0]:
            grad_w = torch.zeros_like(w)
            for j in range(idx.shape[1]):
                grad_w[:, j] = (grad_out * feats[safe[:, j]]).sum(-1)
            grad_w = grad_w * valid
        if ctx.needs_input_grad[1]:  # w is 0 in empty slots: they add nothing to row 0
            grad_f = torch.zeros_like(feats)
            for j in range(idx.shape[1]):
                grad_f.index_add_(0, safe[:, j], w[:, j:j + 1] * grad_out)
        return grad_w, grad_f, None


def composite(frags: Fragments, feats: Float[Tensor, "N C"], radius: float, background: Float[Tensor, "C"]):
    """Front-to-back alpha compositing of the fragments' features over ``background``.

    Returns (features B H W C, alpha B H W 1 = 1 - final transmittance, occupancy B H W 1 in {0, 1}).
    """
    bsz, h, w, k = frags.idx.shape
    valid = frags.idx >= 0
    alpha = torch.where(valid, (1.0 - frags.dist2 / (radius * radius)).clamp(0.0, 1.0), torch.zeros_like(frags.dist2))
    alpha = alpha.to(feats.dtype).reshape(-1, k)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha], -1), -1)
    weights = alpha * trans[:, :-1]
    out = WeightedGather.apply(weights, feats, frags.idx.reshape(-1, k))
    out = out + trans[:, -1:] * background.to(feats.dtype)
    occ = valid[..., :1].to(feats.dtype)
    return out.view(bsz, h, w, -1), (1.0 - trans[:, -1:]).view(bsz, h, w, 1), occ
