"""Hash-grid and frequency encodings against slow, explicit reference implementations."""
import math

import pytest
import torch

from it3d.core.config import ConfigError
from it3d.encodings.factory import build_encoding, make_mlp
from it3d.encodings.frequency import FrequencyEncoding
from it3d.encodings.hash_grid import HashGridEncoding

P1, P2 = 2654435761, 805459861


pytestmark = pytest.mark.usefixtures("one_thread")
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
                out[p, lv * 2:(lv + 1) * 2] += w * table[row]
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
    assert build_encoding({"otype": "HashGrid", **{**SMALL, "backend": "auto"}}).backend in ("torch", "tcnn")
    if not torch.cuda.is_available():
        assert build_encoding({**SMALL, "backend": "auto"}).backend == "torch"
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
