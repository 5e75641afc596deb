"""Tiny evaluation models and a fake, fast pipeline for the benchmark-runner tests.

* ``tiny_model_dir("lpips")``: the LPIPS VGG16 layer layout (13 convs, 5 linear heads,
  torchvision / official key names) with narrow channels and random weights, saved as
  ``lpips_vgg16.safetensors`` -- the same format :func:`it3d.eval.lpips.load_lpips` reads.
* ``python custom/it3d/testing/tiny_eval.py fake-launch --config X --train|--test|--export key=value ...``
  (:data:`FAKE_LAUNCH`): a stand-in for ``launch.py`` that writes what a staged run writes
  (stage dirs ``coarse`` and ``refine``, ``stats.json``, ``save/test/{rgb,normal,depth}/NNNN.png``,
  ``turntable.mp4``, ``save/export/*``) in a fraction of a second, so the runner's logic is
  tested without the real pipeline. It runs as a plain script (numpy, PIL, imageio only; no
  torch, no it3d import). ``$IT3D_FAKE_FAIL=<name>`` (or ``<name>:<mode>``) makes the run of input ``<name>`` fail;
  ``$IT3D_FAKE_SLEEP=<seconds>`` makes ``--train`` take that long; an unreadable image fails like launch.py.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, List

import numpy as np

if __package__:
    from ..core.layout import StageDir
    from . import tiny_builder
else:  # run as a plain script (the fake launcher): no package, no registration; the layout module alone
    import importlib.util

    def tiny_builder(name):
        return lambda fn: fn

    _spec = importlib.util.spec_from_file_location(
        "it3d_layout", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "core", "layout.py"))
    _layout = sys.modules["it3d_layout"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_layout)
    StageDir = _layout.StageDir

LPIPS_WIDTHS = (4, 8, 8, 16, 16)
FAKE_STAGES = ("coarse", "refine")
FAKE_FRAMES = 8
FAKE_SIZE = 64
FAKE_LAUNCH = [sys.executable, os.path.abspath(__file__), "fake-launch"]


@tiny_builder("lpips")
def build_lpips(out_dir: str) -> None:
    import torch

    from ..eval.lpips import LPIPS, save_weights

    torch.manual_seed(0)
    model = LPIPS(LPIPS_WIDTHS)
    for k in range(len(LPIPS_WIDTHS)):  # LPIPS heads are non-negative (the official ones are clamped so)
        head = getattr(model, f"lin{k}").model[1]
        head.weight.data = head.weight.data.abs()
    sd = {k[len("net."):] if k.startswith("net.") else k: v for k, v in model.state_dict().items()}
    save_weights(sd, out_dir)


# ----------------------------------------------------------------------------- fake pipeline
def recenter_rgba(path: str, size: int = FAKE_SIZE, border: float = 0.2) -> np.ndarray:
    """Crop an RGBA image to its alpha bbox, pad to a square with ``border`` margin, resize: size size 4 float."""
    from PIL import Image

    im = Image.open(path).convert("RGBA")
    im.thumbnail((4 * size, 4 * size))
    arr = np.asarray(im).astype(np.float32) / 255.0
    ys, xs = np.nonzero(arr[..., 3] > 0.5)
    if len(ys) == 0:
        ys, xs = np.array([0, arr.shape[0] - 1]), np.array([0, arr.shape[1] - 1])
    crop = arr[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    side = int(max(crop.shape[:2]) / (1 - border)) + 1
    canvas = np.zeros((side, side, 4), np.float32)
    oy, ox = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    canvas[oy: oy + crop.shape[0], ox: ox + crop.shape[1]] = crop
    out = Image.fromarray((canvas * 255).round().astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(out).astype(np.float32) / 255.0


def _write_png(path: str, img: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(path)


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _parse(argv: List[str]) -> Dict[str, str]:
    kv = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    kv["__mode__"] = next(a[2:] for a in argv if a in ("--train", "--test", "--export"))
    return kv


def fake_launch(argv: List[str]) -> int:
    kv = _parse(argv)
    mode, trial = kv["__mode__"], kv["trial_dir"]
    name = kv.get("name", os.path.basename(trial))
    os.makedirs(trial, exist_ok=True)
    with open(os.path.join(trial, "fake_calls.log"), "a") as f:
        f.write(f"{mode} gpu={os.environ.get('CUDA_VISIBLE_DEVICES', '-')} {' '.join(argv)}\n")
    fail = os.environ.get("IT3D_FAKE_FAIL", "")
    if fail and fail in (name, f"{name}:{mode}"):
        print(f"error: fake failure of {name} ({mode})", file=sys.stderr)
        return 1
    t0 = time.time()
    if mode == "train" and os.environ.get("IT3D_FAKE_SLEEP"):  # a run long enough to be cancelled mid-way
        time.sleep(float(os.environ["IT3D_FAKE_SLEEP"]))
    cache = kv["data.preprocess.cache_dir"]
    stem = os.path.splitext(os.path.basename(kv["data.image_path"]))[0]
    last = StageDir(trial).stage(FAKE_STAGES[-1])
    test = last.test_dir
    if mode == "train":
        try:
            rgba = recenter_rgba(kv["data.image_path"])
        except (OSError, ValueError) as e:  # like launch.py (preprocess/maps.py): one line, exit 1
            print(f"error: cannot read image {kv['data.image_path']}: {e}", file=sys.stderr)
            return 1
        _write_png(os.path.join(cache, f"{stem}_rgba.png"), rgba)
        _write_text(StageDir(trial).parsed_config, "stages:\n" + "".join(f"- name: {s}\n" for s in FAKE_STAGES))
        for s in FAKE_STAGES:
            _write_text(StageDir(trial).stage(s).parsed_config, f"name: {s}\n")
            _write_text(StageDir(trial).stage(s).last_ckpt, "fake")
    elif mode == "test":
        import imageio.v2 as imageio
        from PIL import Image

        rgba = np.asarray(Image.open(os.path.join(cache, f"{stem}_rgba.png")).convert("RGBA")).astype(np.float32) / 255
        rgb = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
        rng = np.random.default_rng(0)
        frames = []
        for i in range(FAKE_FRAMES):
            img = np.roll(rgb, shift=i * FAKE_SIZE // FAKE_FRAMES, axis=1) if i else rgb
            img = np.clip(img + rng.uniform(-0.02, 0.02, img.shape), 0, 1)
            frames.append((img * 255).round().astype(np.uint8))
            _write_png(os.path.join(test, "rgb", f"{i:04d}.png"), img)
            _write_png(os.path.join(test, "normal", f"{i:04d}.png"), np.roll(rgb[..., ::-1], i, 0))
            _write_png(os.path.join(test, "depth", f"{i:04d}.png"), rgba[..., 3:].repeat(3, -1))
        writer = imageio.get_writer(last.turntable, format="FFMPEG", mode="I", fps=4,
                                    codec="libx264", macro_block_size=1, pixelformat="yuv420p")
        for fr in frames:
            writer.append_data(fr)
        writer.close()
    else:
        export = last.export_dir
        _write_text(os.path.join(export, "mesh.obj"), "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
        _write_text(os.path.join(export, "points.ply"), "ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\n"
                    "property float y\nproperty float z\nend_header\n0 0 0\n")
    if mode == "train":  # like runner/pipeline.py: a stage's stats.json, written when it finished training
        for s in FAKE_STAGES:
            _write_text(StageDir(trial).stage(s).stats, json.dumps(
                {"wall_s": round(time.time() - t0, 4), "peak_rss_bytes": 100 * 2 ** 20, "peak_gpu_mem_bytes": None}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "fake-launch":
        print("usage: python tiny_eval.py fake-launch --config X --train|--test|--export key=value ...")
        sys.exit(2)
    sys.exit(fake_launch(sys.argv[2:]))
