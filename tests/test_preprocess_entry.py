"""ensure_preprocessed on RealFusion15 photos with the tiny models: files, framing, cache hits,
hand-given inputs, cache_dir for read-only inputs, the CLI and launch's --preprocess entry."""
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from it3d.core.image import read_image
from it3d.preprocess import entry
from it3d.preprocess.__main__ import main as cli_main
from it3d.preprocess.caption import BlipCaptionEstimator
from it3d.preprocess.depth import TransformersDepthEstimator
from it3d.preprocess.mask import SamMaskEstimator
from it3d.testing import tiny_model_dir

from it3d.testing import realfusion15_dir

RF15 = realfusion15_dir()
needs_rf15 = pytest.mark.skipif(not os.path.isdir(RF15), reason=f"RealFusion15 inputs not found at {RF15} (set IT3D_REALFUSION15)")
SIZE, BORDER = 64, 0.2


def tiny_cfg(**kw):
    cfg = {"size": SIZE, "border_ratio": BORDER, "max_side": 256,
           "mask": {"pretrained_model_name_or_path": tiny_model_dir("sam")},
           "depth": {"pretrained_model_name_or_path": tiny_model_dir("depth")},
           "caption_model": {"pretrained_model_name_or_path": tiny_model_dir("caption"), "max_new_tokens": 4,
                             "num_beams": 1}}
    cfg.update(kw)
    return cfg


@pytest.fixture
def calls(monkeypatch):
    """Counts the estimator model runs."""
    counts = {"mask": 0, "depth": 0, "caption": 0}
    classes = (("mask", SamMaskEstimator), ("depth", TransformersDepthEstimator), ("caption", BlipCaptionEstimator))
    for name, cls in classes:
        orig = cls.__call__

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            counts[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(cls, "__call__", wrapped)
    return counts


def check_framed(rgba_path, size=SIZE, border=BORDER):
    im = Image.open(rgba_path)
    assert im.mode == "RGBA" and im.size == (size, size)
    alpha = np.asarray(im)[..., 3] > 127
    ys, xs = np.nonzero(alpha)
    h, w = ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()
    assert abs(max(h, w) - (1 - border) * size) <= 2  # the object spans 1 - border of the side
    assert abs((ys.min() + ys.max() + 1) / 2 - size / 2) <= 1.5 and abs((xs.min() + xs.max() + 1) / 2 - size / 2) <= 1.5


@needs_rf15
def test_realfusion_photo_preprocessed_then_cached(tmp_path, calls):
    img = tmp_path / "teddy.png"
    Image.open(f"{RF15}/teddy_bear/image.png").convert("RGB").resize((160, 160)).save(img)  # no alpha
    out = entry.ensure_preprocessed(str(img), tiny_cfg(), "cpu")
    assert calls == {"mask": 1, "depth": 1, "caption": 1}
    assert all((out.rgba, out.mask, out.depth, out.normal, out.caption))  # the typed record: every output made
    assert (out.size, out.border_ratio, out.source) == (SIZE, 0.2, str(img))
    for key, name in (("rgba", "teddy_rgba.png"), ("depth", "teddy_depth.png"), ("normal", "teddy_normal.png")):
        assert getattr(out, key) == str(tmp_path / name)
    check_framed(out.rgba)
    depth = Image.open(out.depth)
    assert depth.size == (SIZE, SIZE) and np.asarray(depth).dtype == np.uint16
    normal = read_image(out.normal) * 2 - 1
    a = read_image(out.rgba)[..., 3] > 0.5
    assert normal.shape == (SIZE, SIZE, 3)
    assert np.allclose(np.linalg.norm(normal[a], axis=-1), 1.0, atol=0.02)  # unit normals on the object
    assert isinstance(out.caption, str) and out.caption
    assert (tmp_path / "teddy_caption.txt").read_text().strip() == out.caption

    stamps = {p: os.path.getmtime(p) for p in tmp_path.iterdir()}
    t0 = time.perf_counter()
    again = entry.ensure_preprocessed(str(img), tiny_cfg(), "cpu")
    assert time.perf_counter() - t0 < 2.0
    assert again == out and calls == {"mask": 1, "depth": 1, "caption": 1}  # cache hit: no model ran
    assert {p: os.path.getmtime(p) for p in tmp_path.iterdir()} == stamps

    # a changed setting remakes what depends on it, and only that
    entry.ensure_preprocessed(str(img), tiny_cfg(depth={"pretrained_model_name_or_path": tiny_model_dir("depth"),
                                                        "output": "depth"}), "cpu")
    assert calls == {"mask": 1, "depth": 2, "caption": 1}


@needs_rf15
def test_full_size_photo_framed_without_full_resolution_copies(tmp_path, calls):
    src = f"{RF15}/blue_bird/rgba.png"  # 4844 x 3234
    rgba_big = tmp_path / "bird.png"
    shutil.copy(src, rgba_big)
    cfg = tiny_cfg(depth_type="none", normal_type="none", caption_type="none")
    out = entry.ensure_preprocessed(str(rgba_big), cfg, "cpu")
    assert calls["mask"] == 0 and (out.mask, out.depth, out.normal, out.caption) == (None, None, None, "")  # the photo's alpha is the mask
    check_framed(out.rgba)
    # same framing as the datamodule would make from the full-resolution photo
    full = np.asarray(Image.open(src))[..., 3] > 127
    ys, xs = np.nonzero(full)
    aspect = (ys.max() + 1 - ys.min()) / (xs.max() + 1 - xs.min())
    ours = np.asarray(Image.open(out.rgba))[..., 3] > 127
    ys2, xs2 = np.nonzero(ours)
    assert abs((ys2.max() + 1 - ys2.min()) / (xs2.max() + 1 - xs2.min()) - aspect) < 0.08

    rgb = tmp_path / "bird_rgb.png"  # the photo without alpha: SAM runs on a max_side copy
    Image.open(src).convert("RGB").resize((1211, 808)).save(rgb)
    out = entry.ensure_preprocessed(str(rgb), cfg, "cpu")
    assert calls["mask"] == 1
    assert Image.open(out.mask).size == (256, 171)  # max_side 256, aspect kept
    assert Image.open(out.rgba).size == (SIZE, SIZE)


def test_hand_given_maps_win(tmp_path, calls):
    h, w = 60, 90
    photo = np.full((h, w, 3), 200, np.uint8)
    photo[15:45, 30:60] = (30, 90, 160)
    Image.fromarray(photo).save(tmp_path / "obj.png")
    mask = np.zeros((h, w), np.uint8)
    mask[15:45, 30:60] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    disp = np.tile(np.linspace(0, 255, w, dtype=np.float32), (h, 1)).astype(np.uint8)  # nearer to the right
    Image.fromarray(disp).save(tmp_path / "d.png")
    Image.fromarray(np.full((SIZE, SIZE, 3), (128, 128, 255), np.uint8)).save(tmp_path / "obj_normal.png")
    cfg = tiny_cfg(mask_path=str(tmp_path / "m.png"), depth_path=str(tmp_path / "d.png"), caption="a blue box",
                   normal_type="none")
    out = entry.ensure_preprocessed(str(tmp_path / "obj.png"), cfg, "cpu")
    assert calls == {"mask": 0, "depth": 0, "caption": 0}
    assert out.caption == "a blue box" and out.normal == str(tmp_path / "obj_normal.png")
    assert np.allclose(read_image(out.normal), np.asarray([128, 128, 255]) / 255.0)  # untouched
    check_framed(out.rgba)
    rgba = read_image(out.rgba)
    assert np.allclose(rgba[32, 32, :3], np.array([30, 90, 160]) / 255.0, atol=0.02)
    d = read_image(out.depth)[..., 0]  # disparity convention: the given map, framed
    row = d[SIZE // 2][rgba[SIZE // 2, :, 3] > 0.99]
    assert np.all(np.diff(row) > 0)  # still nearer to the right
    # a file placed by hand in the cache beats the estimator
    (tmp_path / "obj2_caption.txt").write_text("a hand written caption\n")
    shutil.copy(tmp_path / "obj.png", tmp_path / "obj2.png")
    out2 = entry.ensure_preprocessed(str(tmp_path / "obj2.png"), tiny_cfg(mask_path=str(tmp_path / "m.png"),
                                                                         depth_type="none", normal_type="none"), "cpu")
    assert out2.caption == "a hand written caption" and calls["caption"] == 0


def test_cache_dir_for_read_only_inputs_and_cli(tmp_path, calls, capsys):
    src = tmp_path / "in"
    src.mkdir()
    photo = np.zeros((40, 40, 4), np.uint8)
    photo[10:30, 12:28] = (250, 40, 40, 255)
    Image.fromarray(photo).save(src / "p.png")
    os.chmod(src, 0o555)
    try:
        with pytest.raises(entry.It3dError, match="cache_dir"):
            entry.ensure_preprocessed(str(src / "p.png"), tiny_cfg(depth_type="none", normal_type="none",
                                                                   caption_type="none"), "cpu")
        cache = tmp_path / "cache"
        rc = cli_main([str(src / "p.png"), "--cache-dir", str(cache), "--size", str(SIZE), "--no-caption",
                       "--depth-model", tiny_model_dir("depth"), "--mask-model", tiny_model_dir("sam")])
        assert rc == 0
        printed = capsys.readouterr().out
        assert f"rgba: {cache / 'p_rgba.png'}" in printed and f"normal: {cache / 'p_normal.png'}" in printed
        assert sorted(os.listdir(src)) == ["p.png"]
        assert calls == {"mask": 0, "depth": 1, "caption": 0}
    finally:
        os.chmod(src, 0o755)


def test_preprocess_from_config_uses_data_section(tmp_path, calls):
    from omegaconf import OmegaConf

    photo = np.zeros((40, 40, 4), np.uint8)
    photo[5:35, 10:30] = (20, 200, 20, 255)
    Image.fromarray(photo).save(tmp_path / "g.png")
    pre = tiny_cfg(normal_type="none")
    del pre["border_ratio"]  # comes from data.border_ratio
    cfg = OmegaConf.create({"data": {"image_path": str(tmp_path / "g.png"), "prompt": "a green block",
                                     "border_ratio": 0.1, "device": "cpu", "preprocess": pre}})
    out = entry.preprocess_from_config(cfg)
    assert out.caption == "a green block" and calls["caption"] == 0
    check_framed(out.rgba, border=0.1)
    with pytest.raises(entry.It3dError, match="data.image_path"):
        entry.preprocess_from_config(OmegaConf.create({"data": {}}))


def test_unknown_preprocess_key_names_its_path(tmp_path):
    from it3d.core.config import ConfigError

    with pytest.raises(ConfigError, match="data.preprocess.depth.outptu"):
        entry.ensure_preprocessed(str(tmp_path / "x.png"), {"depth": {"outptu": "depth"}}, "cpu")
