"""How the refine system is wired (issue 11): the guidance sees the novel view's render, the total loss
is exactly the weighted sum of its terms (white background included), the colour regulariser of
novel points is computed on novel points, and the learning rate decays as the official code's."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from conftest import registered
from it3d.core.base import BaseGuidance
from it3d.runner.cli import build_components

from test_refine_system import config, setup  # noqa: F401  (the module fixture registers the test builder)

SEEN = []


class _Spy(BaseGuidance):
    @dataclass
    class Config:
        pass

    def forward(self, rgb, batch, step):
        SEEN.append((rgb.detach().clone(), dict(batch)))
        return {"loss": (rgb - 0.25).abs().mean()}


@pytest.fixture(scope="module")
def refine(setup):  # noqa: F811
    with registered("guidance", "test-refine-spy", _Spy):
        root = setup
        cfg, parsed = config(root, "+system.guidance={spy: {type: test-refine-spy, weight: 2.0}}",
                             f"trial_dir={root / 'wiring'}")
        dm, system = build_components(cfg, parsed, str(root / "wiring"), resumed=False)
        dm.prepare()
        system.build_point_cloud({**dm.reference, "caption": ""})
        with torch.no_grad():
            system.renderer.background[:3] = 0.3  # a grey background: the white-background term is not 0
        yield system, dm


def white_bg(out):
    return ((1 - out["opacity"]) * (1 - out["comp_rgb"]).abs()).mean()


def test_guidance_sees_the_novel_render_and_the_loss_is_the_sum_of_its_terms(refine, monkeypatch, request):
    system, dm = refine
    saved = system.geometry.descriptors.detach().clone()
    request.addfinalizer(lambda: system.geometry.descriptors.data.copy_(saved))  # others start from the init
    logged = {}
    monkeypatch.setattr(system, "log", lambda k, v, **kw: logged.__setitem__(k, float(v)))
    geo = system.geometry
    novel, delta = ~geo.is_ref, 0.1
    assert novel.any() and geo.is_ref.any()
    with torch.no_grad():
        geo.descriptors[novel, :3] += delta  # only the novel points' colours move away from their initial ones
    system.set_step(0)
    batch = dm.train_batch(3)
    total = system.step_losses(batch)
    with torch.no_grad():
        out_ref, out_novel = system.render_batch(batch["ref"]), system.render_batch(batch["random"])
    rgb, gbatch = SEEN[-1]
    assert torch.allclose(rgb, out_novel["comp_rgb"], atol=1e-6)  # the novel view's render ...
    assert not torch.allclose(rgb, out_ref["comp_rgb"], atol=1e-2)  # ... not the reference's
    assert torch.equal(gbatch["c2w"], batch["random"]["c2w"])
    # colour regulariser: sum over RGB of the squared change, averaged over the points of each kind
    assert logged["train/color_novel"] == pytest.approx(3 * delta ** 2, rel=1e-4)
    assert logged["train/color_ref"] == 0.0
    # white background: the mean of the two views' terms, and it is part of the total
    bg = float((white_bg(out_ref) + white_bg(out_novel)) / 2)
    assert bg > 1e-3 and logged["train/white_bg"] == pytest.approx(bg, rel=1e-4)
    W = {name: entry["weight"] for name, entry in system.cfg.loss.items()}
    ref_l1 = float(F.l1_loss(out_ref["comp_rgb"], batch["ref"]["rgb"]))
    guide = float((out_novel["comp_rgb"] - 0.25).abs().mean())
    expected = (W["ref_rgb"] * ref_l1 + 2.0 * guide + W["white_bg"] * bg
                + W["color_novel"] * 3 * delta ** 2)
    assert float(total) == pytest.approx(expected, rel=1e-4)


def test_descriptor_init_and_the_official_learning_rate_decay(refine):
    system, _ = refine
    assert system.cfg.geometry["init_std"] == 1.0  # MI3D refine(): torch.randn features
    feats = system.geometry.descriptors[:, 3:].detach()
    assert feats.std().item() == pytest.approx(1.0, abs=0.05)
    cfg = system.cfg.optimizer
    assert cfg["args"]["lr"] == 0.001 and all(g["lr"] == 0.001 for g in cfg["params"].values())
    system.zero_grad(set_to_none=True)  # no gradient left by another test: the steps below move no descriptor
    opt = system.configure_optimizers()
    sched = opt["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(1201):
        lrs.append(sched.get_last_lr()[0])
        opt["optimizer"].step()
        sched.step()
    # lr * 0.1 ** min(step / 1000, 1)
    assert [lrs[0], lrs[500], lrs[1000], lrs[1200]] == pytest.approx([1e-3, 1e-3 * 0.1 ** 0.5, 1e-4, 1e-4])


def _run_step(system, batch, split):
    """One step's losses and gradients: the old way (one graph, one backward) or the reference backward first."""
    from it3d.core.profiling import peak_memory

    system.zero_grad(set_to_none=True)
    with peak_memory() as m:
        if split:
            total = system.step_losses(batch, backward=lambda loss: loss.backward())
        else:
            total = system.step_losses(batch)
            total.backward()
    grads = {n: p.grad.clone() for n, p in system.named_parameters() if p.grad is not None}
    return float(total), grads, m.peak_bytes


def test_reference_backward_first_same_losses_and_gradients_lower_peak(refine, monkeypatch):
    system, dm = refine
    logged = {True: {}, False: {}}
    batch = dm.train_batch(5)
    system.set_step(5)
    results = {}
    for split in (False, True, False, True):  # twice each: allocator warm-up does not decide it
        monkeypatch.setattr(system, "log", lambda k, v, **kw: logged[split].__setitem__(k, float(v)))
        results[split] = _run_step(system, batch, split)
    (one, g_one, peak_one), (two, g_two, peak_two) = results[False], results[True]
    assert two == pytest.approx(one, rel=1e-6) and logged[True] == pytest.approx(logged[False], rel=1e-6)
    assert set(g_one) == set(g_two) and len(g_one) >= 3  # descriptors, background, U-Net
    for name in g_one:
        torch.testing.assert_close(g_two[name], g_one[name], rtol=1e-5, atol=1e-8, msg=name)
    print(f"refine step peak: one graph {peak_one / 1e6:.2f} MB, reference backward first {peak_two / 1e6:.2f} MB")
    assert peak_two < 0.85 * peak_one  # two live render graphs -> one


def test_refine_step_makes_no_host_sync(refine, monkeypatch):
    """The whole refine step (both renders, the losses, both backwards) with the GPU's fixed-size fragment
    buffers (auto sizes them exactly on CPU tensors, one read per raster scale)."""
    from it3d.core.profiling import count_syncs
    from it3d.renderers.sample_buffers import CompactionBuffers

    system, dm = refine
    monkeypatch.setattr(system, "log", lambda *a, **k: None)
    monkeypatch.setattr(system.renderer, "sample_buffers", CompactionBuffers(1.5, "point fragments", "left out",
                                                                             "fragment_capacity_margin"))
    for step in range(3):
        system.set_step(step)
        batch = dm.train_batch(step)
        with count_syncs() as c:
            system.step_losses(batch, backward=lambda loss: loss.backward())
        assert c.count == 0 and c.uploads == 0, c.report()


def test_refine_losses_are_registered_terms_and_each_reaches_the_total(refine, monkeypatch):
    """The refine objective is the ``loss`` dict of registered terms (issue 12): every term's logged value,
    weighted, is part of ``train/loss`` (hand-summed with the guidance, it is the total), and a term whose
    weight is 0 at the step is never called."""
    from it3d.core import registry
    from it3d.core.base import BaseLoss

    system, dm = refine
    assert list(system.losses) == ["ref_rgb", "white_bg", "color_ref", "color_novel"]
    for name, entry in system.cfg.loss.items():
        term = system.losses[name]
        assert isinstance(term, BaseLoss) and type(term) is registry.get("loss", entry["type"])
        assert system.loss_weights[name] == entry["weight"]
    geo = system.geometry
    saved = geo.descriptors.detach().clone()
    logged = {}
    monkeypatch.setattr(system, "log", lambda k, v, **kw: logged.__setitem__(k, float(v)))
    try:
        with torch.no_grad():  # every point's colour moves: both colour regularisers are non-zero
            geo.descriptors[:, :3] += 0.05
        system.set_step(2)
        system.step_losses(dm.train_batch(2), backward=lambda loss: loss.backward())
        system.zero_grad(set_to_none=True)
        parts = {f"loss.{n}": system.loss_weights[n] * logged[f"train/{n}"] for n in system.losses}
        parts.update({f"guidance.{n}": system.guidance_weights[n] * logged[f"train/{n}"] for n in system.guidance})
        total = logged["train/loss"]
        assert sum(parts.values()) == pytest.approx(total, rel=2e-6)
        for name, value in parts.items():  # each term weighs enough that leaving it out would show
            assert value > 1e-4 * total, (name, value, total)

        called = []
        monkeypatch.setattr(system.losses["color_ref"], "forward", lambda out, ref: called.append(1))
        monkeypatch.setitem(system.loss_weights, "color_ref", [[0, 0.0], [10, 0.0], [10, 1e5]])  # 0 at step 2
        logged.clear()
        system.step_losses(dm.train_batch(2))
        assert not called and "train/color_ref" not in logged and "train/color_novel" in logged
    finally:
        with torch.no_grad():
            geo.descriptors.copy_(saved)


def test_an_old_refine_config_names_the_new_loss_spelling():
    """A trial written before issue 12 (``system.loss.lambda_*``) fails with the registered entries to write."""
    from it3d.core import registry
    from it3d.core.config import ConfigError

    with pytest.raises(ConfigError, match=r"system\.loss\.lambda_white_bg: .*white_bg: \{type: white-bg"):
        registry.get("system", "refine").validate_config({"loss": {"lambda_white_bg": 1000.0}}, "system")


@pytest.mark.parametrize("weight", [-1.0, [[0, 1000.0], [10, -1.0]]])
def test_a_negative_term_weight_fails_at_parse(weight):
    """Term weights are >= 0, as the refine ``lambda_*`` keys were (a schedule: every value)."""
    from it3d.core import registry
    from it3d.core.config import ConfigError

    with pytest.raises(ConfigError, match=r"system\.loss\.white_bg\.weight must be >= 0"):
        registry.get("system", "refine").validate_config({"loss": {"white_bg": {"type": "white-bg", "weight": weight}}},
                                                         "system")
