"""How the refine system is wired (issue 11): the guidance sees the novel view's render, the total loss
is exactly the weighted sum of its terms (white background included), the colour regulariser of
novel points is computed on novel points, and the learning rate decays as the official code's."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from it3d.core import registry
from it3d.core.base import BaseGuidance
from it3d.run import build_components

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
    registry.register("test-refine-spy", kind="guidance")(_Spy)
    try:
        root = setup
        cfg, parsed = config(root, "+system.guidance={spy: {type: test-refine-spy, weight: 2.0}}",
                             f"trial_dir={root / 'wiring'}")
        dm, system = build_components(cfg, parsed, str(root / "wiring"), resumed=False)
        dm.prepare()
        system.build_point_cloud({**dm.reference, "caption": ""})
        with torch.no_grad():
            system.renderer.background[:3] = 0.3  # a grey background: the white-background term is not 0
        yield system, dm
    finally:
        registry.unregister("guidance", "test-refine-spy")


def white_bg(out):
    return ((1 - out["opacity"]) * (1 - out["comp_rgb"]).abs()).mean()


def test_guidance_sees_the_novel_render_and_the_loss_is_the_sum_of_its_terms(refine, monkeypatch):
    system, dm = refine
    logged = {}
    monkeypatch.setattr(system, "log", lambda k, v, **kw: logged.__setitem__(k, float(v)))
    geo = system.geometry
    novel, delta = ~geo.is_ref, 0.1
    assert novel.any() and geo.is_ref.any()
    with torch.no_grad():
        geo.descriptors[novel, :3] += delta  # only the novel points' colours move away from their initial ones
    system._fallback_step = 0
    batch = dm.train_batch(3)
    total = system.training_step(batch, 0)
    with torch.no_grad():
        out_ref, out_novel = system.render_batch(batch["ref"]), system.render_batch(batch["random"])
    rgb, gbatch = SEEN[-1]
    assert torch.allclose(rgb, out_novel["comp_rgb"], atol=1e-6)  # the novel view's render ...
    assert not torch.allclose(rgb, out_ref["comp_rgb"], atol=1e-2)  # ... not the reference's
    assert torch.equal(gbatch["c2w"], batch["random"]["c2w"])
    # colour regulariser: sum over RGB of the squared change, averaged over the points of each kind
    assert logged["train/loss_color_novel"] == pytest.approx(3 * delta ** 2, rel=1e-4)
    assert logged["train/loss_color_ref"] == 0.0
    # white background: the mean of the two views' terms, and it is part of the total
    bg = float((white_bg(out_ref) + white_bg(out_novel)) / 2)
    assert bg > 1e-3 and logged["train/loss_white_bg"] == pytest.approx(bg, rel=1e-4)
    L = system.cfg.loss
    ref_l1 = float(F.l1_loss(out_ref["comp_rgb"], batch["ref"]["rgb"]))
    guide = float((out_novel["comp_rgb"] - 0.25).abs().mean())
    expected = (L.lambda_ref_rgb * ref_l1 + 2.0 * guide + L.lambda_white_bg * bg
                + L.lambda_color_novel * 3 * delta ** 2)
    assert float(total) == pytest.approx(expected, rel=1e-4)


def test_descriptor_init_and_the_official_learning_rate_decay(refine):
    system, _ = refine
    assert system.cfg.geometry["init_std"] == 1.0  # MI3D refine(): torch.randn features
    feats = system.geometry.descriptors[:, 3:].detach()
    assert feats.std().item() == pytest.approx(1.0, abs=0.05)
    cfg = system.cfg.optimizer
    assert cfg["args"]["lr"] == 0.001 and all(g["lr"] == 0.001 for g in cfg["params"].values())
    opt = system.configure_optimizers()
    sched = opt["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(1201):
        lrs.append(sched.get_last_lr()[0])
        opt["optimizer"].step()
        sched.step()
    # lr * 0.1 ** min(step / 1000, 1)
    assert [lrs[0], lrs[500], lrs[1000], lrs[1200]] == pytest.approx([1e-3, 1e-3 * 0.1 ** 0.5, 1e-4, 1e-4])
