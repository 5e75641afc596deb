"""The builders on the real coarse stage: a ``coarse`` system (configs/tiny/coarse.yaml at 32 px on the
synthetic scene's reference image, untrained: its density blob is the object) saved as a stage dir and loaded back with
``it3d.systems.load_stage``, so ``render_view`` (volume renderer), ``geometry.isosurface``
(marching cubes) and the datamodule's ``reference`` are the real ones."""
from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

from it3d.core import registry
from it3d.core.config import load_config
from it3d.core import cameras

from test_builders import hits_per_view_ok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    from it3d.systems.loading import load_stage
    from it3d.testing.scene import make_scene

    image = make_scene(str(tmp_path_factory.mktemp("scene")), 64)["rgba"]
    cfg = load_config(os.path.join(ROOT, "configs", "tiny", "coarse.yaml"), cli_args=[
        f"data.image_path={image}", f"data.heights=[{SIZE}]",
        f"data.widths=[{SIZE}]", "system.geometry.isosurface_resolution=32"])
    torch.manual_seed(0)
    system = registry.get("system", "coarse")(cfg.system, path="system", build_guidance=False)
    d = tmp_path_factory.mktemp("coarse_stage")
    os.makedirs(d / "configs")
    os.makedirs(d / "ckpts")
    OmegaConf.save(cfg, str(d / "configs" / "parsed.yaml"))
    torch.save({"state_dict": system.state_dict(), "global_step": 0}, str(d / "ckpts" / "last.ckpt"))
    coarse, dm = load_stage(str(d), "cpu")
    return CachedRenders(coarse), dm.reference


class CachedRenders:
    """The loaded system with its (deterministic, eval-mode) renders memoised: each camera of these
    tests is rendered once however many builds ask for it (the volume renderer costs seconds on CPU)."""

    def __init__(self, system):
        self.system, self.geometry, self.cache = system, system.geometry, {}

    def render_view(self, c2w, fovy_deg, height, width, **kw):
        key = (c2w.cpu().numpy().round(6).tobytes(), round(float(fovy_deg), 6), height, width,
               tuple(sorted((k, str(v.tolist() if torch.is_tensor(v) else v)) for k, v in kw.items())))
        if key not in self.cache:
            self.cache[key] = self.system.render_view(c2w, fovy_deg, height, width, **kw)
        return self.cache[key]


FEW = {"elevations": [0.0], "azimuths": [120.0, 240.0]}


def test_depth_unprojection_on_coarse(stage):
    coarse, ref = stage
    b = registry.get("builder", "depth-unprojection")(FEW, path="system.builder", device="cpu")
    out = b.build(coarse, ref)
    pos, col, is_ref = out["positions"], out["colors"], out["is_ref"]
    c2w, fovy = ref["c2w"][0], float(ref["fovy"][0])
    r = coarse.system.render_view(c2w, fovy, SIZE, SIZE)  # the contract's default white background
    sel = (ref["mask"][0, ..., 0] > 0.5) & (r["opacity"][0, ..., 0] > 0.5)
    assert int(is_ref.sum()) == int(sel.sum()) > 0
    uv, z = cameras.project(pos[is_ref], c2w, fovy, SIZE, SIZE)
    i, j = torch.floor(uv[:, 1]).long(), torch.floor(uv[:, 0]).long()
    assert torch.equal(col[is_ref], ref["rgb"][0][i, j])  # exact reference colours
    # the unprojected z-depth is the renderer's own z_depth / opacity (ray distance -> camera axis)
    zr = (r["z_depth"][0, ..., 0] / r["opacity"][0, ..., 0])[i, j]
    assert torch.allclose(z, zr, rtol=1e-4, atol=1e-5)
    assert int((~is_ref).sum()) > 0 and sum(b.stats["n_novel_per_view"]) == int((~is_ref).sum())
    hits_per_view_ok(b, out, coarse, ref, every=1)
    capped = registry.get("builder", "depth-unprojection")({**FEW, "max_points": int(is_ref.sum()) + 10},
                                                           path="system.builder").build(coarse, ref)
    assert capped["positions"].shape[0] == int(is_ref.sum()) + 10 and int(capped["is_ref"].sum()) == int(is_ref.sum())


def test_mesh_sampling_on_coarse(stage):
    coarse, ref = stage
    b = registry.get("builder", "mesh-sampling")({**FEW, "num_points": 3000, "isosurface_resolution": 32},
                                                 path="system.builder", device="cpu")
    out = b.build(coarse, ref)
    pos, col, is_ref, vid = out["positions"], out["colors"], out["is_ref"], out["view"]
    assert pos.shape == (3000, 3) and b.stats["mesh_faces"] > 0
    radius = coarse.geometry.cfg.radius
    assert float(pos.abs().max()) <= radius + 1e-4  # on the marching-cubes mesh inside the field's bound
    c2w, fovy = ref["c2w"][0], float(ref["fovy"][0])
    uv, _ = cameras.project(pos[is_ref], c2w, fovy, SIZE, SIZE)
    i, j = torch.floor(uv[:, 1]).long(), torch.floor(uv[:, 0]).long()
    assert int(is_ref.sum()) > 0 and torch.equal(col[is_ref], ref["rgb"][0][i, j])
    assert bool((ref["mask"][0, ..., 0][i, j] > 0.5).all())
    # every point got a colour: reference, a build view, or its nearest coloured neighbour
    assert bool(((vid >= -2) & (vid < 2)).all()) and b.stats["n_filled"] == int((vid == -2).sum())
    assert float(col.min()) >= 0 and float(col.max()) <= 1
