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
from it3d.run import import_extensions, prepare_config
from it3d.testing import tiny_model_dir

from test_launch import EXT, ROOT

pytestmark = pytest.mark.usefixtures("one_thread")
STAGED = os.path.join(EXT, "toy-staged.yaml")


def _text_encoder(device="cpu"):
    return hub.load(CLIPTextModel, tiny_model_dir("sd"), subfolder="text_encoder", device=device)


# ----------------------------------------------------------------------------- freed between stages
def test_each_stage_starts_with_an_empty_model_cache_and_cuda_cache_emptied(tmp_path, monkeypatch):
    from it3d import run as run_module
    from it3d.systems import pipeline

    import_extensions([os.path.join(ROOT, "custom"), EXT])
    seen = []

    def fake_stage(scfg, sparsed, mode, dev, callbacks=None, **kw):  # a stage that loads a model and returns
        seen.append({"cached_at_start": hub.cached_count(), "model": weakref.ref(_text_encoder()),
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
    assert seen[0]["cached_at_start"] == 1 and seen[1]["cached_at_start"] == 0
    assert seen[0]["model"]() is None and seen[1]["model"]() is None
    assert hub.cached_count() == 0
    assert emptied == [1, 2]  # torch.cuda.empty_cache after each stage, on a CUDA run


def test_free_memory_leaves_cuda_alone_on_a_cpu_run(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    ref = weakref.ref(_text_encoder())
    hub.free_memory("cpu")
    assert ref() is None and hub.cached_count() == 0 and emptied == []


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
    from it3d.run import build_components
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
        assert REFS["model"]() is None and hub.cached_count() == 0  # the builder's model is gone ...
        assert unet() is system.guidance["sd"].models["unet"]  # ... the guidance keeps its own
    finally:
        registry.unregister("builder", "test-model-builder")
