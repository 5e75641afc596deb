"""Fused multi-resolution hash encoding in Triton: forward and backward, same table layout and
conventions as the pure-torch path of :mod:`it3d.encodings.hash_grid` (which is the reference).

One program handles ``BLOCK`` points: for every level it computes the cell and the trilinear
weights once, gathers the 8 corner rows of ``F`` features and blends them in registers, so the
(8 x L x N) index and weight tensors of the torch path never exist in memory. The backward
scatters ``w * grad`` into the table with atomic adds and, when asked, accumulates the input
gradient ``d out / d x`` (``d w / d x`` is +-res x the product of the other two axes' weights)
in registers, looping over the levels. That backward is differentiable again w.r.t. the table
and the upstream gradient (a third kernel), which is what training analytic normals with
``create_graph=True`` needs; second derivatives w.r.t. the positions are not provided.

Imported only when the Triton backend runs: Triton compiles the kernels on first use (no build
step at install). On a CPU, ``TRITON_INTERPRET=1`` (set before this module is imported) runs the
same kernels in Triton's interpreter, which is how the tests check them against the torch path.
Written against the language features of Triton 3.6 - 3.9 (``tl.static_range``, 2-D blocks,
``tl.atomic_add``, int64 arithmetic).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .hash_grid import PRIMES, HashGridFunction

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _axis(x_ptr, n, mask, axis: tl.constexpr, res):
    """Clamped coordinate of ``axis`` -> (cell corner as int64, fraction in the cell, clamp mask)."""
    x = tl.load(x_ptr + n * 3 + axis, mask=mask, other=0.0)
    inside = (x >= 0.0) & (x <= 1.0)  # where the clamp passes gradients
    pos = tl.minimum(tl.maximum(x, 0.0), 1.0) * res
    cell = tl.maximum(tl.minimum(pos.to(tl.int32).to(tl.float32), res - 1.0), 0.0)  # pos >= 0: trunc = floor
    return cell.to(tl.int64), pos - cell, inside


@triton.jit
def _row(cx, cy, cz, dx: tl.constexpr, dy: tl.constexpr, dz: tl.constexpr, stride1, dense, hmask, p1, p2, offset):
    """Table row of the corner (cx + dx, cy + dy, cz + dz): dense index or spatial hash."""
    ix = cx + dx
    iy = cy + dy
    iz = cz + dz
    dense_i = ix + iy * stride1 + iz * stride1 * stride1
    hash_i = (ix ^ (iy * p1) ^ (iz * p2)) & hmask
    return offset + tl.where(dense != 0, dense_i, hash_i)


@triton.jit
def _hash_fwd(x_ptr, table_ptr, res_ptr, off_ptr, dense_ptr, out_ptr, N, hmask, p1, p2,
              L: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr):
    lvl = tl.program_id(1)
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    n = n.to(tl.int64)
    f = tl.arange(0, F)
    res = tl.load(res_ptr + lvl)
    offset = tl.load(off_ptr + lvl)
    dense = tl.load(dense_ptr + lvl)
    stride1 = res.to(tl.int64) + 1
    cx, fx, _ = _axis(x_ptr, n, mask, 0, res)
    cy, fy, _ = _axis(x_ptr, n, mask, 1, res)
    cz, fz, _ = _axis(x_ptr, n, mask, 2, res)
    acc = tl.zeros([BLOCK, F], dtype=tl.float32)
    for c in tl.static_range(8):
        dx = (c >> 2) & 1
        dy = (c >> 1) & 1
        dz = c & 1
        wx = fx if dx else 1.0 - fx
        wy = fy if dy else 1.0 - fy
        wz = fz if dz else 1.0 - fz
        w = wx * wy * wz
        row = _row(cx, cy, cz, dx, dy, dz, stride1, dense, hmask, p1, p2, offset)
        feat = tl.load(table_ptr + row[:, None] * F + f[None, :], mask=mask[:, None], other=0.0)
        acc += feat * w[:, None]
    tl.store(out_ptr + n[:, None] * (L * F) + lvl * F + f[None, :], acc, mask=mask[:, None])


@triton.jit
def _hash_bwd(x_ptr, table_ptr, res_ptr, off_ptr, dense_ptr, g_ptr, gtable_ptr, gx_ptr, N, hmask, p1, p2,
              L: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr, WANT_TABLE: tl.constexpr,
              WANT_X: tl.constexpr):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    n = n.to(tl.int64)
    f = tl.arange(0, F)
    gxa = tl.zeros([BLOCK], dtype=tl.float32)
    gya = tl.zeros([BLOCK], dtype=tl.float32)
    gza = tl.zeros([BLOCK], dtype=tl.float32)
    ix = tl.zeros([BLOCK], dtype=tl.int1)
    iy = tl.zeros([BLOCK], dtype=tl.int1)
    iz = tl.zeros([BLOCK], dtype=tl.int1)
    for lvl in range(L):
        res = tl.load(res_ptr + lvl)
        offset = tl.load(off_ptr + lvl)
        dense = tl.load(dense_ptr + lvl)
        stride1 = res.to(tl.int64) + 1
        cx, fx, ix = _axis(x_ptr, n, mask, 0, res)
        cy, fy, iy = _axis(x_ptr, n, mask, 1, res)
        cz, fz, iz = _axis(x_ptr, n, mask, 2, res)
        g = tl.load(g_ptr + n[:, None] * (L * F) + lvl * F + f[None, :], mask=mask[:, None], other=0.0)
        lx = tl.zeros([BLOCK], dtype=tl.float32)
        ly = tl.zeros([BLOCK], dtype=tl.float32)
        lz = tl.zeros([BLOCK], dtype=tl.float32)
        for c in tl.static_range(8):
            dx = (c >> 2) & 1
            dy = (c >> 1) & 1
            dz = c & 1
            wx = fx if dx else 1.0 - fx
            wy = fy if dy else 1.0 - fy
            wz = fz if dz else 1.0 - fz
            row = _row(cx, cy, cz, dx, dy, dz, stride1, dense, hmask, p1, p2, offset)
            ptrs = row[:, None] * F + f[None, :]
            if WANT_TABLE:
                tl.atomic_add(gtable_ptr + ptrs, g * (wx * wy * wz)[:, None], mask=mask[:, None])
            if WANT_X:
                dot = tl.sum(tl.load(table_ptr + ptrs, mask=mask[:, None], other=0.0) * g, axis=1)
                sx = 1.0 if dx else -1.0
                sy = 1.0 if dy else -1.0
                sz = 1.0 if dz else -1.0
                lx += sx * (wy * wz) * dot
                ly += sy * (wx * wz) * dot
                lz += sz * (wx * wy) * dot
        if WANT_X:
            gxa += lx * res
            gya += ly * res
            gza += lz * res
    if WANT_X:  # the clamp to [0, 1] passes gradients only inside (ends included, as torch.clamp)
        tl.store(gx_ptr + n * 3 + 0, tl.where(ix, gxa, 0.0), mask=mask)
        tl.store(gx_ptr + n * 3 + 1, tl.where(iy, gya, 0.0), mask=mask)
        tl.store(gx_ptr + n * 3 + 2, tl.where(iz, gza, 0.0), mask=mask)


@triton.jit
def _hash_bwd2(x_ptr, table_ptr, res_ptr, off_ptr, dense_ptr, g_ptr, ggx_ptr, gtable_ptr, gg_ptr, N, hmask, p1, p2,
               L: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr, WANT_TABLE: tl.constexpr, WANT_G: tl.constexpr):
    """Backward of the input gradient (``gx = sum_l res sum_c dw_c/dx <table[row_c], g_l>``, linear in the
    table and in ``g``) for an upstream ``ggx``: with ``v_c = res sum_a ggx_a dw_c/dx_a``, the table gets
    ``v_c g_l`` at row_c and ``g_l`` gets ``sum_c v_c table[row_c]``."""
    lvl = tl.program_id(1)
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    n = n.to(tl.int64)
    f = tl.arange(0, F)
    res = tl.load(res_ptr + lvl)
    offset = tl.load(off_ptr + lvl)
    dense = tl.load(dense_ptr + lvl)
    stride1 = res.to(tl.int64) + 1
    cx, fx, ix = _axis(x_ptr, n, mask, 0, res)
    cy, fy, iy = _axis(x_ptr, n, mask, 1, res)
    cz, fz, iz = _axis(x_ptr, n, mask, 2, res)
    ax = tl.where(ix, tl.load(ggx_ptr + n * 3 + 0, mask=mask, other=0.0), 0.0) * res
    ay = tl.where(iy, tl.load(ggx_ptr + n * 3 + 1, mask=mask, other=0.0), 0.0) * res
    az = tl.where(iz, tl.load(ggx_ptr + n * 3 + 2, mask=mask, other=0.0), 0.0) * res
    g = tl.load(g_ptr + n[:, None] * (L * F) + lvl * F + f[None, :], mask=mask[:, None], other=0.0)
    acc = tl.zeros([BLOCK, F], dtype=tl.float32)
    for c in tl.static_range(8):
        dx = (c >> 2) & 1
        dy = (c >> 1) & 1
        dz = c & 1
        wx = fx if dx else 1.0 - fx
        wy = fy if dy else 1.0 - fy
        wz = fz if dz else 1.0 - fz
        sx = 1.0 if dx else -1.0
        sy = 1.0 if dy else -1.0
        sz = 1.0 if dz else -1.0
        v = sx * (wy * wz) * ax + sy * (wx * wz) * ay + sz * (wx * wy) * az
        row = _row(cx, cy, cz, dx, dy, dz, stride1, dense, hmask, p1, p2, offset)
        ptrs = row[:, None] * F + f[None, :]
        if WANT_TABLE:
            tl.atomic_add(gtable_ptr + ptrs, g * v[:, None], mask=mask[:, None])
        if WANT_G:
            acc += tl.load(table_ptr + ptrs, mask=mask[:, None], other=0.0) * v[:, None]
    if WANT_G:
        tl.store(gg_ptr + n[:, None] * (L * F) + lvl * F + f[None, :], acc, mask=mask[:, None])


def _block(n: int) -> int:
    # the interpreter runs one program at a time in numpy: fewer, larger blocks are faster there
    return 128 if not INTERPRET else max(16, min(1024, triton.next_power_of_2(max(n, 1))))


def _forward(x, table, res, offsets, dense, hmask: int):
    n, f, lv = x.shape[0], table.shape[1], res.shape[0]
    out = torch.empty(n, lv * f, device=x.device, dtype=torch.float32)
    if n > 0:
        blk = _block(n)
        _hash_fwd[(triton.cdiv(n, blk), lv)](x, table, res, offsets, dense, out, n, hmask, PRIMES[1], PRIMES[2],
                                            L=lv, F=f, BLOCK=blk)
    return out


class TritonKernels:
    """The three kernels behind :class:`it3d.encodings.hash_grid.HashGridFunction`'s interface (see
    :class:`it3d.encodings.hash_grid.TorchKernels`, the reference): ``(res: L float32, offsets: L int64,
    dense: L int32, hmask)`` are the encoding's level constants on the input's device."""

    def __init__(self, res, offsets, dense, hmask: int) -> None:
        self.res, self.offsets, self.dense, self.hmask = res, offsets, dense, hmask

    def forward(self, x, table):
        return _forward(x, table, self.res, self.offsets, self.dense, self.hmask)

    def backward(self, x, table, g, want_x: bool, want_t: bool):
        n, f, lv = x.shape[0], table.shape[1], self.res.shape[0]
        gt = torch.zeros_like(table) if want_t else None
        gx = torch.zeros_like(x) if want_x else None
        if n > 0 and (want_x or want_t):
            blk = _block(n)
            _hash_bwd[(triton.cdiv(n, blk),)](x, table, self.res, self.offsets, self.dense, g,
                                              table if gt is None else gt, x if gx is None else gx, n, self.hmask,
                                              PRIMES[1], PRIMES[2], L=lv, F=f, BLOCK=blk, WANT_TABLE=want_t,
                                              WANT_X=want_x)
        return gx, gt

    def backward2(self, x, table, g, ggx, want_t: bool, want_g: bool):
        n, f, lv = x.shape[0], table.shape[1], self.res.shape[0]
        gtable = torch.zeros_like(table) if want_t else None
        gg = torch.empty_like(g) if want_g else None
        blk = _block(n)
        _hash_bwd2[(triton.cdiv(n, blk), lv)](x, table, self.res, self.offsets, self.dense, g, ggx,
                                             table if gtable is None else gtable, g if gg is None else gg, n,
                                             self.hmask, PRIMES[1], PRIMES[2], L=lv, F=f, BLOCK=blk,
                                             WANT_TABLE=want_t, WANT_G=want_g)
        return gtable, gg


class TritonHashGrid(HashGridFunction):
    """:class:`it3d.encodings.hash_grid.HashGridFunction` with :class:`TritonKernels`: ``apply(TritonKernels(...),
    x: N 3 float32, table: T F float32) -> N (L F)``."""
