"""Randomly initialised vision models (preprocessing, SAM masks) in their published layouts.

Each builder uses the real transformers architecture class of the default model and writes a
``save_pretrained`` folder (config.json + weights + the processor's preprocessor_config.json and
tokenizer files: the file set of the hub repo) that the real loading code (``it3d.core.hub.load``)
reads back. ``size="tiny"`` for tests; ``size="full"`` is the published architecture (values from
each repo's config.json, which equal transformers' documented defaults for these checkpoints):

* ``sam`` / ``sam-huge``: ``SamModel`` + ``SamProcessor`` -- facebook/sam-vit-base (ViT-B: 768 wide,
  12 layers, 12 heads, global attention at [2, 5, 8, 11]) and facebook/sam-vit-huge (1280 wide,
  32 layers, 16 heads, global attention at [7, 15, 23, 31]); both 1024 px, patch 16, 256-channel
  neck, mask decoder 256 wide; processor longest edge 1024 padded to 1024, masks at 256;
* ``depth``: ``DepthAnythingForDepthEstimation`` + ``DPTImageProcessor`` --
  depth-anything/Depth-Anything-V2-Small-hf: DINOv2-S backbone (384 wide, 12 layers, 6 heads,
  patch 14, stages 3/6/9/12), reassemble 384, neck [48, 96, 192, 384], fusion 64, head 32,
  relative depth; processor 518x518, keep aspect, multiple of 14, bicubic, ImageNet mean/std;
* ``caption``: ``BlipForConditionalGeneration`` + ``BlipProcessor`` (BERT tokenizer, vocab.txt
  written here) -- Salesforce/blip-image-captioning-large: ViT-L vision (1024 wide, 24 layers,
  384 px, patch 16), BERT-base text decoder (768 wide, 12 layers, vocab 30524 with [DEC]/[ENC]).
"""
from __future__ import annotations

import json
import os

import torch

from . import tiny_builder
from .tiny_sd import fix_image_processor_type, legacy_preprocessor

SEED = 0
# a small caption vocabulary: the tiny BLIP generates (random) sentences out of these words
CAPTION_WORDS = ["a", "an", "the", "photo", "of", "teddy", "bear", "cat", "dog", "chair", "red", "blue",
                 "small", "wooden", "on", "table", "with", "and", "toy", "cake", "mug", "statue", "."]


def _quiet_processor_warnings():
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)


def _pil_processor(model: str, name: str):
    """The PIL image processor class (no torchvision needed); the plain class on transformers versions
    without the ``image_processing_pil_*`` modules (a machine with torchvision, e.g. the GPU check's)."""
    import importlib

    try:
        return getattr(importlib.import_module(f"transformers.models.{model}.image_processing_pil_{model}"), name + "Pil")
    except (ImportError, AttributeError):
        import transformers

        return getattr(transformers, name)


def _device(size: str) -> torch.device:
    return torch.device("cuda" if size == "full" and torch.cuda.is_available() else "cpu")


def _save(model, out_dir: str, size: str) -> None:
    (model.to(torch.float16) if size == "full" else model).eval().save_pretrained(out_dir)


def build_sam(out_dir: str, size: str = "tiny", huge: bool = False) -> None:
    from transformers import SamConfig, SamModel, SamProcessor
    SamImageProcessorPil = _pil_processor("sam", "SamImageProcessor")

    torch.manual_seed(SEED)
    if size == "full":
        image_size, patch = 1024, 16
        vit = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31],
                   mlp_dim=5120) if huge else \
            dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11],
                 mlp_dim=3072)
        cfg = SamConfig(vision_config=dict(output_channels=256, image_size=image_size, patch_size=patch, window_size=14,
                                           num_pos_feats=128, **vit),
                        prompt_encoder_config=dict(hidden_size=256, image_size=image_size, patch_size=patch,
                                                   mask_input_channels=16),
                        mask_decoder_config=dict(hidden_size=256, mlp_dim=2048, num_hidden_layers=2,
                                                 num_attention_heads=8, iou_head_hidden_dim=256))
    else:
        image_size, patch = 64, 8
        cfg = SamConfig(
            vision_config=dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                               image_size=image_size, patch_size=patch, window_size=4, global_attn_indexes=[1],
                               num_pos_feats=16, mlp_dim=64),
            prompt_encoder_config=dict(hidden_size=32, image_size=image_size, patch_size=patch, mask_input_channels=4),
            mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                     iou_head_hidden_dim=32),
        )
    with _device(size):
        model = SamModel(cfg)
    _save(model, out_dir, size)
    low = 4 * image_size // patch  # the mask decoder upsamples the embedding 4x
    ip = SamImageProcessorPil(size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size},
                              mask_size={"longest_edge": low}, mask_pad_size={"height": low, "width": low})
    SamProcessor(image_processor=ip).save_pretrained(out_dir)
    legacy_preprocessor(out_dir)


def build_depth(out_dir: str, size: str = "tiny") -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
    DPTImageProcessorPil = _pil_processor("dpt", "DPTImageProcessor")

    torch.manual_seed(SEED)
    if size == "full":
        px = 518
        backbone = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                                image_size=518, patch_size=14, out_indices=[3, 6, 9, 12], reshape_hidden_states=False,
                                layerscale_value=1.0)
        cfg = DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=384,
                                  neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64, head_hidden_size=32,
                                  depth_estimation_type="relative")
    else:
        px = 28
        backbone = Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                                image_size=28, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                                reshape_hidden_states=False, layerscale_value=1.0)
        cfg = DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=16,
                                  neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=8, head_hidden_size=8,
                                  depth_estimation_type="relative")
    with _device(size):
        model = DepthAnythingForDepthEstimation(cfg)
    _save(model, out_dir, size)
    DPTImageProcessorPil(do_resize=True, size={"height": px, "width": px}, keep_aspect_ratio=True,
                         ensure_multiple_of=14, resample=3, do_pad=False, image_mean=[0.485, 0.456, 0.406],
                         image_std=[0.229, 0.224, 0.225]).save_pretrained(out_dir)
    fix_image_processor_type(out_dir)


def build_caption(out_dir: str, size: str = "tiny") -> None:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    BlipImageProcessorPil = _pil_processor("blip", "BlipImageProcessor")

    torch.manual_seed(SEED)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = special + CAPTION_WORDS
    os.makedirs(out_dir, exist_ok=True)
    vocab_file = os.path.join(out_dir, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    tok = BertTokenizer(vocab_file, do_lower_case=True, bos_token="[DEC]", eos_token="[SEP]",
                        model_max_length=32)
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})  # BLIP's tokenizer has [DEC] and [ENC]
    n = len(tok)
    ids = dict(bos_token_id=tok.convert_tokens_to_ids("[DEC]"), eos_token_id=tok.sep_token_id,
               pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id)
    if size == "full":
        px = 384
        text = dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=1024, intermediate_size=3072,
                    projection_dim=768, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512,
                    **ids)
        vision = dict(hidden_size=1024, intermediate_size=4096, projection_dim=512, num_hidden_layers=24,
                      num_attention_heads=16, image_size=px, patch_size=16)
        cfg = BlipConfig(text_config=text, vision_config=vision, projection_dim=512)
    else:
        px = 32
        text = dict(vocab_size=n, hidden_size=16, encoder_hidden_size=16, intermediate_size=32, projection_dim=16,
                    num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32, **ids)
        vision = dict(hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=2,
                      num_attention_heads=2, image_size=32, patch_size=8)
        cfg = BlipConfig(text_config=text, vision_config=vision, projection_dim=16)
    with _device(size):
        model = BlipForConditionalGeneration(cfg)
    _save(model, out_dir, size)
    ip = BlipImageProcessorPil(size={"height": px, "width": px})
    BlipProcessor(image_processor=ip, tokenizer=tok).save_pretrained(out_dir)
    legacy_preprocessor(out_dir)
    special = {k: getattr(tok, k) for k in ("cls_token", "mask_token", "pad_token", "sep_token", "unk_token")}
    special.update(bos_token="[DEC]", additional_special_tokens=["[ENC]"])
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)


tiny_builder("sam")(build_sam)
tiny_builder("sam-huge")(lambda out_dir, size="tiny": build_sam(out_dir, size, huge=True))
tiny_builder("depth")(build_depth)
tiny_builder("caption")(build_caption)
