"""Tiny SD / CLIP / Zero123 folders: offline tokenizer, real from_pretrained round trips, determinism."""
import json
import os

import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from it3d.core import hub
from it3d.guidance.zero123 import CLIPCameraProjection
from it3d.testing import tiny_model_dir, tiny_model_names
from it3d.testing.tiny_sd import PROJ_DIM, TEXT_DIM, build_clip


pytestmark = pytest.mark.usefixtures("one_thread")


def test_sd_pipeline_folder_round_trip():
    path = tiny_model_dir("sd")
    assert {"sd", "clip", "zero123"} <= set(tiny_model_names())
    pipe = StableDiffusionPipeline.from_pretrained(path)
    assert isinstance(StableDiffusionImg2ImgPipeline.from_pretrained(path).unet, UNet2DConditionModel)
    tok = hub.load(CLIPTokenizer, path, subfolder="tokenizer")
    enc = hub.load(CLIPTextModel, path, subfolder="text_encoder", dtype="auto", device="cpu")
    unet = hub.load(UNet2DConditionModel, path, subfolder="unet", dtype="auto", device="cpu")
    vae = hub.load(AutoencoderKL, path, subfolder="vae", dtype="auto", device="cpu")
    sched = hub.load(DDIMScheduler, path, subfolder="scheduler")

    words = tok.tokenize("a photo of sks rgb normal map depth mask")
    assert words == ["a</w>", "photo</w>", "of</w>", "sks</w>", "rgb</w>", "normal</w>", "map</w>", "depth</w>", "mask</w>"]
    ids = tok(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert tok.model_max_length == 77 and ids.shape == (1, 77)
    # SD2's OpenCLIP tokenizer pads with "!" (token 0) after the end token
    n = len(tok.tokenize("a photo of a cat"))
    assert ids[0, 0] == tok.convert_tokens_to_ids("<|startoftext|>") and ids[0, n + 1] == tok.eos_token_id
    assert tok.pad_token == "!" and ids[0, -1] == 0
    assert torch.equal(pipe.unet.conv_in.weight, unet.conv_in.weight)

    torch.testing.assert_close(sched.alphas_cumprod[[0, 999]], torch.tensor([1 - 0.00085, 0.0047]), atol=2e-4, rtol=0)
    with torch.no_grad():
        text = enc(ids)[0]
        z = vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mode()
        eps = unet(z, torch.tensor([10]), encoder_hidden_states=text).sample
        img = vae.decode(z).sample
    assert text.shape == (1, 77, TEXT_DIM) and z.shape == (1, 4, 8, 8) and eps.shape == z.shape and img.shape == (1, 3, 64, 64)
    assert torch.isfinite(eps).all()


def test_clip_folder_and_vision_with_projection(tmp_path):
    path = tiny_model_dir("clip")
    model = hub.load(CLIPModel, path)
    vision = hub.load(CLIPVisionModelWithProjection, path)
    proc = hub.load(CLIPProcessor, path)
    torch.testing.assert_close(vision.visual_projection.weight, model.visual_projection.weight)
    pix = proc(images=[torch.rand(3, 48, 40)], return_tensors="pt").pixel_values
    assert pix.shape == (1, 3, 32, 32)
    with torch.no_grad():
        emb = vision(pixel_values=pix).image_embeds
        ids = proc(text=["a photo of a dog"], return_tensors="pt").input_ids
        text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    assert emb.shape == (1, PROJ_DIM) and text.shape == (1, PROJ_DIM)

    build_clip(str(tmp_path))  # deterministic: a second build has the same weights
    again = CLIPModel.from_pretrained(str(tmp_path))
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_zero123_folder_round_trip():
    path = tiny_model_dir("zero123")
    index = json.load(open(os.path.join(path, "model_index.json")))
    for part in ("unet", "vae", "image_encoder", "feature_extractor", "scheduler", "clip_camera_projection"):
        assert part in index and os.path.isdir(os.path.join(path, part))
    unet = hub.load(UNet2DConditionModel, path, subfolder="unet", dtype="auto", device="cpu")
    cc = hub.load(CLIPCameraProjection, path, subfolder="clip_camera_projection", dtype="auto", device="cpu")
    enc = hub.load(CLIPVisionModelWithProjection, path, subfolder="image_encoder", dtype="auto", device="cpu")
    fe = hub.load(CLIPImageProcessor, path, subfolder="feature_extractor")
    assert unet.config.in_channels == 8 and unet.config.out_channels == 4
    assert cc.config.embedding_dim == PROJ_DIM == unet.config.cross_attention_dim and cc.config.additional_embeddings == 4
    with torch.no_grad():
        emb = enc(pixel_values=fe(images=[torch.rand(3, 64, 64)], return_tensors="pt").pixel_values).image_embeds
        cond = cc(torch.cat([emb, torch.zeros(1, 4)], -1))[:, None]
        eps = unet(torch.randn(1, 8, 8, 8), torch.tensor([500]), encoder_hidden_states=cond).sample
    assert eps.shape == (1, 4, 8, 8) and torch.isfinite(eps).all()
