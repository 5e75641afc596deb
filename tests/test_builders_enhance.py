"""Novel-view clean-up of the builders: img2img enhancement with the tiny "sd" pipeline and the SAM
mask union with the tiny "sam" model (it3d.testing.tiny_model_dir)."""
from __future__ import annotations

import torch

from it3d.core import cameras
from it3d.builders.enhance import EnhanceConfig, Img2ImgEnhancer, SamMaskUnion, SamUnionConfig, mask_box
from it3d.testing import scene as sc
from it3d.testing import tiny_model_dir

from test_builders import SceneCoarse, build, make_reference


def _image(h=48, w=40):
    v = sc.render_view(cameras.spherical_c2w(10.0, 40.0, 1.5), 40.0, h, w)
    a = v["mask"]
    return (v["rgba"][..., :3] * a + 1 - a)[None], a[..., 0] > 0.5


def _enhancer(**kw):
    cfg = EnhanceConfig(enabled=True, pretrained_model_name_or_path=tiny_model_dir("sd"), resolution=64,
                        num_inference_steps=20, **kw)
    return Img2ImgEnhancer(cfg, "cpu")


def test_enhancer_strength_and_prompt():
    e = _enhancer(class_name="teddy bear")
    assert e.strength_for(0.0) == 0.15 and e.strength_for(45.0) == 0.15 and e.strength_for(46.0) == 0.05
    assert e.prompt == "sks rgb photo of teddy bear"
    e2 = _enhancer()
    e2.set_caption("a red mug")
    assert e2.prompt == "a red mug"
    assert _enhancer(prompt="p", class_name="x").prompt == "p"


def test_enhancer_changes_more_at_higher_strength():
    """Measured against the VAE round trip of the input (what strength -> 0 gives): 0.15 re-runs 3 of
    20 denoising steps from t ~ 150, 0.05 one step from t ~ 50, so it stays closer."""
    e = _enhancer(class_name="toy")
    img, _ = _image()
    pipe = e.pipe
    with torch.no_grad():
        x = torch.nn.functional.interpolate(img.permute(0, 3, 1, 2), size=(64, 64), mode="bilinear",
                                            antialias=True) * 2 - 1
        rt = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
        rt = torch.nn.functional.interpolate(((rt + 1) / 2).clamp(0, 1), size=img.shape[1:3], mode="bilinear",
                                             antialias=True).permute(0, 2, 3, 1)
    lo, hi = e.enhance(img, 0.05), e.enhance(img, 0.15)
    assert lo.shape == img.shape and hi.shape == img.shape
    assert float(lo.min()) >= 0 and float(hi.max()) <= 1
    d_lo, d_hi = float(((lo - rt) ** 2).mean()), float(((hi - rt) ** 2).mean())
    assert d_hi > 1.1 * d_lo > 0, (d_lo, d_hi)
    # same call, same seed -> same image
    assert torch.equal(e.enhance(img, 0.05), lo)


def test_sam_union_applies_only_at_or_above_threshold():
    img, mask = _image(64, 64)
    box = mask_box(mask)
    rows, cols = torch.nonzero(mask, as_tuple=True)
    assert box == (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
    path = tiny_model_dir("sam")
    union = SamMaskUnion(SamUnionConfig(enabled=True, pretrained_model_name_or_path=path, score_threshold=0.0), "cpu")
    masks, scores = union.segmenter.segment(img, boxes=torch.tensor([box]))
    best = int(scores.argmax())
    union.cfg.score_threshold = float(scores[best])  # exactly at the threshold: united
    out, applied, score = union(img, mask)
    assert applied and score == float(scores[best])
    assert torch.equal(out, mask | masks[best])
    assert int(out.sum()) > int(mask.sum())  # the random tiny SAM's mask adds pixels
    union.cfg.score_threshold = 1.1  # above any IoU prediction: unchanged
    out, applied, _ = union(img, mask)
    assert not applied and torch.equal(out, mask)


def test_builder_with_sam_and_enhance(monkeypatch):
    # SAM's predicted IoU of the random tiny model can be any real number: pin it to 0.5 so that the
    # thresholds 0 and 1 (the ends of the allowed range) always / never unite
    from it3d.core.segment import SamSegmenter

    segment = SamSegmenter.segment
    monkeypatch.setattr(SamSegmenter, "segment", lambda self, *a, **k: (lambda m, s: (m, torch.full_like(s, 0.5)))(
        *segment(self, *a, **k)))
    few = {"num_points": 4000, "isosurface_resolution": 40, "elevations": [0.0], "azimuths": [30.0, 180.0]}
    sam = {"enabled": True, "pretrained_model_name_or_path": tiny_model_dir("sam")}
    ref = make_reference()
    coarse = SceneCoarse()
    b_on, on = build("mesh-sampling", {**few, "sam": {**sam, "score_threshold": 0.0}}, coarse, ref)
    b_off, off = build("mesh-sampling", {**few, "sam": {**sam, "score_threshold": 1.0}}, coarse, ref)
    assert b_on.stats["sam_applied"] == [True, True] and b_off.stats["sam_applied"] == [False, False]
    assert torch.equal(on["is_ref"], off["is_ref"])  # the reference view never uses SAM
    # a united (larger) mask lets the novel views colour at least as many points
    assert int((on["view"] >= 0).sum()) >= int((off["view"] >= 0).sum())

    enh = {"enabled": True, "pretrained_model_name_or_path": tiny_model_dir("sd"), "resolution": 64,
           "num_inference_steps": 20, "class_name": "toy"}
    _, plain = build("depth-unprojection", {"elevations": [0.0], "azimuths": [30.0]}, coarse, ref)
    _, enhanced = build("depth-unprojection", {"elevations": [0.0], "azimuths": [30.0], "enhance": enh}, coarse, ref)
    assert torch.equal(plain["positions"], enhanced["positions"])  # geometry is the NeRF's either way
    r = plain["is_ref"]
    assert torch.equal(plain["colors"][r], enhanced["colors"][r])  # reference colours untouched
    assert not torch.allclose(plain["colors"][~r], enhanced["colors"][~r], atol=1e-3)  # novel ones enhanced
