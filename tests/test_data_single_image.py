"""single-image datamodule: framing, map discovery, cameras, step schedule and batch format."""
import numpy as np
import pytest
import torch
from PIL import Image

from it3d.core import registry
from it3d.core.errors import It3dError
from it3d.core import cameras
from it3d.testing.scene import make_scene, save_png16


def dm_for(path, **cfg):
    base = {"image_path": str(path), "heights": [32], "widths": [32], "resolution_milestones": []}
    base.update(cfg)
    return registry.get("datamodule", "single-image")(base, path="data")


def write_offcentre(tmp_path, with_depth=True):
    """A 120 x 200 RGBA photo with a 30 x 60 object at rows 10..39, cols 130..189 (+ a depth map beside it)."""
    h, w = 120, 200
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[10:40, 130:190] = (200, 50, 20, 255)
    Image.fromarray(rgba).save(tmp_path / "photo.png")
    if with_depth:
        dep = np.zeros((h, w), np.uint16)
        dep[10:40, 130:190] = np.linspace(1000, 60000, 60, dtype=np.uint16)[None, :]  # disparity grows with x
        save_png16(str(tmp_path / "photo_depth.png"), dep)
    return tmp_path / "photo.png"


def test_recentre_non_square_puts_bbox_centred_with_border(tmp_path):
    dm = dm_for(write_offcentre(tmp_path), border_ratio=0.2, heights=[100], widths=[100])
    ref = dm.reference
    m = ref["mask"][0, ..., 0] > 0.5
    ys, xs = torch.nonzero(m, as_tuple=True)
    # the long side (60 px) spans 1 - 0.2 = 80% of the 100 px square; the short one 40 px; both centred
    assert xs.max() - xs.min() + 1 == pytest.approx(80, abs=1)
    assert ys.max() - ys.min() + 1 == pytest.approx(40, abs=1)
    assert (xs.min() + xs.max() + 1) / 2 == pytest.approx(50, abs=1)
    assert (ys.min() + ys.max() + 1) / 2 == pytest.approx(50, abs=1)
    # colour composited on white outside, the object's colour inside
    assert torch.allclose(ref["rgb"][0, 0, 0], torch.ones(3))
    assert torch.allclose(ref["rgb"][0, 50, 50], torch.tensor([200, 50, 20]) / 255.0, atol=2e-2)
    # the depth map got the identical crop: disparity grew with x, so depth ("larger = farther") falls with x
    d = ref["depth"][0, 50]
    assert d[20] > d[50] > d[78] and d[5] == 0


def test_reference_camera_projects_scene_centre_to_image_centre(tmp_path):
    dm = dm_for(write_offcentre(tmp_path), heights=[48], widths=[64])
    ref = dm.reference
    assert ref["rays_o"].shape == (1, 48, 64, 3) and ref["rgb"].shape == (1, 48, 64, 3)
    xy, depth = cameras.project(torch.zeros(1, 3), ref["c2w"][0], float(ref["fovy"][0]), 48, 64)
    assert torch.allclose(xy[0], torch.tensor([32.0, 24.0]), atol=1e-4) and depth.item() == pytest.approx(1.0)
    assert torch.allclose(ref["c2w"][0, :3, 3], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)  # polar 90, azimuth 0, r 1
    assert float(ref["fovy"][0]) == 60.0


def test_realfusion_layout_maps_and_missing_map_error(tmp_path):
    make_scene(str(tmp_path), 48)  # rgba.png + depth.png + normal.png
    dm = dm_for(tmp_path / "rgba.png", require_normal=True)
    ref = dm.reference
    fg = ref["mask"][0, ..., 0] > 0.5
    assert "depth" in ref and "normal" in ref and ref["normal"].shape == (1, 32, 32, 3)
    # camera-space normals of the visible surface face the camera at +x: world x component > 0 on average
    assert ref["normal"][0][fg][:, 0].mean() > 0.5
    (tmp_path / "depth.png").unlink()
    with pytest.raises(It3dError, match="depth"):
        dm_for(tmp_path / "rgba.png", preprocess={"depth_type": "none", "normal_type": "none", "caption_type": "none", "mask_type": "none"}).prepare()


def test_train_batches_mix_schedule_and_orbit(tmp_path):
    dm = dm_for(write_offcentre(tmp_path, with_depth=False), require_depth=False, batch_size=2, ref_prob=0.25,
                resolution_milestones=[100], heights=[16, 32], widths=[16, 32], azimuth_warmup_steps=100,
                n_val_views=4)
    uses = [dm.train_batch(s)["use_ref"] for s in range(400)]
    assert 0.18 < np.mean(uses) < 0.32
    assert uses == [dm.train_batch(s)["use_ref"] for s in range(400)]  # seeded per step
    early = torch.cat([dm.train_batch(s)["random"]["azimuth"] for s in range(50)])
    late = torch.cat([dm.train_batch(s)["random"]["azimuth"] for s in range(100, 150)])
    assert early.abs().max() <= 45.0 and late.abs().max() > 90.0
    b = dm.train_batch(120)
    assert b["random"]["rays_d"].shape == (2, 32, 32, 3) and b["random"]["light_positions"].shape == (2, 3)
    assert b["ref"]["rgb"].shape == (1, 32, 32, 3) and dm.train_batch(5)["ref"]["height"] == 16
    r = b["random"]
    assert ((r["camera_distances"] >= 0.8) & (r["camera_distances"] <= 1.2)).all()
    assert ((r["fovy"] >= 40) & (r["fovy"] <= 80)).all()
    val = dm.val_dataloader()
    first = next(iter(val))
    assert first["index"] == 0 and torch.allclose(first["c2w"], dm.reference["c2w"], atol=1e-6)
    assert len(val) == 4


def test_ray_focal_comes_from_the_height_on_a_non_square_image():
    """48 x 64 (H x W): rays through the four corner pixels project back onto those pixels' centres, and the
    corner ray's camera-space direction is ((0.5 - W/2) / f, (H/2 - 0.5) / f, -1) with f = H / 2 / tan(fovy / 2)."""
    h, w, fovy = 48, 64, 50.0
    f = float(0.5 * h / np.tan(np.radians(fovy) / 2))
    d = cameras.ray_directions(h, w, fovy)
    assert torch.allclose(d[0, 0], torch.tensor([(0.5 - w / 2) / f, (h / 2 - 0.5) / f, -1.0]), atol=1e-6)
    c2w = cameras.spherical_c2w(20.0, 30.0, 1.5)
    rays_o, rays_d = cameras.get_rays(c2w, h, w, fovy)
    for i, j in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)):
        xy, depth = cameras.project((rays_o[i, j] + 1.1 * rays_d[i, j])[None], c2w, fovy, h, w)
        assert torch.allclose(xy[0], torch.tensor([j + 0.5, i + 0.5]), atol=1e-4), (i, j)
        assert float(depth[0]) > 0


def test_point_lights_stay_on_the_camera_side():
    """light = normalize(cam_dir + N(0, I)) * U(0.8, 1.5): it is on the camera's side (cos > 0) exactly when the
    noise along the camera direction exceeds -1, P = Phi(1) = 0.8413; never opposite on average."""
    import torch.nn.functional as F

    from it3d.data import random_views as rv

    gen = torch.Generator().manual_seed(0)
    cam = F.normalize(torch.randn(20000, 3, generator=gen), dim=-1) * 1.3
    lights = rv.light_positions(gen, cam, 1.0, [0.8, 1.5])
    cos = (F.normalize(lights, dim=-1) * F.normalize(cam, dim=-1)).sum(-1)
    assert float((cos > 0).float().mean()) == pytest.approx(0.8413, abs=0.01)
    assert ((lights.norm(dim=-1) >= 0.8 - 1e-5) & (lights.norm(dim=-1) <= 1.5 + 1e-5)).all()
    exact = rv.light_positions(gen, cam[:10], 0.0, [1.0, 1.0])
    assert torch.allclose(exact, F.normalize(cam[:10], dim=-1), atol=1e-6)
    # through the datamodule: each novel view's light sits on its camera's side
    sv = rv.sample_views(gen, 4000, 2, 2, [-10, 45], [-180, 180], [1.0, 1.5], [60, 60], 1.0, [0.8, 1.5])
    cos = (F.normalize(sv["light_positions"], dim=-1) * F.normalize(sv["c2w"][:, :3, 3], dim=-1)).sum(-1)
    assert float((cos > 0).float().mean()) == pytest.approx(0.8413, abs=0.02)
