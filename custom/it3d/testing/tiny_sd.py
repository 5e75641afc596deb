"""Tiny, randomly initialised diffusion / CLIP models saved in the real on-disk formats.

* ``sd``: a StableDiffusionPipeline folder (unet, vae, text_encoder, tokenizer, scheduler);
* ``clip``: a CLIPModel + CLIPProcessor folder (CLIPVisionModelWithProjection loads it too);
* ``zero123``: a diffusers-format Zero-1-to-3 folder (the kxic/zero123-xl-diffusers layout:
  unet (8 input channels), image_encoder, feature_extractor, vae, scheduler, cc_projection).

Everything is built offline with fixed seeds: the CLIP tokenizer's vocabulary (byte-level
BPE over the 256 byte symbols plus merges for a few words used in prompts) is written here.
The VAE keeps Stable Diffusion's 8x downsampling and 4 latent channels, so a 64x64 image
maps to 8x8 latents as it would with the real model.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

import torch

from ..core.io import write_text
from . import tiny_builder

SEED = 0
TEXT_DIM = 32  # CLIP text hidden size == UNet cross-attention dim for "sd"
PROJ_DIM = 16  # CLIP projection dim (image / text embeddings) for "clip" and "zero123"
WORDS = ("a", "photo", "of", "the", "sks", "rgb", "normal", "map", "depth", "mask", "front", "side", "back",
         "overhead", "view", "cat", "dog", "chair", "teddy", "bear", "toy", "blurry", "low", "quality")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# ----------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_files() -> Tuple[Dict[str, int], List[str]]:
    """(vocab, merges) of a CLIP byte-level BPE: byte symbols, their ``</w>`` forms, merges of WORDS, specials."""
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: List[str] = []
    seen = set(vocab_list)
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        cur = parts[0]
        for nxt in parts[1:]:
            merge = f"{cur} {nxt}"
            cur = cur + nxt
            if merge not in merges:
                merges.append(merge)
            if cur not in seen:
                seen.add(cur)
                vocab_list.append(cur)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def save_tokenizer(out_dir: str):
    """Write vocab.json / merges.txt, load them as a CLIPTokenizer and ``save_pretrained`` it to ``out_dir``."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files()
    src = os.path.join(out_dir, "_src")
    os.makedirs(src, exist_ok=True)
    write_text(os.path.join(src, "vocab.json"), json.dumps(vocab, ensure_ascii=False))
    write_text(os.path.join(src, "merges.txt"), "#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(os.path.join(src, "vocab.json"), os.path.join(src, "merges.txt"), model_max_length=77,
                        bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                        pad_token="<|endoftext|>")
    tok.save_pretrained(out_dir)
    for name in ("vocab.json", "merges.txt"):
        os.remove(os.path.join(src, name))
    os.rmdir(src)
    return tok


# ----------------------------------------------------------------------------- model configs
def text_config(vocab_size: int, hidden: int = TEXT_DIM, projection_dim: int = PROJ_DIM):
    from transformers import CLIPTextConfig

    vocab, _ = tokenizer_files()
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=projection_dim,
                          bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                          pad_token_id=vocab["<|endoftext|>"])


def vision_config(projection_dim: int = PROJ_DIM):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8, projection_dim=projection_dim)


def image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                              image_mean=CLIP_MEAN, image_std=CLIP_STD)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.18215)


def tiny_unet(in_channels: int, cross_attention_dim: int, linear_projection: bool):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=cross_attention_dim, attention_head_dim=(2, 4), norm_num_groups=16,
                                use_linear_projection=linear_projection)


def sd_scheduler():
    """DDIM with Stable Diffusion's training schedule."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


# ----------------------------------------------------------------------------- builders
@tiny_builder("sd")
def build_sd(out_dir: str) -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(SEED)
    tokenizer = save_tokenizer(os.path.join(out_dir, "tokenizer"))
    text_encoder = CLIPTextModel(text_config(len(tokenizer)))
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=tiny_unet(4, TEXT_DIM, linear_projection=True), scheduler=sd_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir)


@tiny_builder("clip")
def build_clip(out_dir: str) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    torch.manual_seed(SEED)
    tokenizer = save_tokenizer(out_dir)
    cfg = CLIPConfig(text_config=text_config(len(tokenizer)).to_dict(), vision_config=vision_config().to_dict(),
                     projection_dim=PROJ_DIM)
    CLIPModel(cfg).save_pretrained(out_dir)
    CLIPProcessor(image_processor=image_processor(), tokenizer=tokenizer).save_pretrained(out_dir)


@tiny_builder("zero123")
def build_zero123(out_dir: str) -> None:
    from transformers import CLIPVisionModelWithProjection

    from ..guidance.zero123 import CCProjection

    torch.manual_seed(SEED)
    parts = {
        "unet": tiny_unet(8, PROJ_DIM, linear_projection=False),
        "vae": tiny_vae(),
        "image_encoder": CLIPVisionModelWithProjection(vision_config()),
        "feature_extractor": image_processor(),
        "scheduler": sd_scheduler(),
        "cc_projection": CCProjection(in_channel=PROJ_DIM + 4, out_channel=PROJ_DIM),
    }
    for name, obj in parts.items():
        obj.save_pretrained(os.path.join(out_dir, name))
    import diffusers

    index = {
        "_class_name": "Zero1to3StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "cc_projection": ["it3d.guidance.zero123", "CCProjection"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    write_text(os.path.join(out_dir, "model_index.json"), json.dumps(index, indent=2))
