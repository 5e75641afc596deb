"""Volume renderer: compositing against closed forms, sampling, occupancy-grid skipping."""
import math

import pytest
import torch

from it3d.core.registry import get
from it3d.core.cameras import get_rays, spherical_c2w
from it3d.renderers.occupancy_grid import OccupancyGrid
from it3d.renderers.volume import accumulate, ray_aabb, sample_pdf, volume_weights

from it3d.encodings.hash_grid import TINY_HASH_GRID as TINY_ENC
pytestmark = pytest.mark.usefixtures("one_thread")


def test_constant_density_slab_matches_closed_form():
    s, a, b, far, n = 3.0, 0.5, 1.3, 2.0, 4000
    edges = torch.linspace(0.0, far, n + 1, dtype=torch.float64)[None]
    starts, ends = edges[:, :-1], edges[:, 1:]
    mids = 0.5 * (starts + ends)
    density = torch.where((mids > a) & (mids < b), s, 0.0)
    w, trans, alpha = volume_weights(density, ends - starts)
    opacity = float(w.sum())
    assert opacity == pytest.approx(1 - math.exp(-s * (b - a)), abs=1e-9)
    # E[t] = int_a^b t s exp(-s (t - a)) dt = a + 1/s - (b + 1/s) exp(-s (b - a))
    depth = float(accumulate(w, mids[..., None])[0, 0])
    assert depth == pytest.approx(a + 1 / s - (b + 1 / s) * math.exp(-s * (b - a)), abs=1e-6)
    # transmittance after the slab
    assert float(trans[0, -1]) == pytest.approx(math.exp(-s * (b - a)), abs=1e-9)
    assert float(alpha.max()) == pytest.approx(1 - math.exp(-s * far / n), abs=1e-12)


def test_ray_aabb_and_sample_pdf():
    ro = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 2.0], [0.1, 0.2, 0.0]])
    rd = torch.tensor([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    near, far, hit = ray_aabb(ro, rd, 0.5, 0.0)
    assert hit.tolist() == [True, False, True]
    assert near[0] == pytest.approx(1.5) and far[0] == pytest.approx(2.5)
    assert near[2] == pytest.approx(0.0) and far[2] == pytest.approx(0.5)  # camera inside the box
    bins = torch.linspace(0, 1, 11)[None]
    weights = torch.zeros(1, 10)
    weights[0, 3] = 1.0
    t = sample_pdf(bins, weights, 64)
    assert ((t >= 0.3) & (t <= 0.4)).float().mean() > 0.95
    td = sample_pdf(bins, weights, 8, deterministic=True)
    assert (td[:, 1:] >= td[:, :-1]).all()


def build(grid=None, activation="trunc_exp", **rcfg):
    torch.manual_seed(0)
    geo = get("geometry", "implicit-volume")({"pos_encoding": TINY_ENC, "density_blob_scale": 20.0,
                                              "density_activation": activation}, path="system.geometry")
    with torch.no_grad():  # density = exp(-14 + 20 exp(-r^2 / 0.08)): a ball (density 1 at r = 0.17), ~1e-6 outside
        geo.mlp[-1].weight[0].zero_()
        geo.mlp[-1].bias[0] = -14.0
    mat = get("material", "diffuse-light")({}, path="system.material")
    bg = get("background", "solid-color")({"color": [0.0, 0.0, 1.0]}, path="system.background")
    cfg = {"num_samples_per_ray": 48, "num_importance_samples": 16, "grid": grid or {"resolution": 32}, **rcfg}
    return get("renderer", "volume")(cfg, path="system.renderer", geometry=geo, material=mat, background=bg), geo


def camera(h=12, w=12):
    c2w = spherical_c2w(torch.tensor([10.0]), torch.tensor([30.0]), torch.tensor([1.0]))
    ro, rd = get_rays(c2w, h, w, 60.0)
    return c2w, ro, rd


@pytest.mark.parametrize("n_importance,alpha_threshold,tol", [(0, 1e-5, 1e-4), (16, 0.01, 2e-2)])
def test_occupancy_grid_marks_empty_space_and_skipping_agrees(n_importance, alpha_threshold, tol):
    """Skipping drops only samples whose alpha is below ``alpha_threshold`` (so the image moves by a
    few times that at most); with importance samples the coarse pdf, hence the fine sample
    positions, moves slightly too."""
    ren, geo = build(num_importance_samples=n_importance, grid={"resolution": 32, "alpha_threshold": alpha_threshold})
    ren_full, _ = build(grid={"enabled": False}, num_importance_samples=n_importance)
    ren_full._sub = ren._sub  # same geometry / material / background
    c2w, ro, rd = camera()
    ren.eval()
    ren_full.eval()
    with torch.no_grad():
        before = ren(ro, rd, c2w=c2w)
    assert ren.last_stats["n_evaluated"] == ren.last_stats["n_samples"]  # nothing skipped before an update
    ren.train()
    ren.do_update_step(0, 0)
    g = ren.grid
    assert bool(g.initialized) and 0.01 < g.occupied_fraction() < 0.35
    assert bool(g.occupied[16, 16, 16]) and not bool(g.occupied[0, 0, 0]) and not bool(g.occupied[31, 5, 20])
    ren.eval()
    with torch.no_grad():
        skipped = ren(ro, rd, c2w=c2w)
        full = ren_full(ro, rd, c2w=c2w)
    assert ren.last_stats["n_evaluated"] < 0.5 * ren.last_stats["n_samples"]
    assert ren_full.last_stats["n_evaluated"] == ren_full.last_stats["n_samples"]
    for k in ("comp_rgb", "opacity", "depth", "comp_normal"):
        torch.testing.assert_close(skipped[k], full[k], atol=tol, rtol=0)
        torch.testing.assert_close(before[k], full[k], atol=1e-6, rtol=0)
    # the ball is hit in the middle and missed at the corner: blue background there
    assert float(full["opacity"][0, 6, 6, 0]) > 0.99 and float(full["opacity"][0, 0, 0, 0]) < 1e-3
    torch.testing.assert_close(full["comp_rgb"][0, 0, 0], torch.tensor([0.0, 0.0, 1.0]), atol=1e-3, rtol=0)
    # updates follow update_every and only happen in training
    ren.do_update_step(0, 5)
    assert g.last_update_step == 0
    ren.eval()
    ren.do_update_step(0, 16)
    assert g.last_update_step == 0


def test_occupancy_grid_ema_is_a_decayed_maximum():
    g = OccupancyGrid({"resolution": 4, "jitter": False, "dilation": 0, "ema_decay": 0.5}, radius=1.0, step_size=0.1)
    g.update(lambda p: torch.full((p.shape[0], 1), 10.0))
    g.update(lambda p: torch.full((p.shape[0], 1), 1.0))
    torch.testing.assert_close(g.density, torch.full((4, 4, 4), 5.0))
    # 1 - exp(-0.1 d) > 0.01  <=>  d > 0.1005
    g.update(lambda p: (p[:, :1] > 0).float() * 0.0)
    g.density.fill_(0.05)
    g.update(lambda p: (p[:, :1] > 0).float())
    assert g.occupied[2:].all() and not g.occupied[:2].any()


def test_render_outputs_and_gradients_reach_the_hash_table():
    ren, geo = build(grid={"enabled": False})
    c2w, ro, rd = camera(8, 8)
    ren.train()
    out = ren(ro, rd, c2w=c2w, light_positions=torch.tensor([[1.0, 1.0, 1.0]]), shading="lambertian")
    assert out["shading"] == "lambertian"
    for k, c in (("comp_rgb", 3), ("opacity", 1), ("depth", 1), ("z_depth", 1), ("comp_normal", 3)):
        assert out[k].shape == (1, 8, 8, c)
    assert out["weights"].shape == (1, 8, 8, 64)
    # z-depth <= ray depth; composited = fg + (1 - opacity) * bg
    assert (out["z_depth"] <= out["depth"] + 1e-6).all()
    torch.testing.assert_close(out["comp_rgb"], out["comp_rgb_fg"] + (1 - out["opacity"]) * out["comp_rgb_bg"])
    (out["comp_rgb"] - 0.5).abs().mean().backward()
    grad = geo.encoding.params.grad
    assert grad is not None and torch.count_nonzero(grad) > 0
    assert all(p.grad is not None for p in geo.mlp.parameters())
    # eval: albedo, chunked over rays gives the same image as one chunk
    ren.eval()
    ren.cfg.eval_chunk_size = 7
    with torch.no_grad():
        a = ren(ro, rd, bg_color=torch.tensor([1.0, 1.0, 1.0]))
    ren.cfg.eval_chunk_size = 0
    with torch.no_grad():
        b = ren(ro, rd, bg_color=torch.tensor([1.0, 1.0, 1.0]))
    with torch.inference_mode():  # Lightning's eval loops: analytic normals still work
        c = ren(ro, rd, bg_color=torch.tensor([1.0, 1.0, 1.0]))
    torch.testing.assert_close(c["comp_normal"], b["comp_normal"])
    assert a["shading"] == "albedo"
    torch.testing.assert_close(a["comp_rgb"], b["comp_rgb"])
    torch.testing.assert_close(a["comp_normal"], b["comp_normal"])


def test_fully_empty_grid_renders_the_background():
    ren, geo = build()
    ren.grid.initialized.fill_(True)
    ren.grid.occupied.zero_()
    c2w, ro, rd = camera(6, 6)
    ren.train()
    out = ren(ro, rd, light_positions=torch.ones(1, 3), shading="lambertian")
    assert ren.last_stats["n_evaluated"] == 0
    assert float(out["opacity"].detach().abs().max()) == 0.0
    torch.testing.assert_close(out["comp_rgb"], torch.tensor([0.0, 0.0, 1.0]).expand(1, 6, 6, 3))


def test_config_validation_reaches_the_grid_and_the_encoding():
    from it3d.core.config import ConfigError, validate_component

    validate_component("renderer", "volume", {"grid": {"resolution": 128}}, "system.renderer")
    with pytest.raises(ConfigError, match="system.renderer.grid.resolutoin"):
        validate_component("renderer", "volume", {"grid": {"resolutoin": 128}}, "system.renderer")
    with pytest.raises(ConfigError, match="system.geometry.pos_encoding.log2_hashmap"):
        validate_component("geometry", "implicit-volume", {"pos_encoding": {"log2_hashmap": 12}}, "system.geometry")


# ----------------------------------------------------------------------------- reference (no compaction)
def reference_render(ren, ro, rd, lp=None, shading="albedo", output_normal=False):
    """The documented algorithm with no sample compaction: every sample of every ray is sent to the
    geometry and the ones the occupancy grid (or the box) rules out are zeroed afterwards. It draws
    random numbers in the renderer's order (stratified jitter, then the importance samples), so with
    the same RNG state it must give the renderer's result up to float rounding."""
    from it3d.renderers.volume import ray_aabb as aabb

    c, r = ren.cfg, ro.shape[0]
    n = c.num_samples_per_ray
    randomized = ren.training and c.randomized
    near, far, hit = aabb(ro, rd, ren.radius, c.near_plane)
    edges = near[:, None] + (far - near)[:, None] * torch.linspace(0.0, 1.0, n + 1)
    jitter = torch.rand(r, n) if randomized else 0.5
    t = edges[:, :-1] + (edges[:, 1:] - edges[:, :-1]) * jitter
    starts, ends = edges[:, :-1], edges[:, 1:]
    g = ren.grid

    def points(t):
        return (ro[:, None] + rd[:, None] * t[..., None]).reshape(-1, 3)

    def live(t):
        m = hit[:, None].expand_as(t).reshape(-1)
        if g.enabled and bool(g.initialized):
            m = m & g.occupied.reshape(-1)[g.cell_index(points(t))] & (points(t).abs() <= g.radius).all(-1)
        return m.view_as(t)

    if c.num_importance_samples > 0:
        with torch.no_grad():
            dens = torch.where(live(t), ren.geometry.forward_density(points(t)).view_as(t), 0.0)
            w = volume_weights(dens, ends - starts)[0]
        t_new = sample_pdf(edges, w, c.num_importance_samples, deterministic=not randomized)
        t, _ = torch.sort(torch.cat([t, t_new], -1), -1)
        mids = 0.5 * (t[:, 1:] + t[:, :-1])
        starts, ends = torch.cat([near[:, None], mids], -1), torch.cat([mids, far[:, None]], -1)
    m = live(t)
    s = t.shape[1]
    pts = points(t)
    geo = ren.geometry(pts, output_normal=output_normal)
    ray = torch.arange(r).repeat_interleave(s)
    rgb = ren.material(geo["features"], viewdirs=rd[ray], shading_normal=geo.get("normal"),
                       light_positions=None if lp is None else lp[ray], shading=shading, positions=pts)
    density = torch.where(m, geo["density"].view(r, s), 0.0)
    w = volume_weights(density, ends - starts)[0]
    out = {"rgb": accumulate(w, torch.where(m[..., None], rgb.view(r, s, 3), 0.0)), "opacity": w.sum(-1, keepdim=True),
           "depth": (w * t).sum(-1, keepdim=True), "weights": w, "n_live": int(m.sum())}
    if output_normal:
        out["normal"] = accumulate(w, torch.where(m[..., None], geo["normal"].view(r, s, 3), 0.0))
    return out


def _flat(ro, rd):
    return ro.reshape(-1, 3), torch.nn.functional.normalize(rd.reshape(-1, 3), dim=-1)


def _compare(out, ref, h, w, atol):
    torch.testing.assert_close(out["comp_rgb_fg"], ref["rgb"].view(1, h, w, 3), atol=atol, rtol=0)
    for k in ("opacity", "depth"):
        torch.testing.assert_close(out[k], ref[k].view(1, h, w, 1), atol=atol, rtol=0)
    torch.testing.assert_close(out["weights"], ref["weights"].view(1, h, w, -1), atol=atol, rtol=0)
    if "normal" in ref:
        torch.testing.assert_close(out["comp_normal"], ref["normal"].view(1, h, w, 3), atol=atol, rtol=0)


def test_eval_render_matches_the_uncompacted_reference():
    ren, geo = build(grid={"resolution": 16})
    c2w, ro, rd = camera(10, 10)
    ren.train()
    ren.do_update_step(0, 0)  # an initialised grid: about a third of the samples are skipped
    ren.eval()
    with torch.no_grad():
        out = ren(ro, rd, c2w=c2w, light_positions=torch.ones(1, 3), shading="lambertian")
        ref = reference_render(ren, *_flat(ro, rd), lp=torch.ones(100, 3), shading="lambertian", output_normal=True)
    assert 0 < ref["n_live"] < 0.8 * 100 * 64
    assert int(ren.last_stats["n_evaluated"]) == ref["n_live"]
    _compare(out, ref, 10, 10, 1e-5)


def test_training_steps_match_the_uncompacted_reference():
    """Six Adam steps with grid updates every second step; each step's render and every parameter
    gradient equals the reference's computed from the same parameters and random numbers. The
    fixed-size sample buffers (what runs on a GPU: margin 1.5) are used on CPU here too."""
    ren, geo = build(grid={"resolution": 16, "update_every": 2}, sample_capacity_margin=1.5)
    ren.train()
    lights = torch.tensor([[1.0, 1.0, 1.0]])
    opt = torch.optim.Adam(geo.parameters(), lr=1e-2)
    evaluated = []
    for step in range(6):
        ren.do_update_step(0, step)
        c2w = spherical_c2w(torch.tensor([10.0 + 5 * step]), torch.tensor([30.0 * step]), torch.tensor([1.0]))
        ro, rd = get_rays(c2w, 8, 8, 60.0)
        shading = "lambertian" if step % 2 else "albedo"
        torch.manual_seed(100 + step)
        ref = reference_render(ren, *_flat(ro, rd), lp=lights.expand(64, 3), shading=shading,
                               output_normal=shading != "albedo")
        (ref["rgb"] - 0.3).abs().mean().add(ref["opacity"].mean()).backward()
        ref_grads = [p.grad.clone() for p in geo.parameters()]
        opt.zero_grad()
        torch.manual_seed(100 + step)
        out = ren(ro, rd, c2w=c2w, light_positions=lights, shading=shading)
        (out["comp_rgb_fg"] - 0.3).abs().mean().add(out["opacity"].mean()).backward()
        _compare(out, ref, 8, 8, 1e-5)
        for p, gr in zip(geo.parameters(), ref_grads):
            torch.testing.assert_close(p.grad, gr, atol=1e-6, rtol=1e-4)
        evaluated.append((ref["n_live"], ren.last_stats["n_slots"]))
        assert int(ren.last_stats["n_evaluated"]) == ref["n_live"] and int(ren.last_stats["n_dropped"]) == 0
        opt.step()
        opt.zero_grad()
    # from the second grid update on (step 2), the final pass's buffer holds 1.5 x the peak occupied
    # fraction of the renders since the previous update, rounded up to 1/32, instead of all 4096 samples
    def slots(a, b):
        return math.ceil(32 * 1.5 * max(evaluated[a][0], evaluated[b][0]) / 4096) * 4096 // 32

    assert [n for _, n in evaluated] == [4096, 4096, slots(0, 1), slots(0, 1), slots(2, 3), slots(2, 3)]
    assert slots(0, 1) <= 1024 and ren.sample_buffers.fraction["coarse"] < 0.5


def _train_render_loss(ren, ro, rd, c2w, shading="lambertian"):
    out = ren(ro, rd, c2w=c2w, light_positions=torch.ones(1, 3), shading=shading)
    loss = (out["comp_rgb"] - 0.5).abs().mean() + out["opacity"].mean() + out["depth"].mean()
    loss.backward()
    return out


@pytest.mark.parametrize("shading", ["albedo", "lambertian"])
def test_training_render_and_backward_make_no_host_sync(shading):
    from it3d.core.profiling import count_syncs

    ren, geo = build(grid={"resolution": 16, "update_every": 2}, sample_capacity_margin=1.5)
    c2w, ro, rd = camera(8, 8)
    ren.train()
    counts = []
    for step in range(4):
        with count_syncs() as s:
            ren.do_update_step(0, step)
        counts.append(s.count)
        with count_syncs() as s:
            _train_render_loss(ren, ro, rd, c2w, shading)
        assert s.count == 0 and s.uploads == 0, s.report()
    # grid updates: none at step 0 (no render measured yet), one read of the peaks at step 2
    assert counts == [0, 0, 1, 0]
    assert ren.sample_buffers.fraction["fine"] < 0.5 and ren.last_stats["n_slots"] < ren.last_stats["n_samples"]
    # eval sizes its buffers exactly: one read per pass and chunk (2 passes x 2 chunks)
    ren.eval()
    ren.cfg.eval_chunk_size = 32
    with torch.no_grad(), count_syncs() as s:
        ren(ro, rd, c2w=c2w, shading="albedo")
    assert s.count == 4 and all("sample_buffers.py" in k and k.endswith(" item") for k in s.by_site())


def test_overflowing_sample_buffer_is_reported_and_grows(caplog):
    ren, geo = build(grid={"resolution": 16, "update_every": 2}, sample_capacity_margin=1.5)
    c2w, ro, rd = camera(8, 8)
    ren.train()
    ren.do_update_step(0, 0)
    ren.sample_buffers.fraction = {"coarse": 1 / 32, "fine": 1 / 32}  # 128 slots for ~450 occupied samples
    out = _train_render_loss(ren, ro, rd, c2w, "albedo")
    dropped = int(ren.last_stats["n_dropped"])
    torch.manual_seed(0)
    ren.eval()
    with torch.no_grad():
        full = ren(ro, rd, c2w=c2w, shading="albedo")
    live = int(ren.last_stats["n_evaluated"])
    # the overflow is the occupied samples past slot 128 of the final pass (plus those of the coarse pass)
    assert dropped >= live - 128 > 0
    # the first rays keep their samples, the last ones render as empty space
    torch.testing.assert_close(out["opacity"][0, 0], full["opacity"][0, 0], atol=1e-5, rtol=0)
    assert float(full["opacity"][0, 4, 4, 0]) > 0.9 and float(out["opacity"][0, 4, 4, 0].detach()) < 1e-4
    ren.train()
    with caplog.at_level("WARNING", logger="it3d"):
        ren.do_update_step(0, 2)
    assert f"renderer: {dropped} occupied samples did not fit the fixed-size training buffers" in caplog.text
    assert "rendered as empty space" in caplog.text and "sample_capacity_margin" in caplog.text
    assert ren.sample_buffers.fraction["fine"] >= 1.5 * live / 4096
    out = _train_render_loss(ren, ro, rd, c2w, "albedo")
    assert int(ren.last_stats["n_dropped"]) == 0


def test_auto_margin_is_exact_on_cpu_and_bad_margins_fail():
    from it3d.core.config import ConfigError
    from it3d.core.profiling import count_syncs

    ren, geo = build(grid={"resolution": 16, "update_every": 2})  # sample_capacity_margin: auto
    c2w, ro, rd = camera(8, 8)
    ren.train()
    for step in range(3):
        ren.do_update_step(0, step)
        with count_syncs() as s:
            _train_render_loss(ren, ro, rd, c2w, "albedo")
    # on CPU tensors auto sizes every buffer to its count (a host read per pass costs nothing there)
    assert ren.last_stats["n_slots"] == int(ren.last_stats["n_evaluated"]) < ren.last_stats["n_samples"]
    assert s.count == 2 and all("sample_buffers.py" in k for k in s.by_site())
    for bad in (0.5, "often"):
        with pytest.raises(ConfigError, match="sample_capacity_margin: expected auto, 0 .exact. or a number >= 1"):
            build(sample_capacity_margin=bad)
