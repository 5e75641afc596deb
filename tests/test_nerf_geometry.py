"""implicit-volume: blob initialisation, normals, isosurface."""
import math

import pytest
import torch

from it3d.core.config import ConfigError
from it3d.core.errors import It3dError
from it3d.core.registry import get

from it3d.encodings.hash_grid import TINY_HASH_GRID as TINY_ENC
pytestmark = pytest.mark.usefixtures("one_thread")


def make_geometry(**cfg):
    torch.manual_seed(0)
    return get("geometry", "implicit-volume")({"pos_encoding": TINY_ENC, **cfg}, path="system.geometry")


def zero_mlp_density(geo, bias=0.0):
    """Make the MLP's density output exactly ``bias`` so the field is the blob alone."""
    last = geo.mlp[-1]
    with torch.no_grad():
        last.weight[0].zero_()
        last.bias[0] = bias


def shell_points(n, r):
    d = torch.nn.functional.normalize(torch.randn(n, 3), dim=-1)
    return d * r, d


def test_defaults_are_the_paper_settings():
    geo = get("geometry", "implicit-volume")({}, path="system.geometry")
    c = geo.cfg
    assert (c.radius, c.density_blob_scale, c.density_blob_std, c.density_activation) == (0.5, 5.0, 0.2, "trunc_exp")
    assert geo.encoding.n_output_dims == 32
    lin = [m for m in geo.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(32, 64), (64, 64), (64, 4)]
    with pytest.raises(ConfigError, match="normal_type"):
        make_geometry(normal_type="sobel")


def test_blob_density_and_outputs():
    geo = make_geometry()
    zero_mlp_density(geo)
    pts, _ = shell_points(64, 0.3)
    out = geo(pts)
    expected = torch.exp(torch.full((64, 1), 5.0 * math.exp(-0.09 / (2 * 0.04))))
    torch.testing.assert_close(out["density"], expected, rtol=1e-5, atol=1e-5)
    assert out["features"].shape == (64, 3) and (out["features"] > 0).all() and (out["features"] < 1).all()
    assert "normal" not in out
    torch.testing.assert_close(geo.forward_density(pts), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normal_type", ["analytic", "finite_difference"])
def test_blob_normals_point_outward(normal_type):
    geo = make_geometry(normal_type=normal_type)
    zero_mlp_density(geo)
    pts, dirs = shell_points(200, 0.25)
    geo.train()
    out = geo(pts, output_normal=True)
    n = out["normal"]
    torch.testing.assert_close(n.norm(dim=-1), torch.ones(200), atol=1e-4, rtol=0)
    assert (n * dirs).sum(-1).min() > 0.999
    # with the random hash/MLP features back in, the blob still dominates: mostly outward
    geo2 = make_geometry(normal_type=normal_type)
    n2 = geo2(pts, output_normal=True)["normal"]
    assert (n2 * dirs).sum(-1).mean() > 0.9


def test_analytic_normals_train_the_hash_table():
    """create_graph in training: a loss on the normals has gradients on the hash table."""
    geo = make_geometry(normal_type="analytic")
    geo.train()
    pts, dirs = shell_points(32, 0.3)
    n = geo(pts, output_normal=True)["normal"]
    assert n.requires_grad
    (1 - (n * dirs).sum(-1)).mean().backward()
    assert geo.encoding.params.grad is not None and geo.encoding.params.grad.abs().sum() > 0
    geo.eval()
    with torch.no_grad():
        n = geo(pts, output_normal=True)["normal"]
    assert not n.requires_grad


@pytest.mark.parametrize("activation,threshold,radius", [
    # trunc_exp: exp(5 exp(-r^2 / 2 mu^2)) = tau  ->  r = mu sqrt(2 ln(5 / ln tau))
    ("trunc_exp", math.e, 0.2 * math.sqrt(2 * math.log(5.0))),
    ("trunc_exp", math.exp(2.0), 0.2 * math.sqrt(2 * math.log(2.5))),
    # softplus(5 exp(...)) = tau  ->  blob = ln(e^tau - 1)
    ("softplus", 3.0, 0.2 * math.sqrt(2 * math.log(5.0 / math.log(math.exp(3.0) - 1)))),
])
def test_isosurface_of_the_blob_has_the_expected_radius(activation, threshold, radius):
    geo = make_geometry(density_activation=activation)
    zero_mlp_density(geo)
    v, f = geo.isosurface(resolution=48, threshold=threshold)
    assert v.dtype == torch.float32 and f.dtype == torch.int64 and v.shape[1] == 3 and f.shape[1] == 3
    r = v.norm(dim=-1)
    assert abs(float(r.mean()) - radius) < 3e-3
    assert float((r - radius).abs().max()) < 1e-2
    # faces wind counter-clockwise seen from outside: face normals point away from the centre
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    fn = torch.cross(b - a, c - a, dim=-1)
    assert ((fn * (a + b + c)).sum(-1) > 0).float().mean() > 0.99


@pytest.mark.parametrize("blob_scale,capped", [(5.0, False), (8.0, True)])
def test_isosurface_auto_threshold_and_errors(blob_scale, capped):
    """auto = min(mean density over the grid, 10) (Make-It-3D's export rule): the surface sits where
    the blob equals that level, r = mu sqrt(2 ln(scale / ln level))."""
    geo = make_geometry(density_blob_scale=blob_scale)
    zero_mlp_density(geo)
    mean = float(geo.density_grid(32).mean())
    assert (mean > 10.0) == capped  # both branches of the min are exercised
    level = min(mean, 10.0)
    v, _ = geo.isosurface(resolution=32, threshold="auto")
    expected_r = 0.2 * math.sqrt(2 * math.log(blob_scale / math.log(level)))
    assert abs(float(v.norm(dim=-1).mean()) - expected_r) < 1e-2
    with pytest.raises(It3dError, match="outside the density range"):
        geo.isosurface(resolution=16, threshold=1e9)
    empty = make_geometry(density_activation="relu", density_bias="none")
    zero_mlp_density(empty, bias=-1.0)
    with pytest.raises(It3dError, match="empty"):
        empty.isosurface(resolution=16)
