"""How the coarse system is wired (issue 11): what reaches each loss and guidance term.

* the reference is re-composited on the very background colour its render used, and that colour is
  random in training (Make-It-3D B.1's background jitter), for novel views too;
* normal-shaded renders are camera-space normal maps on the DreamBooth normal modality's background,
  and agree with the instance image DreamBooth is trained on for the same view;
* the renderer is asked for normals exactly while a normal-based regulariser has a non-zero weight,
  and the regularisers of the stage config reach the loss.
"""
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from conftest import registered
from it3d.core.base import BaseGuidance
from it3d.core import cameras
from it3d.data.dreambooth_data import NORMAL_BACKGROUND, modality_image
from it3d.runner.cli import build_components, prepare_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEN = []
R_SPHERE = 0.3

pytestmark = pytest.mark.usefixtures("one_thread")


class _Spy(BaseGuidance):
    @dataclass
    class Config:
        pass

    def forward(self, rgb, batch, step):
        SEEN.append((rgb.detach().clone(), dict(batch)))
        return {"loss": rgb.mean() * 0.0}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    with registered("guidance", "test-spy", _Spy):
        out = tmp_path_factory.mktemp("wiring")
        cfg, parsed = prepare_config([os.path.join(ROOT, "configs", "tiny", "coarse.yaml")], [
            f"data.image_path={ROOT}/load/synthetic/rgba.png", f"trial_dir={out}", "data.heights=[16]",
            "data.widths=[16]", "system.ref_ray_batch=0", "system.renderer.num_samples_per_ray=64",
            "system.renderer.num_importance_samples=0", "+system.guidance={spy: {type: test-spy, weight: 1.0}}",
            "system.loss.orient.weight=0.02", "system.loss.normal-smooth-3d.weight=1.0"])  # tiny/coarse turns them off
        dm, system = build_components(cfg, parsed, str(out), resumed=False)
        dm.prepare()
        system.log = lambda *a, **k: None
        yield system, dm


def spy_renderer(system, monkeypatch):
    calls = []
    real = system.renderer.forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(system.renderer, "forward", forward)
    return calls


def step_of_kind(dm, use_ref):
    return next(s for s in range(100) if dm.train_batch(s)["use_ref"] == use_ref)


def test_reference_and_novel_views_get_a_random_background(built, monkeypatch):
    system, dm = built
    assert system.cfg.ref_bg_color is None and system.background.cfg.random_prob == 1.0  # the stage config's choice
    seen_ref = []
    real_rgb = system.losses["ref-rgb"].forward
    monkeypatch.setattr(system.losses["ref-rgb"], "forward", lambda out, ref: (seen_ref.append((out, ref)),
                                                                               real_rgb(out, ref))[1])
    calls = spy_renderer(system, monkeypatch)
    s = step_of_kind(dm, True)
    system.set_step(s)
    batch = dm.train_batch(s)
    system.training_step(batch, 0)
    out, ref = seen_ref[-1]
    bg = out["comp_rgb_bg"][0, 0, 0]
    assert not torch.allclose(bg, torch.ones(3))  # jittered, not white
    assert torch.allclose(out["comp_rgb_bg"], bg.expand_as(out["comp_rgb_bg"]))  # one colour per view
    # the reference the loss compares with: the photo on that same colour
    a = batch["ref"]["mask"]
    expected = (batch["ref"]["rgb"] - (1 - a) + (1 - a) * bg).clamp(0, 1)
    assert torch.allclose(ref["rgb"], expected, atol=1e-6)
    outside = a[0, ..., 0] < 1e-3
    assert outside.any() and torch.allclose(ref["rgb"][0][outside], bg.expand(int(outside.sum()), 3), atol=1e-6)

    s2 = step_of_kind(dm, False)
    system.set_step(s2)
    system.training_step(dm.train_batch(s2), 0)
    novel_bg = calls[-1][1]["comp_rgb_bg"][0, 0, 0]
    assert not torch.allclose(novel_bg, torch.ones(3)) and not torch.allclose(novel_bg, bg)
    # what the guidance saw is that render, background included
    assert torch.equal(SEEN[-1][0], calls[-1][1]["comp_rgb"].detach())


def test_normals_are_rendered_exactly_while_a_normal_regulariser_is_on(built, monkeypatch):
    system, dm = built
    w = system.loss_weights
    assert {"orient", "normal-smooth-3d", "sparsity", "entropy"} <= set(w)
    calls = spy_renderer(system, monkeypatch)
    logged = {}
    monkeypatch.setattr(system, "log", lambda k, v, **kw: logged.__setitem__(k, v))
    s = step_of_kind(dm, True)
    system.set_step(s)
    system.training_step(dm.train_batch(s), 0)
    assert calls[-1][0]["output_normal"] is True and "sample_normal" in calls[-1][1]
    for name in ("orient", "normal-smooth-3d", "sparsity", "entropy"):
        assert torch.isfinite(torch.as_tensor(logged[f"train/{name}"])) and float(logged[f"train/{name}"]) > 0, name
    monkeypatch.setitem(w, "orient", 0.0)
    logged.clear()
    system.training_step(dm.train_batch(s), 0)  # albedo reference render: the 3D smoothness finds its own normals
    assert not calls[-1][0]["output_normal"] and "sample_normal" not in calls[-1][1]
    assert "train/orient" not in logged and float(logged["train/normal-smooth-3d"]) > 0
    monkeypatch.setitem(w, "normal-smooth-3d", 0.0)
    logged.clear()
    system.training_step(dm.train_batch(s), 0)
    assert "sample_positions" not in calls[-1][1] and "train/normal-smooth-3d" not in logged
    assert "train/sparsity" in logged


def sphere_raw(pts, twice_differentiable=False):
    """Density exp(300 (R - |x|)): a soft ball of radius R whose normals point outwards."""
    r = pts.norm(dim=-1, keepdim=True)
    return 300.0 * (R_SPHERE - r), torch.zeros(pts.shape[0], 3, device=pts.device)


def sphere_normals(c2w, fovy, size):
    """World normals and coverage of the exact sphere seen from camera ``c2w`` (size x size)."""
    ro, rd = cameras.get_rays(c2w, size, size, fovy)
    b = (ro * rd).sum(-1)
    disc = b ** 2 - ((ro ** 2).sum(-1) - R_SPHERE ** 2)
    hit = disc > 0
    t = -b - disc.clamp_min(0).sqrt()
    n = F.normalize(ro + rd * t[..., None], dim=-1) * hit[..., None]
    return n[None], hit[None, ..., None].float()


def test_normal_renders_are_camera_space_on_the_modality_background(built, monkeypatch):
    system, dm = built
    monkeypatch.setattr(system.geometry, "forward_raw", sphere_raw)
    monkeypatch.setitem(system.material.cfg.shading_probs, "normal", 1.0)
    for k in ("albedo", "lambertian", "textureless"):
        monkeypatch.setitem(system.material.cfg.shading_probs, k, 0.0)
    s = step_of_kind(dm, False)
    system.set_step(s)
    batch = dm.train_batch(s)
    size = 24
    view = {**batch["random"]}
    view["rays_o"], view["rays_d"] = cameras.get_rays(view["c2w"], size, size, view["fovy"])
    view["height"] = view["width"] = size
    system.training_step({**batch, "random": view}, 0)
    rgb, gbatch = SEEN[-1]
    assert gbatch["shading"] == "normal"
    c = size // 2
    # the centre pixel sees the sphere head-on: camera-space +z whatever the azimuth ((0.5, 0.5, 1) encoded)
    assert torch.allclose(rgb[0, c - 1:c + 1, c - 1:c + 1].mean((0, 1)), torch.tensor([0.5, 0.5, 1.0]), atol=0.03)
    assert torch.allclose(rgb[0, 0, 0], torch.tensor(NORMAL_BACKGROUND), atol=1e-3)  # not the random background
    # the same encoding as the DreamBooth normal modality's instance image of that view
    n, cov = sphere_normals(view["c2w"][0], float(view["fovy"][0]), size)
    target = modality_image("normal", torch.ones_like(n), cov, normal=n, c2w=view["c2w"])
    inner = F.max_pool2d(1 - cov.permute(0, 3, 1, 2), 3, 1, 1).permute(0, 2, 3, 1)[0, ..., 0] == 0  # off the rim
    outside = F.max_pool2d(cov.permute(0, 3, 1, 2), 3, 1, 1).permute(0, 2, 3, 1)[0, ..., 0] == 0
    assert inner.sum() > 40 and outside.sum() > 100
    assert (rgb[0][inner] - target[0][inner]).abs().max() < 0.05
    assert (rgb[0][outside] - target[0][outside]).abs().max() < 0.02
