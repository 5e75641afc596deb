"""Tiny randomly initialised vision models for the preprocessing tests.

Each builder uses the real transformers architecture class of the default model and
writes a ``save_pretrained`` folder (model + processor) that the real loading code
(``it3d.core.hub.load``) reads back:

* ``sam``: ``SamModel`` + ``SamProcessor`` (architecture of facebook/sam-vit-base, 64 px input);
* ``depth``: ``DepthAnythingForDepthEstimation`` + ``DPTImageProcessor`` (architecture of
  depth-anything/Depth-Anything-V2-Small-hf: a DINOv2 backbone with a DPT head, 28 px input);
* ``caption``: ``BlipForConditionalGeneration`` + ``BlipProcessor`` with a BERT tokenizer whose
  vocab.txt is written here (architecture of Salesforce/blip-image-captioning-large, 32 px input).
"""
from __future__ import annotations

import os

import torch

from . import tiny_builder

SEED = 0
# a small caption vocabulary: the tiny BLIP generates (random) sentences out of these words
CAPTION_WORDS = ["a", "an", "the", "photo", "of", "teddy", "bear", "cat", "dog", "chair", "red", "blue",
                 "small", "wooden", "on", "table", "with", "and", "toy", "cake", "mug", "statue", "."]


def _quiet_processor_warnings():
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)


@tiny_builder("sam")
def build_sam(out_dir: str) -> None:
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    torch.manual_seed(SEED)
    image_size, patch = 64, 8
    cfg = SamConfig(
        vision_config=dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch, window_size=4, global_attn_indexes=[1],
                           num_pos_feats=16, mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=32, image_size=image_size, patch_size=patch, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=32),
    )
    SamModel(cfg).eval().save_pretrained(out_dir)
    low = 4 * image_size // patch  # the mask decoder upsamples the embedding 4x
    ip = SamImageProcessorPil(size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size},
                              mask_size={"longest_edge": low}, mask_pad_size={"height": low, "width": low})
    SamProcessor(image_processor=ip).save_pretrained(out_dir)


@tiny_builder("depth")
def build_depth(out_dir: str) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    torch.manual_seed(SEED)
    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                            image_size=28, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False, layerscale_value=1.0)
    cfg = DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=16,
                              neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=8, head_hidden_size=8,
                              depth_estimation_type="relative")
    DepthAnythingForDepthEstimation(cfg).eval().save_pretrained(out_dir)
    DPTImageProcessorPil(do_resize=True, size={"height": 28, "width": 28}, keep_aspect_ratio=True,
                         ensure_multiple_of=14, resample=3, do_pad=False, image_mean=[0.485, 0.456, 0.406],
                         image_std=[0.229, 0.224, 0.225]).save_pretrained(out_dir)


@tiny_builder("caption")
def build_caption(out_dir: str) -> None:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

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
    text = dict(vocab_size=n, hidden_size=16, encoder_hidden_size=16, intermediate_size=32, projection_dim=16,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                bos_token_id=tok.convert_tokens_to_ids("[DEC]"), eos_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    cfg = BlipConfig(text_config=text, vision_config=vision, projection_dim=16)
    BlipForConditionalGeneration(cfg).eval().save_pretrained(out_dir)
    ip = BlipImageProcessorPil(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=ip, tokenizer=tok).save_pretrained(out_dir)
