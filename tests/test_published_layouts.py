"""Each fixture reproduces its published hub repo's layout, and loads through the code path the configs use.

The layout facts (and their public sources) are listed in it3d/testing/tiny_sd.py and tiny_vision.py.
Also: a Zero-1-to-3 folder in the published ``clip_camera_projection`` layout converted *by hand* here
(plain file edits, not our builders) from the ``cc_projection`` fixture drives the zero123 guidance
and gives the same prediction as the original.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

import it3d  # noqa: F401  (registers every component)
from it3d.core import hub, registry
from it3d.core.config import ConfigError
from it3d.guidance.zero123 import CCProjection, CLIPCameraProjection
from it3d.testing import tiny_model_dir

from conftest import hand_converted_zero123

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _json(*parts):
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return json.load(f)


def _keys(path):
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            return {k: f.get_slice(k).get_dtype() for k in f.keys()}
    return {k: str(v.dtype) for k, v in torch.load(path, weights_only=True).items()}


# ----------------------------------------------------------------------------- layouts
def test_sd2_base_layout():
    d = tiny_model_dir("sd")
    index = _json(d, "model_index.json")
    assert {k: v for k, v in index.items() if not k.startswith("_")} == {
        "feature_extractor": ["transformers", "CLIPImageProcessor"], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    assert index["_class_name"] == "StableDiffusionPipeline"
    sched = _json(d, "scheduler", "scheduler_config.json")
    assert sched["_class_name"] == "PNDMScheduler" and sched["skip_prk_steps"] is True
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"], sched["steps_offset"],
            sched["prediction_type"], sched["clip_sample"]) == (0.00085, 0.012, "scaled_linear", 1, "epsilon", False)
    assert sorted(os.listdir(os.path.join(d, "tokenizer"))) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert _json(d, "tokenizer", "special_tokens_map.json")["pad_token"] == "!"
    assert _json(d, "feature_extractor", "preprocessor_config.json")["crop_size"] == {"height": 224, "width": 224}
    te = _json(d, "text_encoder", "config.json")
    assert te["architectures"] == ["CLIPTextModel"] and te["hidden_act"] == "gelu"
    unet = _json(d, "unet", "config.json")
    assert unet["_class_name"] == "UNet2DConditionModel" and unet["use_linear_projection"] is True
    keys = _keys(os.path.join(d, "unet", "diffusion_pytorch_model.safetensors"))
    assert "down_blocks.0.attentions.0.proj_in.weight" in keys and "conv_in.weight" in keys
    assert "text_model.embeddings.token_embedding.weight" in _keys(os.path.join(d, "text_encoder", "model.safetensors"))
    assert "encoder.conv_in.weight" in _keys(os.path.join(d, "vae", "diffusion_pytorch_model.safetensors"))


def test_zero123_layouts():
    benny = tiny_model_dir("zero123")
    index = _json(benny, "model_index.json")
    assert index["_class_name"] == "Zero123Pipeline"
    assert index["clip_camera_projection"] == ["zero123", "CLIPCameraProjection"] and "cc_projection" not in index
    assert index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    cfg = _json(benny, "clip_camera_projection", "config.json")
    assert cfg["_class_name"] == "CLIPCameraProjection" and cfg["additional_embeddings"] == 4
    weights = _keys(os.path.join(benny, "clip_camera_projection", "diffusion_pytorch_model.safetensors"))
    assert weights == {"proj.weight": "F16", "proj.bias": "F16"}  # fp16, as the published 1.19 MB file
    assert _json(benny, "unet", "config.json")["in_channels"] == 8

    kxic = tiny_model_dir("zero123-cc")
    index = _json(kxic, "model_index.json")
    assert index["_class_name"] == "Zero1to3StableDiffusionPipeline"
    assert index["cc_projection"] == ["pipeline_zero1to3", "CCProjection"] and "clip_camera_projection" not in index
    cfg = _json(kxic, "cc_projection", "config.json")
    assert set(cfg) == {"_class_name", "_diffusers_version"} and cfg["_class_name"] == "CCProjection"
    assert set(_keys(os.path.join(kxic, "cc_projection", "diffusion_pytorch_model.bin"))) == {
        "projection.weight", "projection.bias"}


@pytest.mark.parametrize("name, files, processor_type", [
    ("clip", {"config.json", "model.safetensors", "preprocessor_config.json", "merges.txt", "vocab.json",
              "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json"}, "CLIPImageProcessor"),
    ("sam", {"config.json", "model.safetensors", "preprocessor_config.json"}, "SamImageProcessor"),
    ("depth", {"config.json", "model.safetensors", "preprocessor_config.json"}, "DPTImageProcessor"),
    ("caption", {"config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
                 "vocab.txt", "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json"},
     "BlipImageProcessor"),
])
def test_transformers_layouts(name, files, processor_type):
    d = tiny_model_dir(name)
    assert set(os.listdir(d)) == files
    assert _json(d, "preprocessor_config.json")["image_processor_type"] == processor_type


# ----------------------------------------------------------------------------- loaded by the configs' code
def test_every_fixture_loads_through_the_config_code_path(tmp_path):
    """Build each component as the configs do (registry + config dict) and run it once."""
    emb = {"cache_dir": str(tmp_path / "emb")}
    sd = registry.get("guidance", "stable-diffusion")(
        {"pretrained_model_name_or_path": tiny_model_dir("sd"), "resolution": 64, "prompt_processor": emb},
        path="system.guidance.sd", device=CPU)
    assert sd.prediction_type == "epsilon"
    sd.set_prompt("a photo of a cat")
    batch = {"elevation": torch.zeros(1), "azimuth": torch.zeros(1), "camera_distances": torch.ones(1)}
    out = sd(torch.rand(1, 32, 32, 3), batch, 0)
    assert torch.isfinite(out["loss"])

    clipd = registry.get("guidance", "clip-d")(
        {"pretrained_model_name_or_path": tiny_model_dir("sd"), "clip_model_name_or_path": tiny_model_dir("clip"),
         "resolution": 64, "prompt_processor": emb}, path="system.guidance.clip_d", device=CPU)
    clipd.set_prompt("a photo of a cat")
    clipd.set_reference({"rgb": torch.rand(1, 32, 32, 3), "azimuth": torch.zeros(1)})
    assert clipd.ref_embeds.shape == (1, 16)

    for name, cls in (("zero123", CLIPCameraProjection), ("zero123-cc", CCProjection)):
        z = registry.get("guidance", "zero123")({"pretrained_model_name_or_path": tiny_model_dir(name), "resolution": 64},
                                                path="system.guidance.zero123", device=CPU)
        assert type(z.models["camera_projection"]) is cls
        z.set_reference({"rgb": torch.rand(1, 32, 32, 3)})
        assert torch.isfinite(z(torch.rand(1, 32, 32, 3), {"azimuth": torch.tensor([90.0])}, 0)["loss"])

    from it3d.builders.enhance import EnhanceConfig, Img2ImgEnhancer, SamMaskUnion, SamUnionConfig

    enh = Img2ImgEnhancer(EnhanceConfig(enabled=True, pretrained_model_name_or_path=tiny_model_dir("sd"),
                                        resolution=64, num_inference_steps=2, prompt="a cat"))
    assert enh(torch.rand(1, 32, 32, 3), 0.0).shape == (1, 32, 32, 3)
    union = SamMaskUnion(SamUnionConfig(enabled=True, pretrained_model_name_or_path=tiny_model_dir("sam"),
                                        score_threshold=0.0))
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[8:24, 8:24] = True
    assert union(torch.rand(1, 32, 32, 3), mask)[0].shape == (32, 32)

    from it3d.core.base import build

    img = torch.rand(1, 28, 28, 3)
    depth = build("estimator", "transformers-depth", {"pretrained_model_name_or_path": tiny_model_dir("depth")},
                  "data.preprocess.depth", device=CPU, dtype="auto")
    assert depth(img).shape == (1, 28, 28, 1)
    cap = build("estimator", "blip-caption", {"pretrained_model_name_or_path": tiny_model_dir("caption")},
                "data.preprocess.caption_model", device=CPU, dtype="auto")
    assert isinstance(cap(torch.rand(1, 32, 32, 3)), str)


def test_hand_converted_clip_camera_projection_folder(tmp_path):
    """The kxic (cc_projection) fixture, re-laid out by hand as bennyguo's clip_camera_projection folder:
    loads as CLIPCameraProjection and predicts what the original predicts. (The bf16 Customize-It-3D
    end-to-end test runs its coarse stage with this folder.)"""
    src = tiny_model_dir("zero123-cc")
    dst = hand_converted_zero123(str(tmp_path / "zero123-by-hand"))
    preds = {}
    for name, path in (("cc", src), ("hand", dst)):
        z = registry.get("guidance", "zero123")({"pretrained_model_name_or_path": path, "resolution": 64, "seed": 0},
                                                path="system.guidance.zero123", device=CPU)
        z.set_reference({"rgb": torch.linspace(0, 1, 32 * 32 * 3).reshape(1, 32, 32, 3)})
        x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        preds[name] = (type(z.models["camera_projection"]),
                       z.predict_noise(x_t, torch.tensor([400]), {"azimuth": torch.tensor([60.0])}))
    assert preds["hand"][0] is CLIPCameraProjection and preds["cc"][0] is CCProjection
    # fp16 rounding of the projection weights is the only difference
    torch.testing.assert_close(preds["hand"][1], preds["cc"][1], rtol=0, atol=2e-3)


def test_folder_without_a_projection_entry_is_refused(tmp_path):
    dst = tmp_path / "z"
    shutil.copytree(tiny_model_dir("zero123"), dst)
    index = json.loads((dst / "model_index.json").read_text())
    del index["clip_camera_projection"]
    (dst / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(Exception, match="names no camera projection"):
        registry.get("guidance", "zero123")({"pretrained_model_name_or_path": str(dst)},
                                            path="system.guidance.zero123", device=CPU)


# ----------------------------------------------------------------------------- VAE scaling and prediction type
def test_encode_images_is_the_scaled_vae_mean_and_round_trips():
    from diffusers import AutoencoderKL

    g = registry.get("guidance", "stable-diffusion")(
        {"pretrained_model_name_or_path": tiny_model_dir("sd"), "resolution": 64, "dtype": "fp32"},
        path="system.guidance.sd", device=CPU)
    vae = AutoencoderKL.from_pretrained(tiny_model_dir("sd"), subfolder="vae").eval()
    x = torch.rand(1, 64, 64, 3)
    with torch.no_grad():
        want = vae.encode(x.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        z = g.vae_encode(g.resize(x), mode=True)
        decoded = g.vae_decode(z)
        direct = (vae.decode(want / vae.config.scaling_factor).sample * 0.5 + 0.5).clamp(0, 1)
    assert vae.config.scaling_factor == 0.18215
    torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(decoded, direct, rtol=1e-5, atol=1e-6)
    # the SDS path encodes the render to exactly that (the posterior mean, no sampling noise)
    torch.testing.assert_close(g.encode_images(x, {}), want, rtol=1e-5, atol=1e-6)


def test_v_prediction_model_is_converted_to_noise(tmp_path):
    """SDS on a v-prediction model: eps = sqrt(abar) v + sqrt(1 - abar) x_t, by hand."""
    dst = tmp_path / "sd-v"
    shutil.copytree(tiny_model_dir("sd"), dst)
    cfg = json.loads((dst / "scheduler" / "scheduler_config.json").read_text())
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "prediction_type": "v_prediction"}))
    g = registry.get("guidance", "stable-diffusion")(
        {"pretrained_model_name_or_path": str(dst), "resolution": 64, "guidance_scale": 1.0,
         "prompt_processor": {"cache_dir": ""}}, path="system.guidance.sd", device=CPU)
    assert g.prediction_type == "v_prediction"
    g.set_prompt("a cat")
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([600])
    batch = {"elevation": torch.zeros(1), "azimuth": torch.zeros(1)}
    cond, _ = g.prompt_processor.get_text_embeddings(torch.zeros(1), torch.zeros(1))
    with torch.no_grad():
        v = g.models["unet"](x_t, t, encoder_hidden_states=cond).sample
    a = g.alphas_cumprod[600]
    torch.testing.assert_close(g.predict_noise(x_t, t, batch), a.sqrt() * v + (1 - a).sqrt() * x_t,
                               rtol=1e-4, atol=1e-5)

    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "prediction_type": "sample"}))
    hub.clear_cache()
    with pytest.raises(ConfigError, match="predicts 'sample'"):
        registry.get("guidance", "stable-diffusion")({"pretrained_model_name_or_path": str(dst)},
                                                     path="system.guidance.sd", device=CPU)


def test_camera_maths_keeps_the_batch_device():
    """Numbers mixed with device tensors stay on that device (the meta device stands in for CUDA: a CPU tensor
    broadcast against it fails as against a CUDA one) -- Zero123's angle scale crashed on CUDA this way."""
    from it3d.core import cameras

    elev, azim = torch.zeros(3, device="meta"), torch.tensor([0.0, 90.0, 180.0], device="meta")
    assert cameras.camera_position(elev, azim, 1.0).device.type == "meta"
    assert cameras.angle_from_view(elev, azim, 0.0, 0.0).device.type == "meta"
    assert cameras.relative_camera(0.0, 0.0, 1.0, elev, azim, torch.ones(3, device="meta")).device.type == "meta"
    torch.testing.assert_close(cameras.angle_from_view(torch.zeros(3), torch.tensor([0.0, 90.0, 180.0])),
                               torch.tensor([0.0, 90.0, 180.0]), atol=1e-3, rtol=0)
