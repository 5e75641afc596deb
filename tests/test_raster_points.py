"""Point rasterizer + deferred renderer: hand-derived pixel positions, occlusion, compositing
weights, a brute-force reference, gradients and multi-scale sizes."""
import math

import pytest
import torch

from it3d.core import registry
from it3d.core.cameras import spherical_c2w
from it3d.renderers.point_deferred import scale_sizes
from it3d.renderers.point_rasterizer import (Fragments, WeightedGather, composite, project_points, pytorch3d_available,
                                             rasterize, rasterize_pytorch3d, rasterize_torch)

H = W = 33
FOVY = 40.0


pytestmark = pytest.mark.usefixtures("one_thread")


def cam(azimuth=0.0, elevation=0.0, distance=2.0):
    return spherical_c2w(torch.tensor([elevation]), torch.tensor([azimuth]), torch.tensor([distance]))


def test_point_lands_on_predicted_pixel():
    # camera at +x (distance 2) looking at the origin: world +y is image right, +z is image up
    f = 0.5 * H / math.tan(math.radians(FOVY / 2))  # 45.33 px
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.15]])
    expected = [(16, 16), (16, int(16.5 + 0.05 * f)), (int(16.5 - 0.075 * f), 16)]  # (row, col)
    assert expected == [(16, 16), (16, 18), (13, 16)]
    for p, (i, j) in zip(pts, expected):
        frags = rasterize(p[None], cam(), torch.tensor([FOVY]), H, W, radius=0.5, k=2)
        hit = torch.nonzero(frags.idx[0, ..., 0] >= 0).tolist()
        assert hit == [[i, j]]
        assert frags.idx[0, i, j, 1] == -1
        xy, z = project_points(p[None], cam(), torch.tensor([FOVY]), H, W)
        d2 = (j + 0.5 - xy[0, 0, 0]) ** 2 + (i + 0.5 - xy[0, 0, 1]) ** 2
        assert frags.dist2[0, i, j, 0] == pytest.approx(float(d2), abs=1e-5)
        assert frags.depth[0, i, j, 0] == pytest.approx(float(z[0, 0]), abs=1e-5)


def test_nearer_points_occlude_farther():
    far, near = torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[0.5, 0.0, 0.0]])  # camera at +x
    feats = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # far green, near red
    bg = torch.tensor([0.0, 0.0, 1.0])
    for order in ([0, 1], [1, 0]):
        pts = torch.cat([far, near])[order]
        frags = rasterize(pts, cam(), torch.tensor([FOVY]), H, W, radius=2.0, k=4)
        near_id = order.index(1)
        assert frags.idx[0, 16, 16, 0] == near_id and frags.idx[0, 16, 16, 1] == 1 - near_id
        out, alpha, occ = composite(frags, feats[order], 2.0, bg)
        # both project exactly onto the centre of pixel (16, 16): alpha 1, the near point hides everything
        assert torch.allclose(out[0, 16, 16], torch.tensor([1.0, 0.0, 0.0]))
        assert alpha[0, 16, 16, 0] == 1.0 and occ[0, 16, 16, 0] == 1.0
        assert torch.allclose(out[0, 0, 0], bg) and occ[0, 0, 0, 0] == 0.0


def test_composite_weights_by_hand():
    # one pixel, two fragments at squared distances 1 and 0.5 with radius 2: alphas 0.75 and 0.875
    idx = torch.tensor([[[[1, 0, -1]]]])
    d2 = torch.tensor([[[[1.0, 0.5, 0.0]]]])
    frags = Fragments(idx, d2, torch.tensor([[[[1.0, 2.0, float("inf")]]]]))
    feats = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    bg = torch.tensor([1.0, 1.0])
    out, alpha, occ = composite(frags, feats, 2.0, bg)
    a1, a2 = 0.75, 0.875
    want = a1 * feats[1] + (1 - a1) * a2 * feats[0] + (1 - a1) * (1 - a2) * bg
    assert torch.allclose(out[0, 0, 0], want)
    assert alpha[0, 0, 0, 0] == pytest.approx(1 - (1 - a1) * (1 - a2))


def brute_force(xy, z, h, w, radius, k):
    idx = torch.full((h, w, k), -1, dtype=torch.long)
    for i in range(h):
        for j in range(w):
            d2 = (j + 0.5 - xy[:, 0]) ** 2 + (i + 0.5 - xy[:, 1]) ** 2
            ok = torch.nonzero((d2 < radius ** 2) & (z > 1e-4)).squeeze(1)
            ok = ok[torch.argsort(z[ok])][:k]
            idx[i, j, :len(ok)] = ok
    return idx


def test_matches_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    n, h, w = 300, 13, 11
    xy = torch.rand(2, n, 2, generator=g) * torch.tensor([w + 4.0, h + 4.0]) - 2.0
    z = torch.rand(2, n, generator=g) * 2 - 0.2  # some behind the camera
    for radius, k in ((1.3, 3), (2.2, 6)):
        frags = rasterize_torch(xy, z, h, w, radius, k)
        for b in range(2):  # each view of the batch on its own
            idx = brute_force(xy[b], z[b], h, w, radius, k)
            assert torch.equal(frags.idx[b], idx)
            rows, cols = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            p = idx.clamp_min(0)
            d2 = (cols[..., None] - xy[b, p, 0]) ** 2 + (rows[..., None] - xy[b, p, 1]) ** 2
            valid = idx >= 0
            torch.testing.assert_close(frags.dist2[b][valid], d2[valid], atol=1e-5, rtol=0)
            torch.testing.assert_close(frags.depth[b][valid], z[b, p][valid], atol=1e-6, rtol=0)
            assert (frags.dist2[b][~valid] == 0).all() and torch.isinf(frags.depth[b][~valid]).all()
    none = rasterize_torch(torch.zeros(2, 0, 2), torch.zeros(2, 0), 3, 4, 1.5, 2)  # no points at all
    assert (none.idx == -1).all() and none.idx.shape == (2, 3, 4, 2) and torch.isinf(none.depth).all()
    culled = rasterize_torch(torch.full((1, 3, 2), float("nan")), -torch.ones(1, 3), 3, 4, 1.5, 2)  # all culled
    assert (culled.idx == -1).all() and (culled.dist2 == 0).all()


def slow_composite(frags, feats, radius, bg):
    """Per pixel, front to back, with Python loops."""
    b, h, w, k = frags.idx.shape
    out = torch.zeros(b, h, w, feats.shape[1], dtype=feats.dtype)
    alpha_out = torch.zeros(b, h, w, 1, dtype=feats.dtype)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                trans = torch.ones((), dtype=feats.dtype)
                acc = torch.zeros(feats.shape[1], dtype=feats.dtype)
                for j in range(k):
                    p = int(frags.idx[i, y, x, j])
                    if p < 0:
                        continue
                    a = (1 - frags.dist2[i, y, x, j] / radius ** 2).clamp(0, 1).to(feats.dtype)
                    acc = acc + trans * a * feats[p]
                    trans = trans * (1 - a)
                out[i, y, x] = acc + trans * bg
                alpha_out[i, y, x, 0] = 1 - trans
    return out, alpha_out


def test_composite_matches_a_per_pixel_loop_values_and_gradients():
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(2, 60, 2, generator=g) * 9.0
    z = torch.rand(2, 60, generator=g) + 0.5
    frags = rasterize_torch(xy, z, 9, 9, 1.6, 5)
    assert (frags.idx[..., -1] >= 0).any() and (frags.idx[..., 0] < 0).any()  # full and empty pixels
    feats = torch.randn(60, 4, dtype=torch.double, generator=g, requires_grad=True)
    bg = torch.randn(4, dtype=torch.double, generator=g, requires_grad=True)
    out, alpha, occ = composite(frags, feats, 1.6, bg)
    ref, ref_alpha = slow_composite(frags, feats, 1.6, bg)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(alpha, ref_alpha)
    assert torch.equal(occ[..., 0] > 0, frags.idx[..., 0] >= 0)
    wgt = torch.randn_like(out)
    ga = torch.autograd.grad((out * wgt).sum(), (feats, bg))
    gb = torch.autograd.grad((ref * wgt).sum(), (feats, bg))
    for a, b_ in zip(ga, gb):
        torch.testing.assert_close(a, b_)


def test_weighted_gather_gradcheck():
    g = torch.Generator().manual_seed(1)
    w = torch.rand(7, 3, dtype=torch.double, generator=g, requires_grad=True)
    f = torch.randn(5, 4, dtype=torch.double, generator=g, requires_grad=True)
    idx = torch.randint(-1, 5, (7, 3), generator=g)
    assert torch.autograd.gradcheck(lambda a, b: WeightedGather.apply(a, b, idx), (w, f))


def make_renderer(n=400, rgb_skip=False, channels=(4, 8, 8, 8), **cfg):
    geo = registry.get("geometry", "point-cloud")({}, path="g")
    g = torch.Generator().manual_seed(0)
    geo.set_points(torch.rand(n, 3, generator=g) - 0.5, torch.rand(n, 3, generator=g), torch.rand(n, generator=g) > 0.5)
    r = registry.get("renderer", "point-deferred")({"unet_channels": list(channels), "rgb_skip": rgb_skip,
                                                    "radius": 1.5, **cfg}, path="r", geometry=geo)
    return geo, r


def test_multiscale_sizes_odd():
    assert scale_sizes(33, 33, 3) == [(33, 33), (17, 17), (9, 9)]
    assert scale_sizes(800, 800, 3) == [(800, 800), (400, 400), (200, 200)]
    geo, r = make_renderer()
    out = r(cam(), torch.tensor([FOVY]), 33, 31)
    assert [tuple(f.shape) for f in out["features"]] == [(1, 33, 31, 19), (1, 17, 16, 19), (1, 9, 8, 19)]
    assert out["comp_rgb"].shape == (1, 33, 31, 3) and out["opacity"].shape == (1, 33, 31, 1)


@pytest.mark.parametrize("rgb_skip", [False, True])
def test_gradients_reach_descriptors_unet_background(rgb_skip):
    geo, r = make_renderer(rgb_skip=rgb_skip)
    out = r(torch.cat([cam(), cam(90.0, 20.0)]), torch.tensor([FOVY, FOVY]), 17, 17)
    assert 0 < out["opacity"].mean() < 1  # some pixels are empty: the background descriptor is used
    (out["comp_rgb"] * torch.linspace(0, 1, 3)).sum().backward()
    assert geo.descriptors.grad.abs().sum() > 0
    assert r.background.grad[:3].abs().sum() > 0
    assert r.unet.out.weight.grad.abs().sum() > 0
    if not rgb_skip:  # with the skip the zero-initialised last layer blocks the rest until it moves
        assert geo.descriptors.grad[:, 3:].abs().sum() > 0 and r.background.grad[3:].abs().sum() > 0
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in r.unet.parameters())


def test_rgb_skip_first_render_is_the_point_colours():
    geo, r = make_renderer(rgb_skip=True)
    out = r(cam(), torch.tensor([FOVY]), 17, 17)
    assert torch.allclose(out["comp_rgb"], out["features"][0][..., :3].clamp(0, 1))
    empty = out["opacity"][0, ..., 0] == 0
    assert torch.allclose(out["comp_rgb"][0][empty], torch.ones(3))  # white background descriptor


def test_geometry_resizes_from_state_dict():
    geo, _ = make_renderer(n=50)
    fresh = registry.get("geometry", "point-cloud")({}, path="g")
    assert fresh.num_points == 0
    fresh.load_state_dict(geo.state_dict())
    assert fresh.num_points == 50 and torch.equal(fresh.descriptors, geo.descriptors)
    assert torch.equal(fresh.is_ref, geo.is_ref) and torch.allclose(fresh.descriptors[:, :3], fresh.init_colors)


def test_pytorch3d_parity():
    if not pytorch3d_available():
        print("skipping pytorch3d parity: pytorch3d is not installed here")
        pytest.skip("pytorch3d is not installed")
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(1, 500, 2, generator=g) * torch.tensor([31.0, 23.0])
    z = torch.rand(1, 500, generator=g) + 0.5
    a = rasterize_torch(xy, z, 23, 31, 1.7, 4)
    b = rasterize_pytorch3d(xy, z, 23, 31, 1.7, 4)
    assert (a.idx == b.idx).float().mean() > 0.999
    both = (a.idx >= 0) & (b.idx >= 0)
    assert torch.allclose(a.dist2[both], b.dist2[both], atol=1e-3)


def test_render_and_backward_make_no_host_sync():
    """Splat, sort, slot scatter, compositing and their backward keep fixed shapes: no count is read
    back from the device (nonzero, item) and no Python number is uploaded per call."""
    from it3d.core.profiling import count_syncs

    geo, r = make_renderer(fragment_capacity_margin=1.25)  # the buffers a GPU uses (auto is exact on CPU)
    c2w = torch.cat([cam(), cam(90.0, 20.0)])
    for fovy in (torch.tensor([FOVY, FOVY]), FOVY):
        with count_syncs() as s:
            out = r(c2w, fovy, 17, 17)
            (out["comp_rgb"] * torch.linspace(0, 1, 3)).sum().backward()
        assert s.count == 0 and s.uploads == 0, s.report()
    # the counter does see a rasterizer that compacts with nonzero (the brute force: once per pixel)
    with count_syncs() as s:
        brute_force(torch.rand(5, 2) * 4, torch.rand(5) + 1, 2, 2, 1.0, 2)
    assert s.count == 4 and all(k.startswith(__file__) and k.endswith(" nonzero") for k in s.by_site())


def test_training_pair_buffers_resize_and_match_the_exact_render(caplog):
    """Training renders gather the pairs into fixed-size buffers (all candidates until measured, then
    1.25 x the peak every resize_every steps); with nothing dropped the render equals eval's exact one."""
    from it3d.core.profiling import count_syncs

    geo, r = make_renderer(n=400, fragment_capacity_margin=1.25, resize_every=2)
    c2w = torch.cat([cam(), cam(90.0, 20.0)])
    fovy = torch.tensor([FOVY, FOVY])
    for step in range(3):
        with count_syncs() as s:
            r.do_update_step(0, step)
        assert s.count == (1 if step == 2 else 0)  # step 0: nothing measured yet; step 2: one read
        out = r(c2w, fovy, 17, 17)
    fr = r.sample_buffers.fraction
    # ~7 of the 16 candidate pairs of a 1.5 px disc exist (pi r^2): buffers of about 1.25 x 45 %
    assert set(fr) == {"scale0", "scale1", "scale2"} and all(0.4 < v < 0.75 for v in fr.values())
    r.eval()
    exact = r(c2w, fovy, 17, 17)
    for a, b in zip(out["features"], exact["features"]):
        torch.testing.assert_close(a, b)
    # a buffer too small for the pairs: they are left out (the last points' first), reported, then it grows
    r.train()
    r.sample_buffers.fraction = {k: 1 / 32 for k in fr}
    short = r(c2w, fovy, 17, 17)
    assert (short["opacity"] < exact["opacity"]).any()
    with caplog.at_level("WARNING", logger="it3d"):
        r.do_update_step(0, 4)
    assert "point fragments did not fit the fixed-size training buffers" in caplog.text
    assert "fragment_capacity_margin" in caplog.text and all(v >= 2 / 32 for v in r.sample_buffers.fraction.values())
    with pytest.raises(Exception, match="fragment_capacity_margin: expected auto, 0"):
        registry.get("renderer", "point-deferred")({"fragment_capacity_margin": 0.5}, path="r", geometry=geo)
    # auto on CPU tensors: exact sizing (one read per scale), the same image
    geo, r = make_renderer(n=400)
    with count_syncs() as s:
        auto = r(c2w, fovy, 17, 17)
    assert s.count == 3
    torch.testing.assert_close(auto["features"][0], exact["features"][0])
