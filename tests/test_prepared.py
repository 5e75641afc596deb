"""Preprocessing happens once, as a typed record (issue 12): the preprocess stage (or the runner, before a
single-stage run) makes a ``PreparedImage``; datamodules load it and never preprocess."""
import dataclasses
import os

import numpy as np
import pytest
import torch
from PIL import Image

from it3d.core import registry
from it3d.core.errors import It3dError
from it3d.core.layout import StageDir
from it3d.core.prepared import ImageInputs, PreparedImage, needs_preprocessing, sources
from it3d.runner.cli import attach_prepared, prepare_config
from it3d.testing import tiny_model_dir
from it3d.testing.scene import make_scene

from conftest import rgb_photo
from test_launch import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = os.path.join(ROOT, "configs", "tiny")


@pytest.fixture
def count_preprocessing(monkeypatch):
    """Counts real preprocessing runs (the estimators' entry point), wherever they are called from."""
    from it3d.preprocess import entry

    calls = []
    real = entry.ensure_preprocessed

    def spy(image_path, cfg=None, device="cpu"):
        calls.append(image_path)
        return real(image_path, cfg, device)

    monkeypatch.setattr(entry, "ensure_preprocessed", spy)
    return calls


# ----------------------------------------------------------------------------- the rule
def test_given_files_win_and_the_record_fills_what_they_lack(tmp_path):
    make_scene(str(tmp_path), 32)  # rgba.png + depth.png + normal.png (RealFusion15 layout)
    rec = PreparedImage(source=str(tmp_path / "rgba.png"), rgba=str(tmp_path / "rgba.png"), size=32,
                        border_ratio=0.2, depth=str(tmp_path / "depth.png"), caption="a made caption")
    given = ImageInputs(str(tmp_path / "rgba.png"), require_normal=True, caption="")
    assert needs_preprocessing(given) == ["caption"]
    s = sources(given, rec)
    assert (s.image, s.prepared, s.caption) == (str(tmp_path / "rgba.png"), False, "a made caption")
    assert s.maps == {"depth": str(tmp_path / "depth.png"), "normal": str(tmp_path / "normal.png")}
    assert sources(dataclasses.replace(given, caption="by hand"), rec).caption == "by hand"
    # no alpha and no mask: only the record's framed RGBA can be used, with the maps aligned to it
    Image.open(tmp_path / "rgba.png").convert("RGB").save(tmp_path / "photo.png")
    rgb = ImageInputs(str(tmp_path / "photo.png"), require_depth=True, caption="x")
    assert needs_preprocessing(rgb) == ["mask", "depth"]
    s = sources(rgb, rec)
    assert (s.image, s.prepared, s.maps, s.conventions["depth"]) == (rec.rgba, True, {"depth": rec.depth}, "disparity")
    with pytest.raises(It3dError, match=r"no mask for .*photo.png: set data.mask_path .* preprocess it first"):
        sources(rgb, None)
    with pytest.raises(It3dError, match="no normal map for .*preprocessing could not make one"):
        sources(dataclasses.replace(rgb, require_normal=True), rec)


def test_record_round_trips_and_refuses_a_broken_one(tmp_path):
    make_scene(str(tmp_path), 16)
    rec = PreparedImage(source="/p.png", rgba=str(tmp_path / "rgba.png"), size=16, border_ratio=0.1,
                        depth=str(tmp_path / "depth.png"), caption="c", normal_convention="opencv")
    path = rec.save(str(tmp_path / "prepared.json"))
    assert PreparedImage.load(path) == rec
    (tmp_path / "depth.png").unlink()
    with pytest.raises(It3dError, match=r"data.prepared: .*names depth .*which is gone"):
        PreparedImage.load(path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(It3dError, match="not a readable preprocessing record"):
        PreparedImage.load(str(tmp_path / "bad.json"))


# ----------------------------------------------------------------------------- a staged run
def test_staged_run_preprocesses_once_and_every_stage_loads_the_record(tmp_path, monkeypatch, count_preprocessing):
    """tiny make-it-3d on an RGB photo: the preprocess stage is the only one that runs estimators; coarse and
    refine get data.prepared and their datamodules frame the record's RGBA (the photo has no alpha)."""
    from it3d.runner import cli, pipeline

    photo = rgb_photo(tmp_path / "photo.png")
    seen = {}

    def fake_stage(scfg, sparsed, mode, dev, callbacks=None, **kw):  # build the stage's datamodule as the runner does
        dm = registry.get("datamodule", sparsed.data_type)(scfg.data, path="data")
        cli.attach_prepared(dm, scfg, str(scfg.trial_dir), reuse=False)
        dm.prepare()
        seen[os.path.basename(str(scfg.trial_dir))] = (str(scfg.data.prepared), dm.caption, dm.reference_at(32, 32))

    monkeypatch.setattr(cli, "run_stage", fake_stage)
    cfg, parsed = prepare_config([os.path.join(TINY, "make-it-3d.yaml")], [
        f"data.image_path={photo}", f"trial_dir={tmp_path / 'trial'}", "data.preprocess.size=64",
        "data.preprocess.max_side=64", f"data.preprocess.cache_dir={tmp_path / 'pre'}"])
    pipeline.run_pipeline(cfg, parsed, "train", {"accelerator": "cpu", "devices": 1, "device": "cpu"})
    assert count_preprocessing == [photo]  # once, in the preprocess stage
    record_path = StageDir(str(tmp_path / "trial" / "preprocess")).prepared
    rec = PreparedImage.load(record_path)
    assert rec.caption and rec.depth and rec.rgba.startswith(str(tmp_path / "pre"))
    assert set(seen) == {"coarse", "refine"}
    rgba = torch.from_numpy(np.asarray(Image.open(rec.rgba)).astype(np.float32) / 255.0)
    for name, (prepared, caption, ref) in seen.items():
        assert prepared == record_path and caption == rec.caption, name
        # the reference mask is the record's alpha (the photo itself has none), framed and resized to 32 px
        alpha = torch.nn.functional.interpolate(rgba[None, None, ..., 3], size=(32, 32), mode="area")[0, 0]
        assert (ref["mask"][0, ..., 0] > 0.5).float().sub((alpha > 0.5).float()).abs().mean() < 0.03, name


def test_single_stage_run_preprocesses_once_then_reuses_its_record(tmp_path, count_preprocessing):
    photo = rgb_photo(tmp_path / "photo.png")
    pre = "data.preprocess"
    cfg, parsed = prepare_config([os.path.join(TINY, "coarse.yaml")], [
        f"data.image_path={photo}", f"trial_dir={tmp_path / 'trial'}", f"{pre}.size=64", f"{pre}.max_side=64",
        f"{pre}.cache_dir={tmp_path / 'pre'}", f"+{pre}.mask={{pretrained_model_name_or_path: {tiny_model_dir('sam')}}}",
        f"+{pre}.depth={{pretrained_model_name_or_path: {tiny_model_dir('depth')}}}",
        f"+{pre}.caption_model={{pretrained_model_name_or_path: {tiny_model_dir('caption')}}}"])
    trial = str(tmp_path / "trial")
    dm = registry.get("datamodule", parsed.data_type)(cfg.data, path="data")
    with pytest.raises(It3dError, match="no mask for"):  # the datamodule alone never preprocesses
        dm.prepare()
    attach_prepared(dm, cfg, trial, reuse=False)
    dm.prepare()
    assert count_preprocessing == [photo] and os.path.isfile(StageDir(trial).prepared)
    again = registry.get("datamodule", parsed.data_type)(cfg.data, path="data")
    attach_prepared(again, cfg, trial, reuse=True)  # --export / a resumed run: the record, not preprocessing
    again.prepare()
    assert count_preprocessing == [photo] and again.prepared_image == dm.prepared_image
    assert torch.equal(again.reference["rgb"], dm.reference["rgb"]) and again.caption == dm.caption
