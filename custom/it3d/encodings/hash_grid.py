"""Multi-resolution hash encoding (Instant-NGP, Müller et al. 2022): a pure-PyTorch path that runs
everywhere and is the reference, a fused Triton kernel (forward and backward, same table, compiled
on first use) and tiny-cuda-nn.

``backend``:

* ``auto`` (default): the Triton kernel for inputs on a CUDA device when ``triton`` is importable
  (it ships with CUDA builds of torch) and supports the GPU (compute capability 8.0+, or ROCm),
  the torch path otherwise (CPU, older GPUs, or no Triton);
* ``torch``: always the torch path;
* ``triton``: always the kernel (an error on CPU inputs unless ``TRITON_INTERPRET=1``, Triton's
  slow CPU interpreter that the tests use);
* ``tcnn``: tiny-cuda-nn's ``Encoding`` (its own parameters, see below).

The choice is made per call from the input's device, and the torch and Triton paths share one
parameter table, so a checkpoint trained on a GPU loads and renders identically on a CPU.

Graphs. Whenever autograd records (the table gradient; the input gradient of analytic normals) both
paths run one autograd Function, :class:`HashGridFunction`, over their kernels (:class:`TorchKernels`
here, ``TritonKernels`` in the Triton module): it keeps only the points for its backward, which
recomputes the cells and weights and gives table and input gradients, and that backward is itself
differentiable w.r.t. the table and the upstream gradient, so analytic normals trained with
``create_graph`` (a normal loss) work; only second derivatives w.r.t. the input points are not provided
(the renderer's sample points are constants). On the paper's grid a whole coarse step (CPU, 96 - 128 px)
peaks at ~1.9 KB a sample, with or without the normals' second-order graph, against ~7.1 KB with
autograd's own graph of the gathers and ~3.5 KB for an albedo step that kept the corner rows and
weights (``tests/benchmarks/bench_coarse.py --memory``).

Conventions of the torch backend (the paper's):

* level ``l`` has resolution ``N_l = floor(N_min * b**l)`` with
  ``b = exp((ln N_max - ln N_min) / (L - 1))`` (``per_level_scale`` is derived from
  ``max_resolution`` unless given);
* an input ``x`` in [0, 1]^3 (clamped) is scaled to ``x * N_l``; its cell's corner is
  ``floor(x * N_l)`` (clamped to ``N_l - 1`` so x = 1 stays in the last cell) and the 8
  corner features are blended trilinearly;
* a level whose ``(N_l + 1)**3`` grid vertices fit in the table (``2**log2_hashmap_size``
  entries) is indexed densely (``i + j (N_l+1) + k (N_l+1)**2``) and gets a table of exactly
  that size; finer levels use the spatial hash ``(i * 1) ^ (j * 2654435761) ^ (k * 805459861)``
  modulo the table size;
* table entries start uniform in ``[-init_scale, init_scale]`` (1e-4 in the paper).

tiny-cuda-nn shifts its grids by half a cell and stores parameters in half precision, so the
two backends are interchangeable in capacity but their parameters are not.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.profiler import record_function

from ..core.config import ConfigError, parse_structured
from ..core.errors import It3dError
from ..core.typing import Float, Tensor

PRIMES = (1, 2654435761, 805459861)
# a small grid for tests and tiny smoke configs (4 levels, 4..32, 2^12 entries: 2 dense + 2 hashed levels)
TINY_HASH_GRID = {"otype": "HashGrid", "n_levels": 4, "n_features_per_level": 2, "log2_hashmap_size": 12,
                  "base_resolution": 4, "max_resolution": 32, "backend": "torch"}


@dataclass
class HashGridConfig:
    otype: str = "HashGrid"
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    max_resolution: int = 2048
    per_level_scale: Optional[float] = None  # derived from max_resolution when None
    init_scale: float = 1.0e-4
    backend: str = "auto"  # auto (triton on CUDA inputs when importable, else torch) | torch | triton | tcnn


BACKENDS = ("auto", "torch", "triton", "tcnn")


def triton_kernels():
    """The Triton kernel module (imported on first use) or None when Triton is not importable. Triton
    reads ``TRITON_INTERPRET`` when it is first imported: set it before that to use its CPU interpreter."""
    import importlib

    try:
        return importlib.import_module(f"{__package__}._hash_grid_triton")
    except ImportError:
        return None


def triton_interpreting() -> bool:
    mod = triton_kernels()
    return mod is not None and mod.INTERPRET


def _triton_supports(device: torch.device) -> bool:
    """Triton's supported GPUs: NVIDIA compute capability 8.0+ (its README) or ROCm."""
    return torch.version.hip is not None or torch.cuda.get_device_capability(device) >= (8, 0)


def tcnn_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import tinycudann  # noqa: F401
    except Exception:
        return False
    return True


class HashGridEncoding(nn.Module):
    """``forward(x: N x 3 in [0, 1]) -> N x (n_levels * n_features_per_level)``."""

    def __init__(self, cfg=None, n_input_dims: int = 3, path: str = "encoding") -> None:
        super().__init__()
        self.cfg = parse_structured(HashGridConfig, cfg, path)
        c = self.cfg
        if n_input_dims != 3:
            raise ConfigError(f"{path}: the hash grid encodes 3-D points, got n_input_dims={n_input_dims}")
        if c.n_levels < 1 or c.base_resolution < 1 or c.max_resolution < c.base_resolution:
            raise ConfigError(f"{path}: need n_levels >= 1 and 1 <= base_resolution <= max_resolution")
        if c.backend not in BACKENDS:
            raise ConfigError(f"{path}.backend: expected one of {', '.join(BACKENDS)}, got '{c.backend}'")
        self.n_input_dims = 3
        self.n_output_dims = c.n_levels * c.n_features_per_level
        if c.per_level_scale is not None:
            self.per_level_scale = float(c.per_level_scale)
        elif c.n_levels == 1:
            self.per_level_scale = 1.0
        else:
            span = math.log(c.max_resolution) - math.log(c.base_resolution)
            self.per_level_scale = math.exp(span / (c.n_levels - 1))
        self.resolutions = [int(math.floor(c.base_resolution * self.per_level_scale ** lv + 1e-6))
                            for lv in range(c.n_levels)]
        self.table_size = 2 ** c.log2_hashmap_size
        self.dense = [(r + 1) ** 3 <= self.table_size for r in self.resolutions]
        sizes = [(r + 1) ** 3 if d else self.table_size for r, d in zip(self.resolutions, self.dense)]
        self.level_sizes = sizes
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        self.level_offsets = offsets

        self.path = path
        if c.backend == "tcnn":
            self.backend = "tcnn"
            self._tcnn = _make_tcnn(c, self.per_level_scale, path)
            return
        if c.backend == "triton" and triton_kernels() is None:
            raise ConfigError(f"{path}.backend=triton but triton cannot be imported (it ships with CUDA builds of "
                              f"torch; pip install triton); use backend: auto or torch")
        # what runs on CUDA inputs (CPU inputs take the torch path unless backend is triton)
        self.backend = "torch" if c.backend == "torch" or (c.backend == "auto" and not (
            torch.cuda.is_available() and triton_kernels() is not None)) else "triton"
        if c.n_features_per_level & (c.n_features_per_level - 1) and c.backend == "triton":
            raise ConfigError(f"{path}: the triton backend needs n_features_per_level a power of 2, "
                              f"got {c.n_features_per_level}")
        table = torch.empty(offsets[-1], c.n_features_per_level).uniform_(-c.init_scale, c.init_scale)
        self.params = nn.Parameter(table)
        # per-group constants (dense levels first: resolutions grow with the level)
        nd = sum(self.dense)
        self.n_dense = nd
        res = torch.tensor(self.resolutions, dtype=torch.float32)
        self.register_buffer("_res", res, persistent=False)
        self.register_buffer("_offsets", torch.tensor(offsets[:-1], dtype=torch.int64), persistent=False)
        stride = torch.tensor([[1, r + 1, (r + 1) ** 2] for r in self.resolutions], dtype=torch.int64)
        self.register_buffer("_stride", stride, persistent=False)
        self.register_buffer("_dense", torch.tensor(self.dense, dtype=torch.int32), persistent=False)

    def forward(self, x: Float[Tensor, "N 3"], twice_differentiable: bool = False) -> Float[Tensor, "N F"]:
        """``twice_differentiable``: a graph that can be differentiated twice (analytic normals trained with
        ``create_graph=True``); every graph the hash grid builds (:class:`HashGridFunction`) is."""
        with record_function("it3d::encoding"):
            if self.backend == "tcnn":
                return self._tcnn(x.clamp(0.0, 1.0)).float()
            if self._use_triton(x, twice_differentiable):
                try:
                    return self._forward_triton(x)
                except Exception as e:  # the kernel does not compile / launch with this Triton or GPU
                    if self.cfg.backend == "triton":
                        raise It3dError(f"{self.path}.backend=triton: the kernel failed ({type(e).__name__}: "
                                        f"{str(e).strip().splitlines()[-1]}); use backend: torch") from None
                    self._triton_failed = True
                    logging.getLogger("it3d").warning(
                        f"{self.path}: the Triton hash-grid kernel failed ({type(e).__name__}); using the torch path")
            return self._forward_torch(x, twice_differentiable)

    # ------------------------------------------------------------------ triton backend
    def _use_triton(self, x: Tensor, twice: bool) -> bool:
        mode = self.cfg.backend
        f = self.cfg.n_features_per_level
        if mode == "torch" or f & (f - 1) or getattr(self, "_triton_failed", False):
            return False
        if x.is_cuda:
            return triton_kernels() is not None and (mode == "triton" or _triton_supports(x.device))
        if mode == "triton":
            if not triton_interpreting():
                raise It3dError(f"{self.path}.backend=triton: the kernel runs on CUDA inputs, got {x.device.type} "
                                f"(use backend: auto or torch, or TRITON_INTERPRET=1 for Triton's CPU interpreter)")
            return True
        return False

    def _forward_triton(self, x: Tensor) -> Tensor:
        k = triton_kernels()
        kern = k.TritonKernels(self._res, self._offsets, self._dense, self.table_size - 1)
        return k.TritonHashGrid.apply(kern, x.float().contiguous(), self.params)

    # ------------------------------------------------------------------ torch backend
    def _forward_torch(self, x: Tensor, twice: bool) -> Tensor:
        kern = TorchKernels(self)
        x = x.float().contiguous()
        if torch.is_grad_enabled():  # the recomputing Function, which keeps only x (twice-differentiable too)
            return TorchHashGrid.apply(kern, x, self.params)
        return kern.forward(x, self.params)

    def _groups(self):
        """(first level, end level, dense) of the dense and the hashed levels (dense levels come first)."""
        L = len(self.resolutions)
        return [(lo, hi, d) for lo, hi, d in ((0, self.n_dense, True), (self.n_dense, L, False)) if hi > lo]

    def _corners(self, xs: Tensor, lo: int, hi: int, dense: bool):
        """Table rows and trilinear weights of the 8 cell corners, corner c = (bit2, bit1, bit0) = (dx, dy, dz),
        and the per-axis weights ``((1 - fx, fx), (1 - fy, fy), (1 - fz, fz))`` (each (l, N)) they are made of."""
        res = self._res[lo:hi].view(-1, 1)
        terms, weights = [], []
        for a in range(3):
            pos = xs[a].unsqueeze(0) * res  # (l, N)
            cell = torch.minimum(torch.floor(pos), res - 1).clamp_min(0)
            frac = pos - cell  # differentiable in x
            cell = cell.long()
            if dense:
                mult = self._stride[lo:hi, a].view(-1, 1)
                t0 = cell * mult
                t1 = t0 + mult
                if a == 0:  # fold the level offsets into one axis (dense indices are sums)
                    off = self._offsets[lo:hi].view(-1, 1)
                    t0, t1 = t0 + off, t1 + off
            else:
                t0 = cell * PRIMES[a]
                t1 = t0 + PRIMES[a]
            terms.append((t0, t1))
            weights.append((1.0 - frac, frac))
        idx, w = [], []
        mask = self.table_size - 1
        off = None if dense else self._offsets[lo:hi].view(-1, 1)
        for dx in range(2):
            for dy in range(2):
                if dense:
                    hxy = terms[0][dx] + terms[1][dy]
                else:
                    hxy = torch.bitwise_xor(terms[0][dx], terms[1][dy])
                wxy = weights[0][dx] * weights[1][dy]
                for dz in range(2):
                    if dense:
                        i = hxy + terms[2][dz]
                    else:
                        i = torch.bitwise_and(torch.bitwise_xor(hxy, terms[2][dz]), mask) + off
                    idx.append(i)
                    w.append(wxy * weights[2][dz])
        return idx, w, weights


def _blend(table: Tensor, idx, w) -> Tensor:
    """``sum_c w[c] * table[idx[c]]`` -> (l, N, F) for 8 (l, N) row and weight tensors."""
    l, n = idx[0].shape
    out = None
    for i, wc in zip(idx, w):
        term = table.index_select(0, i.reshape(-1)).view(l, n, table.shape[1]) * wc.unsqueeze(-1)
        out = term if out is None else out.add_(term)
    return out


def _inside(x: Tensor) -> Tensor:
    """1 where a coordinate is in [0, 1] (ends included: where ``torch.clamp`` passes gradients), else 0."""
    return ((x >= 0.0) & (x <= 1.0)).to(x.dtype)


def _input_derivative_weights(axes, a: Tensor) -> Tensor:
    """``v_c = sum_axis a_axis d w_c / d f_axis`` for the 8 corners (the order of ``_corners``) -> (8, l, N):
    ``axes`` the per-axis weights ``((1 - fx, fx), ...)``, ``a`` (3, l, N) the per-axis factors
    (``d (1 - f) / d f = -1``, ``d f / d f = 1``; no constant tensor, so nothing is uploaded per call)."""
    wx, wy, wz = (torch.stack(p) for p in axes)  # (2, l, N) each
    sx, sy, sz = (torch.stack((-t, t)) for t in a)  # (2, l, N): a_axis x the sign per corner bit
    v = (sx[:, None, None] * wy[None, :, None] * wz[None, None, :]
         + wx[:, None, None] * sy[None, :, None] * wz[None, None, :]
         + wx[:, None, None] * wy[None, :, None] * sz[None, None, :])
    return v.reshape(8, *a.shape[1:])


class TorchKernels:
    """The hash grid's three kernels in torch ops, over chunks of points (the (8 x levels x chunk) rows and
    weights of a chunk are the only temporaries: ~0.12 GB for 2^15 points on the paper's grid; on CUDA 2^17
    points, fewer launches) -- the same entry points as the Triton kernels
    (``_hash_grid_triton.TritonKernels``), for :class:`HashGridFunction`:

    * ``forward(x, table) -> N (L F)``: the encoding;
    * ``backward(x, table, g, want_x, want_t) -> (d/dx N 3, d/dtable)`` of ``<forward(x, table), g>``;
    * ``backward2(x, table, g, ggx, want_t, want_g) -> (d/dtable, d/dg)`` of ``<backward(...)[0], ggx>``.

    Gradients w.r.t. x pass where x is inside [0, 1] (ends included, as ``torch.clamp``)."""

    chunk = {"cpu": 2 ** 15, "cuda": 2 ** 17}

    def __init__(self, enc: "HashGridEncoding") -> None:
        self.enc = enc

    def _levels(self, x: Tensor):
        """-> per chunk and level group: (chunk slice, lo, hi, rows, weights, per-axis weights, res (l, 1))."""
        e = self.enc
        step = self.chunk.get(x.device.type, self.chunk["cpu"])
        for s in range(0, x.shape[0], step):
            xs = x[s:s + step].clamp(0.0, 1.0).t().contiguous()
            for lo, hi, dense in e._groups():
                idx, w, axes = e._corners(xs, lo, hi, dense)
                yield slice(s, s + xs.shape[1]), lo, hi, idx, w, axes, e._res[lo:hi].view(-1, 1)

    def _view(self, t: Tensor, sl: slice, lo: int, hi: int) -> Tensor:
        """Rows ``sl``, levels lo..hi of an N (L F) tensor as (l, n, F)."""
        f = self.enc.cfg.n_features_per_level
        return t[sl].view(-1, len(self.enc.resolutions), f)[:, lo:hi].permute(1, 0, 2)

    def forward(self, x: Tensor, table: Tensor) -> Tensor:
        out = x.new_empty(x.shape[0], self.enc.n_output_dims)
        for sl, lo, hi, idx, w, _, _ in self._levels(x):
            self._view(out, sl, lo, hi).copy_(_blend(table, idx, w))
        return out

    def backward(self, x: Tensor, table: Tensor, g: Tensor, want_x: bool, want_t: bool):
        gt = torch.zeros_like(table) if want_t else None
        gx = torch.zeros_like(x) if want_x else None
        if not (want_x or want_t):
            return gx, gt
        f = table.shape[1]
        for sl, lo, hi, idx, w, axes, res in self._levels(x):
            gl = self._view(g, sl, lo, hi)  # (l, n, F)
            rows = torch.stack(idx).reshape(-1)
            if want_t:
                gt.index_add_(0, rows, (torch.stack(w).unsqueeze(-1) * gl).reshape(-1, f))
            if want_x:  # d/df_axis of sum_c w_c <table[row_c], g> = sum_c (d w_c / d f_axis) dot_c; df/dx = res
                dots = (table.index_select(0, rows).view(8, *gl.shape) * gl).sum(-1).view(2, 2, 2, *gl.shape[:2])
                wx, wy, wz = (torch.stack(p) for p in axes)  # (2, l, n)
                lx = ((dots[1] - dots[0]) * wy[:, None] * wz[None]).sum((0, 1))
                ly = ((dots[:, 1] - dots[:, 0]) * wx[:, None] * wz[None]).sum((0, 1))
                lz = ((dots[:, :, 1] - dots[:, :, 0]) * wx[:, None] * wy[None]).sum((0, 1))
                gx[sl] += (torch.stack((lx, ly, lz)) * res).sum(1).t()
        if want_x:
            gx.mul_(_inside(x))
        return gx, gt

    def backward2(self, x: Tensor, table: Tensor, g: Tensor, ggx: Tensor, want_t: bool, want_g: bool):
        gtable = torch.zeros_like(table) if want_t else None
        gg = torch.zeros_like(g) if want_g else None
        f = table.shape[1]
        a = (ggx * _inside(x)).t()  # 3 N
        for sl, lo, hi, idx, w, axes, res in self._levels(x):
            v = _input_derivative_weights(axes, a[:, sl].unsqueeze(1) * res)  # (8, l, n)
            rows = torch.stack(idx).reshape(-1)
            if want_t:
                gl = self._view(g, sl, lo, hi)
                gtable.index_add_(0, rows, (v.unsqueeze(-1) * gl).reshape(-1, f))
            if want_g:
                got = (table.index_select(0, rows).view(*v.shape, f) * v.unsqueeze(-1)).sum(0)
                self._view(gg, sl, lo, hi).copy_(got)
        return gtable, gg


class _Pass:
    depth = 0  # > 0 inside own_input_gradient(); a module global, not thread-local: CUDA backward runs
    # on the autograd engine's device thread while the caller waits


@contextmanager
def own_input_gradient():
    """The analytic-normal pass of a geometry whose sample points are a leaf it made itself: a hash grid
    evaluated inside gives ``autograd.grad`` calls made inside the input gradient alone (the table
    gradient those calls would throw away is not computed), and gives its input no gradient in any
    later backward (nothing reads that leaf's ``.grad``); the table gradient then flows as usual.
    Saves one of the three table scatters of a twice-differentiated step (and one input pass)."""
    _Pass.depth += 1
    try:
        yield
    finally:
        _Pass.depth -= 1


class HashGridFunction(torch.autograd.Function):
    """``(kernels, x: N 3 float32, table: T F float32) -> N (L F)`` with a recomputing backward: only ``x``
    and the table are kept for the backward pass, whose kernels recompute the cells and weights. The
    backward (:class:`_HashGridBackward`) is itself differentiable w.r.t. the table and the upstream
    gradient, so ``create_graph=True`` works (analytic normals trained through a normal loss); second
    derivatives w.r.t. ``x`` are not provided (the renderer's sample points are constants). ``kernels``:
    :class:`TorchKernels` or the Triton module's ``TritonKernels``; subclasses name the backend in the
    graph (``grad_fn.name()``)."""

    @staticmethod
    def forward(ctx, kern, x, table):
        ctx.kern = kern
        ctx.own_x = _Pass.depth > 0
        ctx.save_for_backward(x, table)
        return kern.forward(x, table)

    @staticmethod
    def backward(ctx, g):
        x, table = ctx.saved_tensors
        inside = _Pass.depth > 0  # an autograd.grad for the input alone (see own_input_gradient)
        want_x = ctx.needs_input_grad[1] and (inside or not ctx.own_x)
        want_t = ctx.needs_input_grad[2] and not (inside and ctx.own_x)
        gx, gt = _HashGridBackward.apply(ctx.kern, x, table, g.float().contiguous(), want_x, want_t)
        return None, gx, gt


class _HashGridBackward(torch.autograd.Function):
    """``(kernels, x, table, g) -> (d/dx, d/dtable)`` of ``<HashGridFunction(x, table), g>``; differentiable
    once more w.r.t. ``table`` and ``g``."""

    @staticmethod
    def forward(ctx, kern, x, table, g, want_x: bool, want_t: bool):
        gx, gt = kern.backward(x, table, g, want_x, want_t)
        ctx.kern = kern
        ctx.save_for_backward(x, table, g)
        return gx, gt

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ggx, ggt):
        x, table, g = ctx.saved_tensors
        want_t, want_g = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        gtable = gg = None
        if ggx is not None and x.shape[0] > 0 and (want_t or want_g):
            gtable, gg = ctx.kern.backward2(x, table, g, ggx.float().contiguous(), want_t, want_g)
        if ggt is not None and want_g:  # d table_grad / d g: the forward blend of ggt
            fg = ctx.kern.forward(x, ggt.float().contiguous())
            gg = fg if gg is None else gg + fg
        return None, None, gtable, gg, None, None


class TorchHashGrid(HashGridFunction):
    """:class:`HashGridFunction` with :class:`TorchKernels`."""


def _make_tcnn(c: HashGridConfig, per_level_scale: float, path: str) -> nn.Module:
    try:
        import tinycudann as tcnn
    except Exception as e:
        raise ConfigError(f"{path}.backend=tcnn but tinycudann cannot be imported ({e}); use backend: torch") from None
    return tcnn.Encoding(3, {
        "otype": "HashGrid",
        "n_levels": c.n_levels,
        "n_features_per_level": c.n_features_per_level,
        "log2_hashmap_size": c.log2_hashmap_size,
        "base_resolution": c.base_resolution,
        "per_level_scale": per_level_scale,
    })
