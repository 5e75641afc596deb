"""Randomly initialised diffusion / CLIP models in their *published* on-disk layouts.

Each builder writes the folder layout of the hub repo the configs name -- subfolders,
``model_index.json`` entries, class and config key names, weight key names and files, scheduler
class, tokenizer files -- so the code that loads them is the code that loads the real model.
``size="tiny"`` (tests) shrinks widths and depths; ``size="full"`` uses the published
architecture (GPU check and benchmarks: same speed and memory as the real weights).

* ``sd`` -- stabilityai/stable-diffusion-2-base (also the img2img default):
  ``model_index.json`` = StableDiffusionPipeline with ``feature_extractor: [transformers,
  CLIPImageProcessor]``, ``safety_checker: [null, null]``, ``requires_safety_checker: false``,
  ``scheduler: [diffusers, PNDMScheduler]`` (huggingface.co/stabilityai/stable-diffusion-2-base
  model_index.json, as mirrored by sd-research/stable-diffusion-2-base); scheduler_config =
  PNDMScheduler, scaled_linear 0.00085-0.012, 1000 steps, ``skip_prk_steps: true``,
  ``steps_offset: 1``, ``set_alpha_to_one: false``, ``clip_sample: false``, ``prediction_type:
  epsilon`` (.../scheduler/scheduler_config.json of the SD2(.1)-base repos); text_encoder =
  CLIPTextModel 1024 wide, 23 layers, 16 heads, 4096 MLP, ``hidden_act: gelu``, projection 512,
  bos 0 / eos 2 / pad 1, vocab 49408 (.../text_encoder/config.json); tokenizer = CLIPTokenizer with
  ``pad_token: "!"`` (OpenCLIP pads with token 0); unet = UNet2DConditionModel 320-640-1280-1280,
  ``attention_head_dim: [5, 10, 20, 20]``, ``cross_attention_dim: 1024``,
  ``use_linear_projection: true``, ``sample_size: 64`` (.../unet/config.json; the SD2 values as the
  HF configs list them); vae = AutoencoderKL 128-256-512-512, 4 latent channels, scaling 0.18215.
* ``clip`` / ``clip-b16`` -- openai/clip-vit-large-patch14 / openai/clip-vit-base-patch16 (CLIP-D's
  scorer, Make-It-3D's ``clip.load("ViT-B/16")``): one CLIPModel folder (config.json, weights,
  preprocessor_config.json, tokenizer files); ViT-L/14 vision 1024 wide x 24 layers, patch 14 at
  224 px, text 768 x 12, projection 768, ``hidden_act: quick_gelu``.
* ``zero123`` -- bennyguo/zero123-xl-diffusers (= ashawkey/zero123-xl-diffusers, what threestudio
  and DreamGaussian load): ``model_index.json`` ``_class_name: Zero123Pipeline`` with
  ``"clip_camera_projection": ["zero123", "CLIPCameraProjection"]`` (the entry quoted by the error in
  camenduru/dreamgaussian-colab#3), ``image_encoder: [transformers, CLIPVisionModelWithProjection]``,
  ``feature_extractor: [transformers, CLIPImageProcessor]``, ``scheduler: [diffusers, DDIMScheduler]``,
  unet, vae; ``clip_camera_projection/config.json`` = ``{"_class_name": "CLIPCameraProjection",
  "additional_embeddings": 4, "embedding_dim": 768}`` with ``diffusion_pytorch_model.safetensors``
  holding ``proj.weight`` / ``proj.bias`` in fp16 (1.19 MB on huggingface.co/ashawkey/
  zero123-xl-diffusers/tree/main/clip_camera_projection; class in threestudio extern/zero123.py);
  the UNet is SD 1.x-shaped (cross-attention 768, ``attention_head_dim: 8``, no linear projection)
  with 8 input channels (noisy latent + reference latent), at 256 px (``sample_size: 32``).
* ``zero123-cc`` -- kxic/zero123-xl (diffusers community ``pipeline_zero1to3.py``):
  ``_class_name: Zero1to3StableDiffusionPipeline``, ``"cc_projection": ["pipeline_zero1to3",
  "CCProjection"]``, ``cc_projection/config.json`` = ``{"_class_name": "CCProjection",
  "_diffusers_version": "0.18.2"}`` (no sizes: the class does not register them) and
  ``diffusion_pytorch_model.bin`` with ``projection.weight`` / ``projection.bias``
  (huggingface.co/kxic/zero123-165000 model_index.json and cc_projection/config.json).

Everything is built offline with fixed seeds: the CLIP tokenizer's vocabulary (byte-level BPE
over the 256 byte symbols plus merges for a few words used in prompts) is written here.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

import torch

from ..core.io import write_text
from . import tiny_builder

SEED = 0
TEXT_DIM = 32  # tiny CLIP text hidden size == tiny SD UNet cross-attention dim
PROJ_DIM = 16  # tiny CLIP projection dim (image / text embeddings) for "clip" and "zero123"
WORDS = ("a", "photo", "of", "the", "sks", "rgb", "normal", "map", "depth", "mask", "front", "side", "back",
         "overhead", "view", "cat", "dog", "chair", "teddy", "bear", "toy", "blurry", "low", "quality")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SIZES = ("tiny", "full")


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")


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


def save_tokenizer(out_dir: str, pad_token: str = "<|endoftext|>", tokenizer_json: bool = True):
    """Write a CLIP tokenizer's published file set to ``out_dir``: vocab.json, merges.txt,
    special_tokens_map.json, tokenizer_config.json (the transformers-4 format the hub repos hold) and,
    with ``tokenizer_json``, tokenizer.json (openai/clip-vit-large-patch14 has it; SD2-base's
    tokenizer/ folder does not). Returns the tokenizer loaded back from those files."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files()
    os.makedirs(out_dir, exist_ok=True)
    write_text(os.path.join(out_dir, "vocab.json"), json.dumps(vocab, ensure_ascii=False))
    write_text(os.path.join(out_dir, "merges.txt"), "#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
               "unk_token": "<|endoftext|>"}
    write_text(os.path.join(out_dir, "special_tokens_map.json"), json.dumps(special, indent=2))
    write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(
        {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
         "tokenizer_class": "CLIPTokenizer", **special}, indent=2))
    tok = CLIPTokenizer.from_pretrained(out_dir)
    if tokenizer_json:
        tok.backend_tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    return tok


def legacy_preprocessor(out_dir: str) -> None:
    """transformers 5 saves a processor as processor_config.json ({"image_processor": {...}}); the hub
    repos hold the image processor's preprocessor_config.json (with "processor_class"): write that."""
    path = os.path.join(out_dir, "processor_config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    flat = dict(cfg.pop("image_processor", {}))
    flat.update({k: v for k, v in cfg.items() if k != "processor_class"})
    flat["image_processor_type"] = flat.get("image_processor_type", "").replace("Pil", "")
    if "processor_class" in cfg:
        flat["processor_class"] = cfg["processor_class"]
    write_text(os.path.join(out_dir, "preprocessor_config.json"), json.dumps(flat, indent=2, sort_keys=True))
    os.remove(path)


def prefix_weights(path: str, prefix: str) -> None:
    """transformers 5 saves CLIPTextModel's weights as ``embeddings.*`` / ``encoder.*``; the hub files (saved
    by transformers 4) name them ``text_model.embeddings.*``: write those names (transformers 5 maps them)."""
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    save_file({k if k.startswith(prefix) else prefix + k: v for k, v in state.items()}, path, metadata={"format": "pt"})


def fix_image_processor_type(out_dir: str) -> None:
    """Without torchvision transformers saves ``<Name>Pil`` as the image processor type; the hub has ``<Name>``."""
    path = os.path.join(out_dir, "preprocessor_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["image_processor_type"] = cfg.get("image_processor_type", "").replace("Pil", "")
    write_text(path, json.dumps(cfg, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------- model configs
def text_config(vocab_size: int, size: str = "tiny", hidden: int = TEXT_DIM, projection_dim: int = PROJ_DIM,
                sd2: bool = False):
    """CLIP text tower: tiny, SD2-base's OpenCLIP ViT-H text encoder (``sd2``) or ViT-L/14's."""
    from transformers import CLIPTextConfig

    vocab, _ = tokenizer_files()
    if size == "full":
        dims = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                    projection_dim=512, hidden_act="gelu", vocab_size=49408, bos_token_id=0, eos_token_id=2,
                    pad_token_id=1) if sd2 else \
            dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 projection_dim=768, hidden_act="quick_gelu", vocab_size=49408, bos_token_id=49406,
                 eos_token_id=49407, pad_token_id=1)
        return CLIPTextConfig(max_position_embeddings=77, layer_norm_eps=1e-5, **dims)
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=projection_dim,
                          hidden_act="gelu" if sd2 else "quick_gelu", bos_token_id=vocab["<|startoftext|>"],
                          eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])


def vision_config(size: str = "tiny", projection_dim: int = PROJ_DIM):
    """CLIP ViT-L/14 vision tower (openai/clip-vit-large-patch14; Zero123-XL's image_encoder) or a tiny one."""
    from transformers import CLIPVisionConfig

    if size == "full":
        return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8, projection_dim=projection_dim)


def image_processor(size: str = "tiny"):
    from transformers import CLIPImageProcessor

    px = 224 if size == "full" else 32
    return CLIPImageProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px},
                              image_mean=CLIP_MEAN, image_std=CLIP_STD)


def tiny_vae(size: str = "tiny"):
    """SD's AutoencoderKL (8x downsampling, 4 latent channels, scaling 0.18215); narrow when tiny."""
    from diffusers import AutoencoderKL

    wide = size == "full"
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         block_out_channels=(128, 256, 512, 512) if wide else (8, 8, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=2 if wide else 1, norm_num_groups=32 if wide else 8,
                         sample_size=512 if wide else 64, scaling_factor=0.18215)


def tiny_unet(in_channels: int, cross_attention_dim: int, linear_projection: bool, size: str = "tiny",
              head_dim=None, sample_size: int = 64):
    """UNet2DConditionModel: SD's 320-640-1280-1280 layout when full, two narrow blocks when tiny."""
    from diffusers import UNet2DConditionModel

    if size == "full":
        return UNet2DConditionModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=cross_attention_dim, attention_head_dim=head_dim, norm_num_groups=32, norm_eps=1e-5,
            use_linear_projection=linear_projection)
    return UNet2DConditionModel(sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=cross_attention_dim, attention_head_dim=(2, 4), norm_num_groups=16,
                                use_linear_projection=linear_projection)


def sd_scheduler_kwargs() -> dict:
    """Stable Diffusion's training noise schedule (the SD2-base scheduler_config.json values)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                trained_betas=None)


def sd_scheduler():
    """DDIM with Stable Diffusion's training schedule (the Zero123 repos' scheduler class)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**sd_scheduler_kwargs())


def _half(module: torch.nn.Module, size: str) -> torch.nn.Module:
    """Full-size random weights are saved in fp16 (half the disk; loaded in the run's precision)."""
    return module.to(torch.float16) if size == "full" else module


def _device(size: str) -> torch.device:
    """Build full-size models on the GPU when there is one (random init of ~1B parameters on a CPU is slow)."""
    return torch.device("cuda" if size == "full" and torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- builders
def build_sd(out_dir: str, size: str = "tiny") -> None:
    """stabilityai/stable-diffusion-2-base layout (see the module docstring for each fact's source)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    _check_size(size)
    torch.manual_seed(SEED)
    tokenizer = save_tokenizer(os.path.join(out_dir, "tokenizer"), pad_token="!", tokenizer_json=False)
    with _device(size):
        text_encoder = CLIPTextModel(text_config(len(tokenizer), size, sd2=True))
        unet = tiny_unet(4, 1024 if size == "full" else TEXT_DIM, linear_projection=True, size=size,
                         head_dim=(5, 10, 20, 20), sample_size=64)
        vae = tiny_vae(size)
    sched_kw = {k: v for k, v in sd_scheduler_kwargs().items() if k != "clip_sample"}  # PNDM has no clip_sample
    pipe = StableDiffusionPipeline(vae=_half(vae, size), text_encoder=_half(text_encoder, size), tokenizer=tokenizer,
                                   unet=_half(unet, size), scheduler=PNDMScheduler(skip_prk_steps=True, **sched_kw),
                                   safety_checker=None, feature_extractor=image_processor("full"),
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    save_tokenizer(os.path.join(out_dir, "tokenizer"), pad_token="!", tokenizer_json=False)  # the pipeline re-saved it
    if os.path.isfile(os.path.join(out_dir, "tokenizer", "tokenizer.json")):
        os.remove(os.path.join(out_dir, "tokenizer", "tokenizer.json"))
    _publish_index(out_dir, {"feature_extractor": ["transformers", "CLIPImageProcessor"]}, drop=("image_encoder",))
    fix_image_processor_type(os.path.join(out_dir, "feature_extractor"))
    prefix_weights(os.path.join(out_dir, "text_encoder", "model.safetensors"), "text_model.")
    # the published scheduler_config.json also lists "clip_sample": false (ignored by PNDM, read by DDIM/DDPM)
    cfg_path = os.path.join(out_dir, "scheduler", "scheduler_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        sched_cfg = json.load(f)
    write_text(cfg_path, json.dumps({**sched_cfg, "clip_sample": False}, indent=2, sort_keys=True))


def build_clip(out_dir: str, size: str = "tiny", variant: str = "L/14") -> None:
    """openai/clip-vit-large-patch14 (``variant="L/14"``) or openai/clip-vit-base-patch16 (``"B/16"``: vision
    768 wide x 12 layers, patch 16; text 512 x 12, 8 heads; projection 512) layout: one CLIPModel folder
    with its processor and tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

    _check_size(size)
    torch.manual_seed(SEED)
    tokenizer = save_tokenizer(out_dir)
    if size == "full" and variant == "B/16":
        proj = 512
        text = CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                              projection_dim=512, hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77,
                              bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
        vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                  image_size=224, patch_size=16, projection_dim=512, hidden_act="quick_gelu")
    else:
        proj = 768 if size == "full" else PROJ_DIM
        text, vision = text_config(len(tokenizer), size), vision_config(size)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=proj)
    with _device(size):
        model = CLIPModel(cfg)
    _half(model, size).save_pretrained(out_dir)
    CLIPProcessor(image_processor=image_processor(size), tokenizer=tokenizer).save_pretrained(out_dir)
    legacy_preprocessor(out_dir)
    save_tokenizer(out_dir)  # the processor's save wrote the transformers-5 tokenizer files: back to the hub's set


def _build_zero123_parts(out_dir: str, size: str) -> int:
    """The parts both Zero123 conversions share; returns the projection width (CLIP embedding dim)."""
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(SEED)
    emb = 768 if size == "full" else PROJ_DIM
    with _device(size):
        parts = {
            "unet": _half(tiny_unet(8, emb, linear_projection=False, size=size, head_dim=8, sample_size=32), size),
            "vae": _half(tiny_vae(size), size),
            "image_encoder": _half(CLIPVisionModelWithProjection(vision_config(size)), size),
        }
    parts.update(feature_extractor=image_processor(size), scheduler=sd_scheduler())
    for name, obj in parts.items():
        obj.save_pretrained(os.path.join(out_dir, name))
    fix_image_processor_type(os.path.join(out_dir, "feature_extractor"))
    return emb


def _publish_index(out_dir: str, entries: Dict[str, list], drop=()) -> None:
    """Rewrite model_index.json entries the way the hub repo lists them (diffusers here writes
    ``CLIPImageProcessorPil`` without torchvision, and newer optional components as [null, null])."""
    path = os.path.join(out_dir, "model_index.json")
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    index.update(entries)
    for k in drop:
        index.pop(k, None)
    write_text(path, json.dumps(index, indent=2, sort_keys=True))


def _zero123_index(class_name: str, projection_entry: Dict[str, list]) -> dict:
    import diffusers

    return {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **projection_entry,
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
            "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}


def build_zero123(out_dir: str, size: str = "tiny") -> None:
    """bennyguo/zero123-xl-diffusers layout (``clip_camera_projection``, ``proj.*`` in fp16 safetensors)."""
    from ..guidance.zero123 import CLIPCameraProjection

    _check_size(size)
    emb = _build_zero123_parts(out_dir, size)
    proj = CLIPCameraProjection(embedding_dim=emb, additional_embeddings=4).to(torch.float16)
    proj.save_pretrained(os.path.join(out_dir, "clip_camera_projection"), safe_serialization=True)
    index = _zero123_index("Zero123Pipeline", {"clip_camera_projection": ["zero123", "CLIPCameraProjection"]})
    write_text(os.path.join(out_dir, "model_index.json"), json.dumps(index, indent=2))


def build_zero123_cc(out_dir: str, size: str = "tiny") -> None:
    """kxic/zero123-xl layout (``cc_projection``, ``projection.*`` in a .bin, config without sizes)."""
    from ..guidance.zero123 import CCProjection

    _check_size(size)
    emb = _build_zero123_parts(out_dir, size)
    sub = os.path.join(out_dir, "cc_projection")
    CCProjection(in_channel=emb + 4, out_channel=emb).save_pretrained(sub, safe_serialization=False)
    import diffusers

    write_text(os.path.join(sub, "config.json"),
               json.dumps({"_class_name": "CCProjection", "_diffusers_version": diffusers.__version__}, indent=2))
    index = _zero123_index("Zero1to3StableDiffusionPipeline", {"cc_projection": ["pipeline_zero1to3", "CCProjection"]})
    write_text(os.path.join(out_dir, "model_index.json"), json.dumps(index, indent=2))


tiny_builder("sd")(build_sd)
tiny_builder("clip")(build_clip)
tiny_builder("clip-b16")(lambda out_dir, size="tiny": build_clip(out_dir, size, variant="B/16"))
tiny_builder("zero123")(build_zero123)
tiny_builder("zero123-cc")(build_zero123_cc)
