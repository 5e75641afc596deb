"""Loss terms: hand-derived values, Pearson invariances, and zero weights skipping the work."""
import math

import pytest
import torch

from it3d.core import registry
from it3d.core.config import ConfigError
from it3d.losses import pearson, weighted_terms


def make(name, **cfg):
    return registry.get("loss", name)(cfg, path=f"system.loss.{name}")


def test_pearson_identical_is_minus_one_and_scale_shift_invariant():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(1, 16, 16, 1, generator=g) + 0.5
    ref = {"mask": torch.ones_like(d), "depth": d}
    loss = make("depth-pearson")
    assert loss({"depth": d}, ref).item() == pytest.approx(-1.0, abs=1e-5)
    assert loss({"depth": 3.7 * d + 11.0}, ref).item() == pytest.approx(-1.0, abs=1e-5)
    assert loss({"depth": -0.2 * d + 1.0}, ref).item() == pytest.approx(1.0, abs=1e-5)
    # the z-depth key wins over depth when present
    assert loss({"depth": -d, "z_depth": d}, ref).item() == pytest.approx(-1.0, abs=1e-5)


def test_pearson_uses_foreground_only():
    d = torch.linspace(0, 1, 64).view(1, 8, 8, 1)
    mask = torch.zeros_like(d)
    mask[:, :4] = 1.0
    pred = d.clone()
    pred[:, 4:] = torch.rand(1, 4, 8, 1)  # garbage on the background does not matter
    assert make("depth-pearson")({"depth": pred}, {"mask": mask, "depth": d}).item() == pytest.approx(-1.0, abs=1e-5)
    x, y = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0])
    assert pearson(x, y).item() == pytest.approx(0.5, abs=1e-6)  # cov 0.5 / (1 * 1)


def test_masked_ref_rgb_and_mask_values():
    rgb = torch.zeros(1, 2, 2, 3)
    ref = {"rgb": torch.ones(1, 2, 2, 3), "mask": torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 2, 2, 1)}
    # |M (I - R)|: only one of 4 pixels counts, 3 channels of error 1 -> mean over 12 entries = 3/12
    assert make("ref-rgb")({"comp_rgb": rgb}, ref).item() == pytest.approx(0.25)
    assert make("ref-rgb", masked=False)({"comp_rgb": rgb}, ref).item() == pytest.approx(1.0)
    op = torch.full((1, 2, 2, 1), 0.5)
    assert make("mask")({"opacity": op}, ref).item() == pytest.approx(0.25)
    bce = make("mask", mode="bce")({"opacity": op}, ref).item()
    assert bce == pytest.approx(math.log(2), rel=1e-4)


def test_entropy_sparsity_smooth_and_orient():
    op = torch.full((1, 4, 4, 1), 0.5)
    assert make("entropy")({"opacity": op}, {}).item() == pytest.approx(math.log(2), rel=1e-4)
    assert make("sparsity", eps=1e-4)({"opacity": op}, {}).item() == pytest.approx(math.sqrt(0.25 + 1e-4))
    n = torch.zeros(1, 4, 4, 3)
    n[..., 2] = 1
    assert make("normal-smooth")({"comp_normal": n, "opacity": torch.ones_like(op)}, {}).item() == 0.0
    n2 = n.clone()
    n2[:, :, 2:, 2] = -1  # a vertical crease: 4 horizontal neighbour pairs of 12 differ by |2|^2 = 4
    val = make("normal-smooth")({"comp_normal": n2, "opacity": torch.ones_like(op)}, {}).item()
    assert val == pytest.approx(4 * 4 / 12)
    with pytest.raises(ConfigError, match="orient"):
        make("orient")({"opacity": op}, {})


def test_zero_weight_skips_the_work():
    calls = []

    def call(name, mod):
        calls.append(name)
        return torch.tensor(2.0)

    mods = {"a": None, "b": None, "c": None}
    weights = {"a": 1.0, "b": 0.0, "c": [100, 0.0, 1.0, 200]}  # c: 0 until step 100
    total, logs = weighted_terms(mods, weights, 50, call)
    assert calls == ["a"] and total.item() == 2.0 and set(logs) == {"a"}
    calls.clear()
    total, logs = weighted_terms(mods, weights, 150, call)
    assert calls == ["a", "c"] and total.item() == pytest.approx(2.0 + 0.5 * 2.0)
    calls.clear()
    assert weighted_terms({"b": None}, {"b": 0}, 0, call) == (None, {}) and calls == []


def test_orient_loss_on_the_volume_renderer_closed_form():
    """A hand-checked case, then the real renderer's per-sample outputs feed the loss."""
    # one ray, two samples: normal facing away from the camera (n.d = 0.6) with weight 0.5, facing it with 0.5
    w = torch.tensor([[[[0.5, 0.5]]]])
    n = torch.tensor([[[[0.6, 0.8, 0.0, -1.0, 0.0, 0.0]]]])
    d = torch.tensor([[[[1.0, 0.0, 0.0, 1.0, 0.0, 0.0]]]])
    out = {"weights": w, "sample_normal": n, "t_dirs": d, "opacity": torch.ones(1, 1, 1, 1)}
    assert float(make("orient")(out, {})) == pytest.approx(0.5 * 0.36)

    from it3d.core import registry
    from it3d.core.cameras import get_rays, spherical_c2w

    geo = registry.get("geometry", "implicit-volume")({"pos_encoding": {"n_levels": 2, "log2_hashmap_size": 10,
                                                                        "base_resolution": 4, "max_resolution": 8}})
    mat = registry.get("material", "diffuse-light")({})
    bg = registry.get("background", "solid-color")({})
    ren = registry.get("renderer", "volume")({"num_samples_per_ray": 8, "num_importance_samples": 0},
                                             geometry=geo, material=mat, background=bg)
    ro, rd = get_rays(spherical_c2w(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([1.0])), 4, 4, 60.0)
    r = ren(ro, rd, output_normal=True)
    assert r["sample_normal"].shape == (1, 4, 4, 8 * 3) and r["t_dirs"].shape == (1, 4, 4, 8 * 3)
    val = make("orient")(r, {})
    n = r["sample_normal"].reshape(-1, 3)
    dd = r["t_dirs"].reshape(-1, 3)
    expected = (r["weights"].reshape(-1) * (n * dd).sum(-1).clamp_min(0) ** 2).sum() / (r["opacity"] > 0).sum()
    assert float(val) == pytest.approx(float(expected)) and torch.isfinite(val)


def test_official_opacity_and_entropy_variants():
    op = torch.full((1, 4, 4, 1), 0.5)
    assert make("sparsity", mode="square")({"opacity": op}, {}).item() == pytest.approx(0.25)  # mean(o^2)
    assert make("entropy", bits=True)({"opacity": op}, {}).item() == pytest.approx(1.0, rel=1e-4)  # 1 bit at 0.5
    with pytest.raises(ConfigError, match="sparsity loss mode"):
        make("sparsity", mode="cube")


class _Field(torch.nn.Module):
    """Unit normals of a radial (x / |x|) or a constant (+z) field, as a geometry returns them."""

    def __init__(self, radial):
        super().__init__()
        self.radial = radial

    def forward(self, pts, output_normal=False):
        n = torch.nn.functional.normalize(pts, dim=-1) if self.radial else torch.tensor([0.0, 0.0, 1.0]).expand_as(pts)
        return {"normal": n}


def test_normal_smooth_3d_matches_the_perturbed_normal_difference():
    """Samples on the +z axis at radius r of a radial normal field: n(x + d) - n(x) ~ (d_x, d_y, 0) / r, so
    mean |.| over the 3 components = (2/3) sigma / r sqrt(2 / pi)."""
    torch.manual_seed(0)
    n_samples, r, sigma = 20000, 0.3, 0.01
    pts = torch.tensor([0.0, 0.0, r]).expand(1, 1, n_samples, 1, 3)
    weights = torch.full((1, 1, n_samples, 1), 0.5)
    out = {"weights": weights, "sample_positions": pts.reshape(1, 1, n_samples, 3),
           "sample_normal": torch.tensor([0.0, 0.0, 1.0]).expand(1, 1, n_samples, 3)}
    val = registry.get("loss", "normal-smooth-3d")({"perturb": sigma}, geometry=_Field(True))(out, {})
    assert float(val) == pytest.approx(2 / 3 * sigma / r * math.sqrt(2 / math.pi), rel=0.03)
    own = {k: v for k, v in out.items() if k != "sample_normal"}  # no normals in the render: evaluated here
    val2 = registry.get("loss", "normal-smooth-3d")({"perturb": sigma}, geometry=_Field(True))(own, {})
    assert float(val2) == pytest.approx(2 / 3 * sigma / r * math.sqrt(2 / math.pi), rel=0.03)
    flat = registry.get("loss", "normal-smooth-3d")({}, geometry=_Field(False))(out, {})
    assert float(flat) == 0.0
    # samples the image never sees (weight 0, or behind an opaque one) are left out
    w = torch.tensor([[[[0.0, 1.0, 0.3]]]])
    pts3 = torch.tensor([[0.0, 0.0, r], [0.0, r, 0.0], [r, 0.0, 0.0]]).reshape(1, 1, 1, 9)
    n3 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).reshape(1, 1, 1, 9)  # wrong on 1 and 3
    term = registry.get("loss", "normal-smooth-3d")({"perturb": 0.0}, geometry=_Field(True))
    assert float(term({"weights": w, "sample_positions": pts3, "sample_normal": n3}, {})) == 0.0  # only sample 2
    with pytest.raises(ConfigError, match="geometry"):
        registry.get("loss", "normal-smooth-3d")({})(out, {})


def test_depth_pearson_by_weights_equals_the_boolean_index_form_and_makes_no_host_sync():
    from it3d.core.profiling import count_syncs
    from it3d.losses import pearson

    g = torch.Generator().manual_seed(3)
    pred = torch.rand(1, 12, 10, 1, generator=g, requires_grad=True)
    depth, mask = torch.rand(1, 12, 10, 1, generator=g), torch.rand(1, 12, 10, 1, generator=g)
    term = registry.get("loss", "depth-pearson")({}, path="system.loss.d")
    with count_syncs() as c:
        val = term({"depth": pred}, {"depth": depth, "mask": mask})
        val.backward()
    assert c.count == 0, c.report()
    fg = mask > 0.5
    ref_pred = pred.detach().clone().requires_grad_(True)
    expected = -pearson(ref_pred[fg], depth[fg])  # the definition: over the foreground pixels only
    expected.backward()
    torch.testing.assert_close(val.detach(), expected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pred.grad, ref_pred.grad, rtol=1e-5, atol=1e-7)
    one = torch.zeros_like(mask)
    one[0, 3, 4] = 1.0  # a single foreground pixel: no correlation to measure
    assert float(term({"depth": pred}, {"depth": depth, "mask": one})) == 0.0
