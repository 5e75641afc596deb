"""GPU hygiene (issue 17), pinned on the CPU: every stage runs on the run's device, models are freed
between stages and once the refine point cloud is built, the img2img enhancer shares the guidance's
models, and intermediate stages of a staged method skip the test orbit and export by default."""
import gc
import os
import weakref
from dataclasses import dataclass

import pytest
import torch
from transformers import CLIPTextModel

from it3d.core import hub, registry
from it3d.core.base import BaseBuilder
from it3d.runner.cli import import_extensions, prepare_config
from it3d.testing import tiny_model_dir

from conftest import rgb_photo
from test_launch import EXT, ROOT

pytestmark = pytest.mark.usefixtures("one_thread")
STAGED = os.path.join(EXT, "toy-staged.yaml")


def _text_encoder(device="cpu"):
    return hub.load(CLIPTextModel, tiny_model_dir("sd"), subfolder="text_encoder", device=device)


# ----------------------------------------------------------------------------- freed between stages
def test_each_stage_starts_with_an_empty_model_cache_and_cuda_cache_emptied(tmp_path, monkeypatch):
    from it3d.runner import cli as run_module
    from it3d.runner import pipeline

    import_extensions([os.path.join(ROOT, "custom"), EXT])
    seen = []

    def fake_stage(scfg, sparsed, mode, dev, callbacks=None, **kw):  # a stage that loads a model and returns
        seen.append({"cached_at_start": hub.cached_models(), "model": weakref.ref(_text_encoder()),
                     "device": scfg.system.device})

    emptied = []
    monkeypatch.setattr(run_module, "run_stage", fake_stage)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(len(seen)))
    hub.clear_cache()
    _text_encoder()  # something left over from before the run
    dev = {"accelerator": "gpu", "devices": [0], "device": "cuda:0"}  # only the device string: nothing runs on it
    cfg, parsed = prepare_config([STAGED], [f"exp_root_dir={tmp_path}"], device="cuda:0")
    pipeline.run_pipeline(cfg, parsed, "train", dev)
    assert [s["device"] for s in seen] == ["cuda:0", "cuda:0"]
    # stage a found the leftover; stage b started after the free: nothing cached, stage a's model gone
    assert len(seen[0]["cached_at_start"]) == 1 and seen[0]["cached_at_start"][0].startswith("CLIPTextModel ")
    assert seen[1]["cached_at_start"] == []
    assert seen[0]["model"]() is None and seen[1]["model"]() is None
    assert hub.cached_models() == []
    assert emptied == [1, 2]  # torch.cuda.empty_cache after each stage, on a CUDA run


def test_free_memory_leaves_cuda_alone_on_a_cpu_run(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    ref = weakref.ref(_text_encoder())
    hub.free_memory("cpu")
    assert hub.cached_models() == []
    assert ref() is None and emptied == []


# ----------------------------------------------------------------------------- one copy of the DreamBooth model
def test_img2img_enhancer_shares_unet_vae_and_text_encoder_with_the_guidance(tmp_path):
    import shutil

    from it3d.builders.enhance import EnhanceConfig, Img2ImgEnhancer

    hub.clear_cache()
    sd = tiny_model_dir("sd")
    guide = registry.get("guidance", "stable-diffusion")({"pretrained_model_name_or_path": sd},
                                                         path="system.guidance.sd", device=torch.device("cpu"))
    pp = guide.prompt_processor
    pp_encoder = hub.load(CLIPTextModel, sd, subfolder="text_encoder", dtype=pp.dtype, device=pp.device)  # its load
    pipe = Img2ImgEnhancer(EnhanceConfig(enabled=True, pretrained_model_name_or_path=sd), "cpu").pipe
    assert pipe.unet is guide.models["unet"] and pipe.vae is guide.models["vae"]
    assert pipe.text_encoder is pp_encoder
    # another model: its own copies
    copy = shutil.copytree(sd, tmp_path / "sd-copy")
    other = Img2ImgEnhancer(EnhanceConfig(enabled=True, pretrained_model_name_or_path=str(copy)), "cpu")
    assert other.pipe.unet is not guide.models["unet"]
    hub.clear_cache()


REFS = {}


class _ModelBuilder(BaseBuilder):
    """Loads a model through the hub while building (as the SAM union and the enhancer do)."""

    needs_coarse = False

    @dataclass
    class Config:
        pass

    def build(self, coarse, reference):
        from test_refine_system import reference_surface

        self.model = _text_encoder()
        REFS["model"] = weakref.ref(self.model)
        pts, mask = reference_surface(reference)
        front = pts[mask]
        return {"positions": front, "colors": reference["rgb"][0][mask],
                "is_ref": torch.ones(len(front), dtype=torch.bool)}


def test_refine_drops_the_builders_models_once_the_cloud_is_built(tmp_path):
    from it3d.runner.cli import build_components
    from it3d.testing.scene import make_scene

    registry.register("test-model-builder", kind="builder")(_ModelBuilder)
    try:
        make_scene(str(tmp_path / "scene"), 32)
        cfg, parsed = prepare_config([os.path.join(ROOT, "configs", "tiny", "refine.yaml")], [
            f"data.image_path={tmp_path / 'scene' / 'rgba.png'}", "system.coarse_stage_dir=null",
            "system.builder_type=test-model-builder", "~system.builder", f"trial_dir={tmp_path / 'trial'}",
            f"system.guidance.sd.pretrained_model_name_or_path={tiny_model_dir('sd')}"], device="cpu")
        dm, system = build_components(cfg, parsed, str(tmp_path / "trial"), resumed=False)
        unet = weakref.ref(system.guidance["sd"].models["unet"])
        dm.prepare()
        system.build_point_cloud({**dm.reference, "caption": ""})
        gc.collect()
        assert system.geometry.num_points > 0
        assert hub.cached_models() == []
        assert REFS["model"]() is None  # the builder's model is gone ...
        assert unet() is system.guidance["sd"].models["unet"]  # ... the guidance keeps its own
    finally:
        registry.unregister("builder", "test-model-builder")


# ----------------------------------------------------------------------------- the run's device everywhere
@pytest.fixture
def device_spy(monkeypatch):
    """Records the device every preprocessing estimator is built for and every model is loaded on."""
    from it3d.preprocess import entry

    seen = {"estimators": {}, "loads": []}
    build, load = entry.build, hub.load

    def spy_build(kind, type_name, cfg=None, path="", **kw):
        seen["estimators"][path] = torch.device(kw["device"])
        return build(kind, type_name, cfg, path, **kw)

    def spy_load(cls, id_or_path, *a, device="cpu", **kw):
        if hub._accepts_dtype(cls):  # models (processors and tokenizers have no device)
            seen["loads"].append((cls.__name__, torch.device(device)))
        return load(cls, id_or_path, *a, device=device, **kw)

    monkeypatch.setattr(entry, "build", spy_build)
    monkeypatch.setattr(hub, "load", spy_load)
    hub.clear_cache()
    yield seen
    hub.clear_cache()


# "cpu:0" is a device of its own name: what reaches an estimator from the run, not the "cpu" default
RUN_DEVICE = "cpu:0"
ESTIMATORS = {"data.preprocess.mask", "data.preprocess.depth", "data.preprocess.normal", "data.preprocess.caption_model"}


def test_preprocess_stage_runs_every_estimator_on_the_runs_device(tmp_path, device_spy):
    from it3d.runner import pipeline

    photo = rgb_photo(tmp_path / "photo.png")
    cfg, parsed = prepare_config([os.path.join(ROOT, "configs", "tiny", "make-it-3d.yaml")], [
        f"data.image_path={photo}", f"exp_root_dir={tmp_path}", "data.preprocess.size=64",
        "data.preprocess.max_side=64"], device=RUN_DEVICE)
    pipeline.run_pipeline(cfg, parsed, "preprocess", {"accelerator": "cpu", "devices": 1, "device": RUN_DEVICE})
    assert set(device_spy["estimators"]) == ESTIMATORS
    assert set(device_spy["estimators"].values()) == {torch.device(RUN_DEVICE)}
    classes = {c for c, _ in device_spy["loads"]}
    assert {"SamModel", "BlipForConditionalGeneration"} <= classes and len(classes) >= 3  # SAM, depth, BLIP
    assert {d for _, d in device_spy["loads"]} == {torch.device(RUN_DEVICE)}


def test_single_stage_data_module_preprocesses_on_the_runs_device(tmp_path, device_spy):
    photo = rgb_photo(tmp_path / "photo.png")
    pre = "data.preprocess"
    cfg, parsed = prepare_config([os.path.join(ROOT, "configs", "tiny", "coarse.yaml")], [
        f"data.image_path={photo}", f"trial_dir={tmp_path / 'trial'}", f"{pre}.size=64", f"{pre}.max_side=64",
        f"{pre}.cache_dir={tmp_path / 'pre'}", f"+{pre}.mask={{pretrained_model_name_or_path: {tiny_model_dir('sam')}}}",
        f"+{pre}.depth={{pretrained_model_name_or_path: {tiny_model_dir('depth')}}}",
        f"+{pre}.caption_model={{pretrained_model_name_or_path: {tiny_model_dir('caption')}}}"], device=RUN_DEVICE)
    assert cfg.data.device == RUN_DEVICE and cfg.system.device == RUN_DEVICE
    from it3d.runner.cli import attach_prepared

    dm = registry.get("datamodule", parsed.data_type)(cfg.data, path="data")
    attach_prepared(dm, cfg, str(tmp_path / "trial"), reuse=False)  # the runner preprocesses, not the datamodule
    dm.prepare()
    assert set(device_spy["estimators"]) == ESTIMATORS
    assert set(device_spy["estimators"].values()) == {torch.device(RUN_DEVICE)}
    assert device_spy["loads"] and {d for _, d in device_spy["loads"]} == {torch.device(RUN_DEVICE)}


# ----------------------------------------------------------------------------- after_train per stage
@pytest.mark.parametrize("extra, expected", [
    ([], {"dreambooth": [], "coarse": [], "refine": ["test", "export"]}),
    (["stage.coarse.after_train=[export]"], {"dreambooth": [], "coarse": ["export"], "refine": ["test", "export"]}),
    (["after_train=[]"], {"dreambooth": [], "coarse": [], "refine": []}),
    (["after_train=[test]", "stage.dreambooth.after_train=[test]"],
     {"dreambooth": ["test"], "coarse": [], "refine": ["test"]}),
])
def test_only_the_final_stage_renders_and_exports_by_default(tmp_path, extra, expected):
    from it3d.runner.pipeline import prepare_stages

    cfg, _ = prepare_config([os.path.join(ROOT, "configs", "customize-it-3d.yaml")], [
        "data.image_path=load/synthetic/rgba.png", f"exp_root_dir={tmp_path}", *extra], device="cpu")
    got = {spec.name: list(parsed.after_train) for spec, _, parsed in prepare_stages(cfg, "cpu") if parsed}
    assert got == expected


# ----------------------------------------------------------------------------- normals only when needed
@pytest.fixture(scope="module")
def coarse_system(tmp_path_factory):
    from it3d.runner.cli import build_components

    out = tmp_path_factory.mktemp("normals")
    cfg, parsed = prepare_config([os.path.join(ROOT, "configs", "tiny", "coarse.yaml")], [
        f"trial_dir={out}", "data.heights=[12]", "data.widths=[12]", "system.ref_ray_batch=0",
        "system.loss.orient.weight=0.1"], device="cpu")  # built; the tests set its weight per step
    dm, system = build_components(cfg, parsed, str(out), resumed=False)
    dm.prepare()
    system.train()
    return system, dm


def _second_order(system, dm, monkeypatch, shading, **weights):
    """Render a training view with ``shading`` and back-propagate its colour; -> (the twice_differentiable
    flags the hash grid was called with, the per-sample normals, whether the geometry got a gradient)."""
    calls = []
    enc = system.geometry.encoding
    orig = type(enc).forward
    monkeypatch.setattr(type(enc), "forward", lambda self, x, twice=False: calls.append(twice) or orig(self, x, twice))
    system.loss_weights.update(weights)
    out = system.render(dm.train_batch(0)["random"], shading=shading)
    system.zero_grad()
    out["comp_rgb"].mean().backward()
    trained = any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in system.geometry.parameters())
    return calls, out["sample_normal"], trained


def test_no_second_order_graph_without_a_normal_loss(coarse_system, monkeypatch):
    system, dm = coarse_system
    weights = dict(system.loss_weights)
    try:
        calls, normals, trained = _second_order(system, dm, monkeypatch, "lambertian", orient=0.0)
        assert calls and not any(calls)  # the hash grid never asked for a twice-differentiable graph
        assert normals.grad_fn is None and not normals.requires_grad  # constants of the step
        assert trained  # the density still learns through the rendering weights
        calls, normals, _ = _second_order(system, dm, monkeypatch, "lambertian", orient=0.1)  # a normal loss is on
        assert any(calls) and normals.requires_grad
        system.cfg.shading_normal_grad = True  # asked for: the shading trains the orientation too
        calls, normals, _ = _second_order(system, dm, monkeypatch, "lambertian", orient=0.0)
        assert any(calls) and normals.requires_grad
    finally:
        system.cfg.shading_normal_grad = False
        system.loss_weights.update(weights)


def test_finite_difference_normals_need_no_second_order_graph(coarse_system, monkeypatch):
    system, dm = coarse_system
    geo = system.geometry
    weights = dict(system.loss_weights)
    try:
        geo.normal_type = "finite_difference"
        calls, normals, _ = _second_order(system, dm, monkeypatch, "lambertian", orient=0.1)
        assert calls and not any(calls) and normals.requires_grad  # first-order graph through 6 shifted evaluations
        calls, normals, _ = _second_order(system, dm, monkeypatch, "lambertian", orient=0.0)
        assert not normals.requires_grad
        # the two kinds agree on the direction of the normals (a smooth blob field)
        pts = torch.rand(64, 3) * 0.4 - 0.2
        fd = geo(pts, output_normal=True, normal_grad=False)["normal"]
        geo.normal_type = "analytic"
        an = geo(pts, output_normal=True, normal_grad=False)["normal"]
        assert (fd * an).sum(-1).min() > 0.99
    finally:
        geo.normal_type = "analytic"
        system.loss_weights.update(weights)


# ----------------------------------------------------------------------------- the refine U-Net's precision
def test_deferred_unet_runs_in_the_runs_half_dtype_with_fp32_weights():
    from it3d.renderers.point_deferred import PointDeferredRenderer

    class _Geo:
        class cfg:
            descriptor_dim = 4

    x = torch.rand(1, 12, 20, 18)
    r = PointDeferredRenderer({"unet_channels": [4, 8], "num_scales": 3, "rgb_skip": False}, geometry=_Geo())
    seen = []
    r.unet.inp.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    plain = r.run_unet(x)  # auto on a CPU run (precision auto = fp32): as before, no autocast
    assert seen[-1] == torch.float32 and torch.equal(plain, r.unet(x)) and plain.abs().mean() > 1e-3
    hub.set_precision("bf16")
    try:
        half = r.run_unet(x)  # the run's half dtype (bf16 here; fp16 on CUDA by default)
    finally:
        hub.set_precision("auto")
    assert seen[-1] == torch.bfloat16 and half.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in r.unet.parameters())
    torch.testing.assert_close(half, plain, rtol=0.05, atol=0.02)
    r.cfg.channels_last = True  # the layout used off the CPU: the same numbers
    torch.testing.assert_close(r.run_unet(x), plain, rtol=1e-5, atol=1e-6)
    assert r.unet.out.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(Exception, match="unet_precision"):
        PointDeferredRenderer({"unet_precision": "int8"}, geometry=_Geo())


# ----------------------------------------------------------------------------- larger eval chunks off the CPU
def test_eval_chunks_are_larger_on_an_accelerator_and_chunking_does_not_change_the_render(coarse_system):
    from it3d.core.config import ConfigError

    system, _ = coarse_system
    ren = system.renderer
    assert ren.cfg.eval_chunk_size == "auto"
    assert ren.eval_chunk_size(torch.device("cpu")) == 4096 and ren.eval_chunk_size(torch.device("cuda:0")) == 32768
    c2w = torch.eye(4)
    c2w[2, 3] = 1.2
    whole = system.render_view(c2w, 40.0, 24, 20)
    ren.cfg.eval_chunk_size = 37  # many chunks, the last one partial
    try:
        chunked = system.render_view(c2w, 40.0, 24, 20)
    finally:
        ren.cfg.eval_chunk_size = "auto"
    for k in ("comp_rgb", "opacity", "depth", "comp_normal"):
        torch.testing.assert_close(chunked[k], whole[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="eval_chunk_size"):
        registry.get("renderer", "volume")({"eval_chunk_size": -1}, geometry=system.geometry,
                                           material=system.material, background=system.background)
