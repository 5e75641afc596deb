"""Both tiny methods end to end with ``precision=bf16`` on CPU (bf16 on CPU catches what fp16 on CUDA would).

Every pretrained model records (``$IT3D_DTYPE_LOG``) the dtype it ran in: frozen models in bf16 with
bf16 inputs; DreamBooth's trained UNet / text encoder with fp32 master weights under bf16 autocast;
the trained NeRF / point descriptors / U-Net stay fp32 in the checkpoints; every logged loss is finite.
The photo is a lone copy (no maps beside it), so every preprocessing estimator runs too.
"""
import csv
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import hand_converted_zero123

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _run(tmp_path, config, *extra):
    image = tmp_path / "img" / "toy.png"
    os.makedirs(image.parent, exist_ok=True)
    shutil.copy(os.path.join(ROOT, "load", "synthetic", "rgba.png"), image)
    log = tmp_path / "dtypes.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", IT3D_DTYPE_LOG=str(log))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), "--config", os.path.join(ROOT, config),
                        "--train", "use_timestamp=false", f"exp_root_dir={tmp_path / 'out'}", "precision=bf16",
                        f"data.image_path={image}", "stage.coarse.trainer.log_every_n_steps=1",
                        "stage.refine.trainer.log_every_n_steps=1", *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    records = [json.loads(line) for line in open(log)]
    return records


def _models(records):
    """(model folder name, subfolder) -> set of (param dtype, autocast dtype) of its top-level calls."""
    out = {}
    for r in records:
        out.setdefault((os.path.basename(r["model"]), r["subfolder"]), set()).add((r["param_dtype"], r["autocast"]))
    return out


def _check_trained_fp32_and_finite(stage_dir):
    state = torch.load(os.path.join(stage_dir, "ckpts", "last.ckpt"), map_location="cpu", weights_only=False)
    floats = {k: v.dtype for k, v in state["state_dict"].items() if v.is_floating_point()}
    assert floats and set(floats.values()) == {torch.float32}, {k: v for k, v in floats.items() if v != torch.float32}
    rows = list(csv.DictReader(open(os.path.join(stage_dir, "logs", "csv", "metrics.csv"))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(math.isfinite(v) for v in losses)


def test_make_it_3d_bf16(tmp_path):
    # a fresh text-embedding cache: embeddings on disk from an earlier run would skip the text encoder
    emb = tmp_path / "text_embeddings"
    records = _run(tmp_path, "configs/tiny/make-it-3d.yaml", "stage.coarse.trainer.max_steps=12",
                   "stage.refine.trainer.max_steps=4",
                   *(f"stage.{s}.system.guidance.clip_d.prompt_processor.cache_dir={emb}" for s in ("coarse", "refine")))
    models = _models(records)
    for key in [("sd-v2", "unet"), ("sd-v2", "text_encoder"), ("sd-v2", "vae"), ("clip-v2", ""), ("depth-v2", ""),
                ("caption-v2", "")]:
        assert models.get(key) == {("bfloat16", None)}, (key, models.get(key))
    # every record, every part (vae.encoder/decoder, text_decoder, ...): bf16 weights fed bf16 inputs
    assert all(r["param_dtype"] == "bfloat16" for r in records)
    assert all(r["input_dtype"] in (None, "bfloat16") for r in records), \
        [r for r in records if r["input_dtype"] not in (None, "bfloat16")]
    trial = tmp_path / "out" / "tiny-make-it-3d" / "toy"
    for stage in ("coarse", "refine"):
        _check_trained_fp32_and_finite(str(trial / stage))
    assert (trial / "refine" / "save" / "export" / "mesh.glb").is_file()


def test_customize_it_3d_bf16(tmp_path):
    """Also: the coarse stage's Zero-1-to-3 is a folder converted by hand to the published
    clip_camera_projection layout (not built by it3d)."""
    zero123 = hand_converted_zero123(str(tmp_path / "zero123-xl-by-hand"))
    records = _run(tmp_path, "configs/tiny/customize-it-3d.yaml", "stage.coarse.trainer.max_steps=24",
                   "stage.refine.trainer.max_steps=4",
                   f"stage.coarse.system.guidance.zero123.pretrained_model_name_or_path={zero123}")
    assert {("zero123-xl-by-hand", "clip_camera_projection"), ("zero123-xl-by-hand", "unet")} <= {
        (os.path.basename(r["model"]), r["subfolder"]) for r in records}
    models = {(("zero123-v2" if k[0] == "zero123-xl-by-hand" else k[0]), k[1]): v for k, v in _models(records).items()}
    frozen = [("zero123-v2", "unet"), ("zero123-v2", "vae"), ("zero123-v2", "image_encoder"),
              ("zero123-v2", "clip_camera_projection"), ("sam-v2", ""), ("depth-v2", ""), ("caption-v2", ""),
              ("pipeline", "unet"), ("pipeline", "vae"), ("pipeline", "text_encoder")]  # the DreamBooth model
    for key in frozen:
        assert models.get(key) == {("bfloat16", None)}, (key, models.get(key))
    # DreamBooth: the trained copies keep fp32 weights and run under bf16 autocast; the class-image pipeline
    # (the frozen base model) runs in bf16
    assert models[("sd-v2", "unet")] == {("float32", "bfloat16"), ("bfloat16", None)}
    assert models[("sd-v2", "text_encoder")] == {("float32", "bfloat16"), ("bfloat16", None)}
    trial = tmp_path / "out" / "tiny-customize-it-3d" / "toy"
    for stage in ("coarse", "refine"):
        _check_trained_fp32_and_finite(str(trial / stage))
    db = torch.load(trial / "dreambooth" / "ckpts" / "last.ckpt", map_location="cpu", weights_only=False)
    assert {v.dtype for v in db["state_dict"].values() if v.is_floating_point()} == {torch.float32}
    assert (trial / "refine" / "save" / "export" / "mesh.glb").is_file()
