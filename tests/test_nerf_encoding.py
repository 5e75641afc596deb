"""Hash-grid and frequency encodings against slow, explicit reference implementations."""
import math
import sys

import pytest
import torch

from it3d.core.config import ConfigError
from it3d.core.errors import It3dError
from it3d.encodings import hash_grid
from it3d.encodings.factory import build_encoding, make_mlp
from it3d.encodings.frequency import FrequencyEncoding
from it3d.encodings.hash_grid import HashGridEncoding

P1, P2 = 2654435761, 805459861


pytestmark = pytest.mark.usefixtures("one_thread")
# Triton ships wheels for Linux only (requirements.txt installs it there); elsewhere its tests skip.
triton_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="triton has no wheels for this platform")
SMALL = {"n_levels": 4, "n_features_per_level": 2, "log2_hashmap_size": 10, "base_resolution": 4,
         "max_resolution": 32, "backend": "torch"}


def reference_encode(enc: HashGridEncoding, x: torch.Tensor):
    """Per point, per level, per corner, with Python ints.
    Returns (features N x L*F, {table row: d(sum of one feature channel) / d row})."""
    table = enc.params.detach().double()
    T = 2 ** enc.cfg.log2_hashmap_size
    out = torch.zeros(x.shape[0], enc.n_output_dims, dtype=torch.float64)
    row_weight = {}
    offset = 0
    for lv in range(enc.cfg.n_levels):
        n_l = math.floor(enc.cfg.base_resolution * enc.per_level_scale ** lv + 1e-6)
        dense = (n_l + 1) ** 3 <= T
        size = (n_l + 1) ** 3 if dense else T
        for p in range(x.shape[0]):
            pos = [min(max(float(v), 0.0), 1.0) * n_l for v in x[p]]
            cell = [min(math.floor(v), n_l - 1) for v in pos]
            frac = [v - c for v, c in zip(pos, cell)]
            for corner in range(8):
                bits = [(corner >> 2) & 1, (corner >> 1) & 1, corner & 1]
                c = [cell[a] + bits[a] for a in range(3)]
                w = 1.0
                for a in range(3):
                    w *= frac[a] if bits[a] else 1.0 - frac[a]
                if dense:
                    i = c[0] + c[1] * (n_l + 1) + c[2] * (n_l + 1) ** 2
                else:
                    i = ((c[0] * 1) ^ (c[1] * P1) ^ (c[2] * P2)) % T
                row = offset + i
                f = enc.cfg.n_features_per_level
                out[p, lv * f:(lv + 1) * f] += w * table[row]
                row_weight[row] = row_weight.get(row, 0.0) + w
        offset += size
    return out, row_weight


def test_levels_and_table_layout_follow_the_paper():
    enc = HashGridEncoding({"backend": "torch"})
    assert enc.cfg.n_levels == 16 and enc.n_output_dims == 32
    assert enc.per_level_scale == pytest.approx((2048 / 16) ** (1 / 15))
    assert enc.resolutions[0] == 16 and enc.resolutions[-1] == 2048
    # (N+1)^3 <= 2^19 for N = 16, 22, 30, 42, 58; N = 80 needs 531441 > 524288 entries
    assert enc.resolutions[:6] == [16, 22, 30, 42, 58, 80]
    assert enc.dense == [True] * 5 + [False] * 11
    assert enc.params.shape == (sum((n + 1) ** 3 for n in enc.resolutions[:5]) + 11 * 2 ** 19, 2)
    assert enc.params.abs().max() <= 1e-4


@pytest.mark.parametrize("twice", [False, True])
def test_hash_grid_matches_slow_reference(twice):
    torch.manual_seed(0)
    enc = HashGridEncoding(SMALL)
    assert enc.resolutions == [4, 8, 16, 32] and enc.dense == [True, True, False, False]
    with torch.no_grad():
        enc.params.uniform_(-1, 1)
    x = torch.cat([torch.rand(40, 3), torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.25, 1.0],
                                                    [1.2, -0.1, 0.3]])])
    ref, _ = reference_encode(enc, x)
    got = enc(x.requires_grad_(True), twice_differentiable=twice)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_default_hash_grid_matches_reference_and_gradients_reach_the_table():
    torch.manual_seed(1)
    enc = HashGridEncoding({"backend": "torch"})
    with torch.no_grad():
        enc.params.uniform_(-1, 1)
    x = torch.rand(3, 3)
    ref, row_weight = reference_encode(enc, x)
    got = enc(x)
    # float32 positions at level resolution 2048 carry ~1e-4 of rounding in the trilinear weights
    torch.testing.assert_close(got.double(), ref, atol=5e-4, rtol=1e-4)
    # d(sum of features of one channel)/d(table row) = sum of that row's trilinear weights
    got[:, 0::2].sum().backward()
    g = enc.params.grad
    rows = torch.tensor(sorted(row_weight))
    expected = torch.tensor([row_weight[int(r)] for r in rows], dtype=torch.float32)
    torch.testing.assert_close(g[rows, 0], expected, atol=5e-4, rtol=1e-4)
    assert torch.count_nonzero(g[:, 1]) == 0
    untouched = torch.ones(g.shape[0], dtype=torch.bool)
    untouched[rows] = False
    assert torch.count_nonzero(g[untouched]) == 0


def test_input_gradient_matches_finite_differences():
    torch.manual_seed(2)
    enc = HashGridEncoding(SMALL)
    with torch.no_grad():
        enc.params.uniform_(-1, 1)
    x = (torch.rand(8, 3) * 0.8 + 0.1).requires_grad_(True)
    w = torch.randn(enc.n_output_dims)
    for twice in (False, True):
        (g,) = torch.autograd.grad((enc(x, twice) * w).sum(), x)
        eps = 1e-3
        for a in range(3):
            d = torch.zeros(3)
            d[a] = eps
            fd = ((enc(x.detach() + d) * w).sum(-1) - (enc(x.detach() - d) * w).sum(-1)) / (2 * eps)
            torch.testing.assert_close(g[:, a], fd, atol=2e-2, rtol=2e-2)


def graph_encode(enc: HashGridEncoding, x: torch.Tensor) -> torch.Tensor:
    """The encoding's forward kernel called outside its autograd Function, so autograd records its gathers x
    trilinear weights at every order: the reference for the recomputing :class:`HashGridFunction`'s backward."""
    return hash_grid.TorchKernels(enc).forward(x.float(), enc.params)


def test_recomputing_function_matches_autograd_graph_to_second_order():
    """The torch path's recomputing Function (kept: x; the cells and weights recomputed by its backward
    kernels) against autograd's graph of the plain gathers: values, table and input gradients, the analytic
    normal's loss differentiated through the input gradient (create_graph), and the table gradient
    differentiated w.r.t. the upstream gradient -- on dense and hashed levels, cell edges and clamped points."""
    torch.manual_seed(4)
    enc = HashGridEncoding(SMALL)
    with torch.no_grad():
        enc.params.uniform_(-1, 1)
    x = torch.cat([torch.rand(30, 3), EDGES])
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Softplus(), torch.nn.Linear(16, 1))
    v, u = torch.randn(x.shape[0], 3), torch.randn(enc.params.shape)
    got = []
    for fn in (lambda p: enc(p, twice_differentiable=True), lambda p: graph_encode(enc, p)):
        pts = x.clone().requires_grad_(True)
        out = fn(pts)
        dens = mlp(out)
        (gx,) = torch.autograd.grad(dens.sum(), pts, create_graph=True)
        loss = (torch.nn.functional.normalize(gx, dim=-1) * v).sum() + 0.1 * dens.square().sum()
        enc.params.grad = None
        mlp.zero_grad()
        loss.backward()
        g = torch.randn(x.shape[0], enc.n_output_dims, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        gt, gx1 = torch.autograd.grad(fn(pts), (enc.params, pts), g, create_graph=True)
        gg, gtab = torch.autograd.grad((gt * u).sum() + (gx1 * v).sum(), (g, enc.params))
        got.append([out.detach(), gx.detach(), enc.params.grad.clone(), *[q.grad.clone() for q in mlp.parameters()],
                    gt.detach(), gx1.detach(), gg, gtab])
        if len(got) == 1:
            assert out.grad_fn.name().startswith("TorchHashGrid")
    assert torch.count_nonzero(got[1][2]) > 0 and torch.count_nonzero(got[1][-1]) > 0
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_recomputing_function_keeps_only_the_points_and_the_upstream_gradient():
    """What the analytic-normal graph holds per point: the points (3 floats) for the encoding and the upstream
    gradient (L x F floats) for its differentiable backward -- not the 8 x L corner rows and weights (and
    their products) of autograd's own graph, which cost ~7 KB a point on the paper's grid."""
    enc = HashGridEncoding({**SMALL, "n_levels": 16, "max_resolution": 256})
    n = 512
    pts = torch.rand(n, 3).requires_grad_(True)
    g0 = torch.randn(n, enc.n_output_dims)
    params = {enc.params.data_ptr()}
    saved = {}

    def pack(t):
        if t.data_ptr() not in params:
            saved[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    for fn, want in ((lambda p: enc(p, twice_differentiable=True), n * 3 * 4 + n * 16 * 2 * 4),
                     (lambda p: graph_encode(enc, p), None)):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch.autograd.grad(fn(pts), pts, g0, create_graph=True)
        if want is not None:
            assert sum(saved.values()) == want
        else:  # the reference graph: more than 20x that
            assert sum(saved.values()) > 20 * (n * 3 * 4 + n * 16 * 2 * 4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_only)])
def test_own_input_gradient_computes_each_gradient_once(monkeypatch, backend):
    """Analytic normals of a geometry that made its points a leaf itself: the normal's autograd.grad asks the
    kernels for the input gradient only, the step's backward for the table gradient only -- and the
    parameters get the same gradients as without the pass; points that already require grad (someone reads
    their gradient) get both, as before. The Triton kernels (in its CPU interpreter) take the same flags."""
    from it3d.core.registry import get

    if backend == "triton":
        kernels = hash_grid.triton_kernels()
        assert kernels is not None and kernels.INTERPRET, "triton with TRITON_INTERPRET=1 (tests/conftest.py)"
        cls = kernels.TritonKernels
    else:
        cls = hash_grid.TorchKernels
    torch.manual_seed(0)
    geo = get("geometry", "implicit-volume")({"pos_encoding": {"otype": "HashGrid", **SMALL, "backend": backend}},
                                             path="g").train()
    calls = []
    orig = cls.backward
    monkeypatch.setattr(cls, "backward", lambda self, x, t, g, wx, wt: calls.append((wx, wt)) or orig(
        self, x, t, g, wx, wt))
    x = torch.rand(64, 3) - 0.5
    v = torch.randn(64, 3)
    grads = {}
    for case in ("own", "needs grad", "reference"):
        calls.clear()
        geo.zero_grad(set_to_none=True)
        pts = x.clone().requires_grad_(case == "needs grad")
        if case == "reference":  # autograd's own graph of the encoding
            monkeypatch.setattr(geo.encoding, "forward", lambda p, twice=False: graph_encode(geo.encoding, p))
        out = geo(pts, output_normal=True, normal_grad=True)
        (out["density"].sum() + out["features"].sum() + (out["normal"] * v).sum()).backward()
        grads[case] = [p.grad.clone() for p in geo.parameters()]
        if case == "own":
            assert calls == [(True, False), (False, True)]
        elif case == "needs grad":
            assert calls == [(True, True), (True, True)] and pts.grad is not None and pts.grad.abs().sum() > 0
    for case in ("own", "needs grad"):
        for a, b in zip(grads[case], grads["reference"]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_frequency_encoding_closed_form():
    enc = FrequencyEncoding({"n_frequencies": 3}, n_input_dims=2)
    x = torch.tensor([[0.25, -0.5]])
    out = enc(x)
    assert enc.n_output_dims == 2 * 7 == out.shape[1]
    f = [math.pi, 2 * math.pi, 4 * math.pi]
    x0 = (0.25, -0.5)
    exp = list(x0) + [math.sin(k * v) for k in f for v in x0] + [math.cos(k * v) for k in f for v in x0]
    torch.testing.assert_close(out[0], torch.tensor(exp), atol=1e-6, rtol=1e-6)


def test_factory_backends_and_errors():
    assert build_encoding({"otype": "HashGrid", **SMALL}).backend == "torch"
    assert build_encoding({"otype": "HashGrid", **{**SMALL, "backend": "auto"}}).backend in ("torch", "triton")
    if not torch.cuda.is_available():
        assert build_encoding({**SMALL, "backend": "auto"}).backend == "torch"
    with pytest.raises(ConfigError, match="backend: expected one of auto, torch, triton, tcnn"):
        build_encoding({**SMALL, "backend": "cuda"})
    with pytest.raises(ConfigError, match="otype"):
        build_encoding({"otype": "HashGird"})
    with pytest.raises(ConfigError, match="n_level"):
        build_encoding({"otype": "HashGrid", "n_level": 3})
    mlp = make_mlp(32, 4, 64, 3)
    assert [m.out_features for m in mlp if isinstance(m, torch.nn.Linear)] == [64, 64, 4]


def test_tcnn_backend_unavailable_is_a_clear_error():
    try:
        import tinycudann  # noqa: F401
    except Exception:
        with pytest.raises(ConfigError, match="tinycudann"):
            HashGridEncoding({**SMALL, "backend": "tcnn"})
    else:
        pytest.skip("tinycudann is installed here, so the missing-backend error cannot occur")


# ----------------------------------------------------------------------------- Triton kernel


@pytest.fixture
def interpret():
    """The kernel module; without CUDA conftest.py has set TRITON_INTERPRET=1 (Triton's CPU interpreter)."""
    mod = hash_grid.triton_kernels()
    assert mod is not None, "triton is not installed: pip install -r requirements.txt"
    assert mod.INTERPRET, "set TRITON_INTERPRET=1 before triton is imported (tests/conftest.py does without CUDA)"
    return mod


def _pair(cfg, seed=0):
    torch.manual_seed(seed)
    ref = HashGridEncoding({**cfg, "backend": "torch"})
    tri = HashGridEncoding({**cfg, "backend": "triton"})
    with torch.no_grad():
        ref.params.uniform_(-1, 1)
        tri.params.copy_(ref.params)
    return ref, tri


EDGES = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.25, 1.0], [1.2, -0.1, 0.3], [0.999999, 1e-7, 0.5]])


@triton_only
@pytest.mark.parametrize("cfg", [SMALL, {**SMALL, "n_features_per_level": 4, "log2_hashmap_size": 9},
                                 {**SMALL, "n_features_per_level": 1, "n_levels": 3, "base_resolution": 3}])
def test_triton_kernel_matches_torch_values_and_gradients(interpret, cfg):
    """Forward, table gradient and input gradient of the kernel (in Triton's interpreter) against the
    torch path, on dense and hashed levels, cell edges, the cube's faces and clamped points."""
    ref, tri = _pair(cfg)
    x = torch.cat([torch.rand(40, 3), EDGES])
    xr, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_r, out_t = ref(xr), tri(xt)
    assert out_t.grad_fn.name().startswith("TritonHashGrid")  # the kernel ran, not the torch path
    torch.testing.assert_close(out_t, out_r, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_t.double(), reference_encode(ref, x)[0], atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out_r)
    (out_r * w).sum().backward()
    (out_t * w).sum().backward()
    assert torch.count_nonzero(ref.params.grad) > 0
    torch.testing.assert_close(tri.params.grad, ref.params.grad, atol=1e-5, rtol=1e-5)
    # d/dx is res x (weight slopes) per level: values of order 100; clamped coordinates get 0
    torch.testing.assert_close(xt.grad, xr.grad, atol=1e-4, rtol=1e-5)
    assert xt.grad[-2, 0] == 0 and xt.grad[-2, 1] == 0 and xt.grad[-2, 2] != 0


@triton_only
def test_triton_kernel_default_grid_and_table_only_gradient(interpret):
    """The paper's 16-level grid (5 dense + 11 hashed levels of 2^19 rows); no input gradient asked."""
    ref, tri = _pair({"backend": "torch"}, seed=1)
    x = torch.rand(6, 3)
    out_r, out_t = ref(x), tri(x)
    torch.testing.assert_close(out_t, out_r, atol=1e-6, rtol=1e-6)
    out_r[:, 0::2].sum().backward()
    out_t[:, 0::2].sum().backward()
    torch.testing.assert_close(tri.params.grad, ref.params.grad, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # inference: the kernel without a graph
        torch.testing.assert_close(tri(x), out_r.detach(), atol=1e-6, rtol=1e-6)


@triton_only
def test_triton_double_backward_matches_torch(interpret):
    """Analytic normals trained with a normal loss: grad of (encoding -> MLP) w.r.t. the points with
    create_graph, then a loss on that gradient; the table and MLP gradients match the torch path."""
    ref, tri = _pair(SMALL)
    torch.manual_seed(5)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Softplus(), torch.nn.Linear(16, 1))
    x = torch.rand(24, 3) * 0.9 + 0.05
    v = torch.randn(24, 3)
    grads = []
    for enc in (ref, tri):
        pts = x.clone().requires_grad_(True)
        out = enc(pts, twice_differentiable=True)
        assert out.grad_fn.name().startswith("TritonHashGrid") == (enc is tri)
        dens = mlp(out)
        (gx,) = torch.autograd.grad(dens.sum(), pts, create_graph=True)
        loss = (torch.nn.functional.normalize(gx, dim=-1) * v).sum() + 0.1 * dens.square().sum()
        mlp.zero_grad()
        loss.backward()
        grads.append([enc.params.grad.clone()] + [p.grad.clone() for p in mlp.parameters()] + [gx.detach()])
    assert torch.count_nonzero(grads[0][0]) > 0
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@triton_only
def test_triton_double_backward_through_the_table_gradient(interpret):
    """The table gradient itself differentiated w.r.t. the upstream gradient (the other branch of the
    kernels' double backward) against the torch path's twice-differentiable gathers."""
    ref, tri = _pair(SMALL)
    x = torch.rand(10, 3) * 0.9 + 0.05
    u, v = torch.randn(ref.params.shape), torch.randn(10, 3)
    out = []
    for enc in (ref, tri):
        g = torch.randn(10, enc.n_output_dims, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        y = enc(x, twice_differentiable=True)
        (gt,) = torch.autograd.grad(y, enc.params, g, create_graph=True)
        (gg,) = torch.autograd.grad((gt * u).sum(), g)
        # both branches at once: the table gradient and the input gradient in one loss
        pts = x.clone().requires_grad_(True)
        gt2, gx = torch.autograd.grad(enc(pts, twice_differentiable=True), (enc.params, pts), g, create_graph=True)
        gg2, gtab2 = torch.autograd.grad((gt2 * u).sum() + (gx * v).sum(), (g, enc.params))
        out.append((gg, gg2, gtab2))
    for a, b in zip(out[1], out[0]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@triton_only
def test_triton_backend_errors_say_what_to_do(interpret, monkeypatch):
    x = torch.rand(8, 3)
    tri = HashGridEncoding({**SMALL, "backend": "triton"})
    # backend: triton on CPU tensors without the interpreter is an error that says what to do
    monkeypatch.setattr(hash_grid, "triton_interpreting", lambda: False)
    with pytest.raises(It3dError, match="backend=triton: the kernel runs on CUDA inputs, got cpu"):
        tri(x)
    # auto on CPU tensors is the torch path, kernel or not
    auto = HashGridEncoding({**SMALL, "backend": "auto"})
    assert not auto(x.requires_grad_(True)).grad_fn.name().startswith("TritonHashGrid")
    monkeypatch.setattr(hash_grid, "triton_kernels", lambda: None)
    with pytest.raises(ConfigError, match="backend=triton but triton cannot be imported"):
        HashGridEncoding({**SMALL, "backend": "triton"}, path="geometry.pos_encoding")
