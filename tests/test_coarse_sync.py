"""Host syncs in the coarse system's training step (issue 17), counted with it3d.core.profiling.

The NeRF part (renderer, occupancy grid, hash grid, their backward) makes none; what remains in
the system step is listed here site by site, so a new sync anywhere fails this test."""
import os
from dataclasses import dataclass

import pytest
import torch

from conftest import registered
from it3d.core.base import BaseGuidance
from it3d.core.profiling import count_syncs
from it3d.runner.cli import build_components, prepare_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _SyncFreeGuide(BaseGuidance):
    """A guidance term that makes no sync itself: what is counted is the system's own."""

    @dataclass
    class Config:
        target: float = 0.5

    def forward(self, rgb, batch, step):  # extras as the SDS terms return them: a tensor and a Python number
        loss = ((rgb - self.cfg.target) ** 2).mean()
        return {"loss": loss, "loss_sds": loss.detach(), "min_step": 20}


@pytest.fixture(scope="module")
def system_and_dm(tmp_path_factory):
    with registered("guidance", "sync-free-guide", _SyncFreeGuide):
        out = tmp_path_factory.mktemp("coarse-sync")
        cfg, parsed = prepare_config([os.path.join(ROOT, "configs", "tiny", "coarse.yaml")], [
            f"data.image_path={ROOT}/load/synthetic/rgba.png", f"trial_dir={out}", "data.heights=[16]",
            "data.widths=[16]", "data.ref_prob=0.5", "system.ref_ray_batch=0",
            "system.renderer.grid.update_every=4", "system.material.shading_probs.lambertian=0.5",
            "system.renderer.sample_capacity_margin=1.5",  # the GPU's buffers (auto sizes exactly on CPU)
            "system.ref_bg_color=[1.0,1.0,1.0]",  # a colour from the config (null: the background component's)
            "+system.guidance={g: {type: sync-free-guide, weight: 1.0}}"])
        dm, system = build_components(cfg, parsed, str(out), resumed=False)
        yield system, dm


# what the system step still does, per step kind (site substring, op) -> count
REF_STEP = {}  # reference losses (depth-pearson by weights), cached background colour: none
NOVEL_STEP = {("diffuse_light.py", "item"): 1}  # sample_shading: float(torch.rand(())) on the host RNG (free on GPU)
GRID_UPDATE = {("sample_buffers.py", "tolist"): 1}  # the sample buffers' resize: one read of the measured peaks


def _sites(counter):
    out = {}
    for e in counter.events:
        if e.kind == "sync":
            key = (os.path.basename(e.where.split(":")[0]), e.op)
            out[key] = out.get(key, 0) + 1
    return out


def test_coarse_training_step_syncs_are_bounded_and_none_in_the_nerf(system_and_dm):
    system, dm = system_and_dm
    dm.prepare()
    logged = []
    system.log = lambda name, value, **k: logged.append((name, value))
    system.train()
    seen = {"ref": 0, "novel": 0, "update": 0}
    for step in range(12):
        batch = dm.train_batch(step)
        system.set_step(step)
        with count_syncs() as upd:
            system.do_update_step(0, step)
        with count_syncs() as c:
            loss = system.training_step(batch, 0)
            loss.backward()
        system.zero_grad()
        assert not any("renderers/" in e.where or "encodings/" in e.where or "geometry/" in e.where
                       for e in c.events), c.report()
        kind = "ref" if batch["use_ref"] else "novel"
        seen[kind] += 1
        assert _sites(c) == (REF_STEP if kind == "ref" else NOVEL_STEP), c.report()
        # the reference render's background colour: a list from the config, put on the device once
        assert c.uploads == (1 if kind == "ref" and seen["ref"] == 1 else 0), c.report()
        if step % 4 == 0 and step > 0:
            assert _sites(upd) == GRID_UPDATE, upd.report()
            seen["update"] += 1
        else:
            assert upd.count == 0, upd.report()
    assert seen["ref"] > 0 and seen["novel"] > 0 and seen["update"] == 2
    # every logged value is a tensor already (Lightning uploads Python numbers with torch.tensor(v, device=...))
    names = {n for n, _ in logged}
    assert {"train/g/loss_sds", "train/g/min_step", "train/depth-pearson", "train/loss"} <= names
    assert all(torch.is_tensor(v) for _, v in logged)
