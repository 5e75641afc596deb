"""coarse system: guidance hand-off, zero-weight terms never computed, render_view, load_stage errors."""
import os
from dataclasses import dataclass

import pytest
import torch

from it3d.core import registry
from it3d.core.base import BaseGuidance, BaseLoss
from it3d.core.errors import It3dError
from it3d.runner.cli import build_components, prepare_config
from it3d.systems.loading import load_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALLS = {"guide": [], "prompt": [], "ref": [], "loss": 0}


class _Guide(BaseGuidance):
    @dataclass
    class Config:
        target: float = 0.5

    def set_prompt(self, text):
        CALLS["prompt"].append(text)

    def set_reference(self, ref):
        CALLS["ref"].append(ref["rgb"].shape)

    def forward(self, rgb, batch, step):
        CALLS["guide"].append((tuple(rgb.shape), batch["shading"], float(batch["azimuth"][0]), step))
        return {"loss": ((rgb - self.cfg.target) ** 2).mean(), "t": 7.0}


class _Counting(BaseLoss):
    @dataclass
    class Config:
        view: str = "any"

    def applies_to(self, view):
        return True

    def forward(self, out, ref):
        CALLS["loss"] += 1
        return out["opacity"].mean()


@pytest.fixture(scope="module")
def system_and_dm(tmp_path_factory):
    registry.register("test-guide", kind="guidance")(_Guide)
    registry.register("test-counting", kind="loss")(_Counting)
    try:
        out = tmp_path_factory.mktemp("coarse")
        cfg, parsed = prepare_config([os.path.join(ROOT, "configs", "tiny", "coarse.yaml")], [
            f"data.image_path={ROOT}/load/synthetic/rgba.png", f"trial_dir={out}", "data.heights=[12]",
            "data.widths=[12]", "data.ref_prob=0.5", "system.ref_ray_batch=0", "system.renderer.num_samples_per_ray=8",
            "system.renderer.num_importance_samples=0", "system.material.shading_probs.lambertian=0",
            "+system.guidance={g: {type: test-guide, weight: 2.0, target: 0.3}}",
            "+system.loss.counter={type: test-counting, weight: [1000, 0.0, 1.0, 2000]}"])
        dm, system = build_components(cfg, parsed, str(out), resumed=False)
        yield system, dm
    finally:
        registry.unregister("guidance", "test-guide")
        registry.unregister("loss", "test-counting")


def test_training_step_routes_ref_and_novel_views(system_and_dm):
    system, dm = system_and_dm
    dm.prepare()
    assert "g" in system.guidance and "g" not in dict(system.named_children())  # guidance not checkpointed
    logged = {}
    system.log = lambda k, v, **kw: logged.__setitem__(k, v)
    steps = {s: dm.train_batch(s)["use_ref"] for s in range(40)}
    s_ref = next(s for s, u in steps.items() if u)
    s_novel = next(s for s, u in steps.items() if not u)
    system.set_step(s_novel)
    loss = system.training_step(dm.train_batch(s_novel), 0)
    b = dm.train_batch(s_novel)["random"]
    assert CALLS["guide"][-1][:2] == ((1, 12, 12, 3), "albedo") and CALLS["guide"][-1][2] == float(b["azimuth"][0])
    assert "train/g" in logged and logged["train/g/t"] == 7.0 and "train/ref-rgb" not in logged
    loss.backward()
    assert system.geometry.encoding.params.grad.abs().sum() > 0
    logged.clear()
    system.set_step(s_ref)
    system.training_step(dm.train_batch(s_ref), 0)
    assert {"train/ref-rgb", "train/mask", "train/depth-pearson", "train/loss"} <= set(logged)
    assert "train/g" not in logged and "train/sparsity" in logged  # the stage config's regulariser
    # the counting term has weight 0 until step 1000: never called
    assert CALLS["loss"] == 0
    system.set_step(1500)
    system.training_step(dm.train_batch(s_ref), 0)
    assert CALLS["loss"] == 1


def test_render_view_and_load_stage_errors(system_and_dm, tmp_path):
    system, dm = system_and_dm
    ref = dm.reference
    out = system.render_view(ref["c2w"][0], 60.0, 8, 10)
    assert out["comp_rgb"].shape == (1, 8, 10, 3) and out["opacity"].shape == (1, 8, 10, 1)
    assert system.training  # restored
    with pytest.raises(It3dError, match="parsed.yaml"):
        load_stage(str(tmp_path))
