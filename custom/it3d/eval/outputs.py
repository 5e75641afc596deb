"""Where a pipeline run keeps what the evaluation reads -- every layout assumption lives here.

Assumed layout of one benchmark run (``<out>/runs/<name>/``):

* ``trial/``: the run's trial dir (``trial_dir=`` on the launch command line). A staged run
  holds one sub-dir per stage; their order is the ``stages`` list (entries ``{name: ...}``)
  of ``trial/configs/parsed.yaml`` when present, else the sub-dirs holding ``configs/`` or
  ``save/`` in the order their ``configs/parsed.yaml`` were written. An unstaged run is its
  own single stage.
* the LAST stage with ``save/test/rgb/`` holds the renders: ``save/test/rgb/NNNN.png``
  (frame 0 = the reference view), ``save/test/{normal,depth}/NNNN.png``,
  ``save/test/turntable.mp4``; exports are ``<stage>/save/export/*`` of every stage.
* the reference image (ground truth at the reference view, at the render's size), first found of:
  ``<stage>/save/test/reference.png`` (RGBA, if the pipeline writes one); the render stage's
  datamodule rebuilt from ``<stage>/configs/parsed.yaml`` (``data_type`` / ``data``) and asked for
  ``reference_at(H, W)`` (the exact framing used in training; depth / normal not required);
  then ``preprocess/<stem>_rgba.png`` (the preprocessing cache), composited on white. Its mask
  (alpha > 0.5) is the mask of the masked metrics.
* ``<stage>/stats.json``: the pipeline's ``{wall_s, peak_rss_bytes, peak_gpu_mem_bytes}`` of the
  stage's training (``{mode: {...}}`` per launch mode is read too); a missing figure is nan.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.errors import It3dError
from ..core.layout import StageDir
from ..core.prepared import use_stage_record

log = logging.getLogger("it3d.eval")
EXPORT_EXTS = (".obj", ".glb", ".ply", ".mtl", ".png")


# optional maps beside an input's rgba.png -> the config key that hands them to the pipeline
# (used with --input-maps; otherwise the method's own preprocessing estimates them)
INPUT_MAP_KEYS: Dict[str, str] = {"depth": "data.depth_path", "normal": "data.normal_path"}


def image_overrides(image_path: str, run_dir: str, trial_dir: str, name: str, maps: Sequence[str] = ()) -> List[str]:
    """The key=value overrides that point one launch.py call at one input and its run dir."""
    out = [
        f"data.image_path={image_path}",
        f"data.preprocess.cache_dir={preprocess_dir(run_dir)}",
        f"exp_root_dir={os.path.dirname(trial_dir)}",
        f"name={name}",
        "use_timestamp=false",
        f"trial_dir={trial_dir}",
    ]
    for kind in maps:
        path = os.path.join(os.path.dirname(image_path), f"{kind}.png")
        if os.path.isfile(path):
            out.append(f"{INPUT_MAP_KEYS[kind]}={path}")
    return out


def preprocess_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "preprocess")


def stage_dirs(trial_dir: str) -> List[str]:
    """Stage dirs of a run in pipeline order (see the module docstring)."""
    parsed = StageDir(trial_dir).parsed_config
    if os.path.isfile(parsed):
        from omegaconf import OmegaConf

        stages = OmegaConf.load(parsed).get("stages") or []
        names = [s.get("name") if hasattr(s, "get") else str(s) for s in stages]
        dirs = [os.path.join(trial_dir, n) for n in names if n and os.path.isdir(os.path.join(trial_dir, n))]
        if dirs:
            return dirs
        if os.path.isdir(os.path.join(trial_dir, "save")):
            return [trial_dir]
    subs = [d for d in glob.glob(os.path.join(trial_dir, "*"))
            if os.path.isdir(os.path.join(d, "save")) or os.path.isdir(os.path.join(d, "configs"))]

    def written(d: str) -> float:
        p = StageDir(d).parsed_config
        return os.path.getmtime(p) if os.path.exists(p) else os.path.getmtime(d)

    if subs:
        return sorted(subs, key=lambda d: (written(d), d))
    return [trial_dir] if os.path.isdir(os.path.join(trial_dir, "save")) else []


def render_stage(trial_dir: str) -> Optional[str]:
    """The last stage that rendered the test orbit."""
    found = [d for d in stage_dirs(trial_dir) if os.path.isdir(os.path.join(d, "save", "test", "rgb"))]
    return found[-1] if found else None


def frames(stage_dir: str, kind: str = "rgb") -> List[str]:
    return sorted(glob.glob(os.path.join(stage_dir, "save", "test", kind, "*.png")))


def turntable(stage_dir: str) -> Optional[str]:
    p = StageDir(stage_dir).turntable
    return p if os.path.isfile(p) else None


def exports(trial_dir: str) -> Dict[str, List[str]]:
    """``{stage name: [exported files]}`` for every stage with a ``save/export`` folder."""
    out = {}
    for d in stage_dirs(trial_dir):
        files = sorted(f for f in glob.glob(os.path.join(d, "save", "export", "*"))
                       if os.path.isfile(f) and f.lower().endswith(EXPORT_EXTS))
        if files:
            out[os.path.basename(d)] = files
    return out


def reference_image(run_dir: str, stage_dir: str, image_path: str, size: Tuple[int, int]):
    """(rgb 1 H W 3 on white, mask 1 H W 1, where it came from) at ``size``, or None (see the module doc)."""
    p = os.path.join(stage_dir, "save", "test", "reference.png")
    if os.path.isfile(p):
        return _from_rgba(load_rgba(p, size)) + (p,)
    ref = reference_from_datamodule(stage_dir, size)
    if ref is not None:
        return ref + ("datamodule",)
    stem = os.path.splitext(os.path.basename(image_path))[0]
    p = os.path.join(preprocess_dir(run_dir), f"{stem}_rgba.png")
    if os.path.isfile(p):
        return _from_rgba(load_rgba(p, size)) + (p,)
    return None


def _from_rgba(rgba: torch.Tensor):
    a = rgba[..., 3:]
    return rgba[..., :3] * a + (1 - a), (a > 0.5).float()


def reference_from_datamodule(stage_dir: str, size: Tuple[int, int]):
    """The stage's datamodule (from its parsed.yaml) -> its reference view at ``size``; None when unavailable."""
    p = StageDir(stage_dir).parsed_config
    if not os.path.isfile(p):
        return None
    from omegaconf import OmegaConf

    from ..core import registry

    cfg = OmegaConf.load(p)
    if "data" not in cfg:
        return None
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.update(require_depth=False, require_normal=False, depth_path=None, normal_path=None)
    if not data.get("prompt") and not data.get("caption"):
        data["caption"] = "evaluation"  # the caption is not needed: never run the captioner here
    try:
        dm = registry.get("datamodule", str(cfg.get("data_type", "single-image")))(data, path="data")
        use_stage_record(dm, stage_dir)
        ref = dm.reference_at(*size) if hasattr(dm, "reference_at") else dm.reference
    except (It3dError, ValueError, KeyError, OSError) as e:
        log.warning(f"evaluation: reference view from the datamodule of {stage_dir} failed ({e}); trying the cache")
        return None
    rgb, mask = ref["rgb"].float().cpu(), ref["mask"].float().cpu()
    if tuple(rgb.shape[1:3]) != tuple(size):
        rgb = _resize(rgb, size)
        mask = _resize(mask, size)
    return rgb.clamp(0, 1), (mask > 0.5).float()


def _resize(img: torch.Tensor, size) -> torch.Tensor:
    x = torch.nn.functional.interpolate(img.permute(0, 3, 1, 2), size=tuple(size), mode="bilinear", antialias=True,
                                        align_corners=False)
    return x.permute(0, 2, 3, 1)


def stage_stats(trial_dir: str) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{stage: {mode: {wall_s, peak_gpu_mem_bytes, peak_rss_bytes}}}`` from each stage's stats.json."""
    out = {}
    for d in stage_dirs(trial_dir):
        p = StageDir(d).stats
        if os.path.isfile(p):
            try:
                with open(p) as f:
                    st = json.load(f)
            except (OSError, ValueError):
                continue
            # the pipeline writes its training figures flat; {mode: {...}} is accepted too
            out[os.path.basename(d)] = {"train": st} if "wall_s" in st else st
    return out


# ----------------------------------------------------------------------------- images
def save_thumbnail(src: str, dst: str, max_side: int = 256) -> str:
    """A small RGBA copy of an input image (reports never link into the inputs folder)."""
    from PIL import Image

    from ..core import io as it3d_io

    try:
        im = Image.open(src)
        im.draft("RGBA", (max_side, max_side))
        im = im.convert("RGBA")
    except OSError as e:
        raise It3dError(f"cannot read image {src}: {e}") from None
    im.thumbnail((max_side, max_side), Image.LANCZOS)
    return it3d_io.save_image(dst, np.asarray(im))
def load_rgb(path: str, size: Optional[tuple] = None) -> torch.Tensor:
    """An image file -> 1 H W 3 float in [0, 1] (alpha composited on white), optionally resized (H, W)."""
    rgba = load_rgba(path, size)
    return rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])


def load_rgba(path: str, size: Optional[tuple] = None) -> torch.Tensor:
    """An image file -> 1 H W 4 float in [0, 1] (opaque alpha when the file has none)."""
    from PIL import Image

    try:
        im = Image.open(path).convert("RGBA")
    except OSError as e:
        raise It3dError(f"cannot read image {path}: {e}") from None
    arr = torch.from_numpy(np.asarray(im).astype(np.float32) / 255.0)[None]
    if size is not None and tuple(arr.shape[1:3]) != tuple(size):
        x = arr.permute(0, 3, 1, 2)
        rgb_pm = torch.cat([x[:, :3] * x[:, 3:], x[:, 3:]], 1)  # premultiplied, so edges do not bleed
        rgb_pm = torch.nn.functional.interpolate(rgb_pm, size=tuple(size), mode="bilinear", antialias=True,
                                                 align_corners=False)
        a = rgb_pm[:, 3:].clamp(0, 1)
        rgb = torch.where(a > 1e-6, rgb_pm[:, :3] / a.clamp_min(1e-6), torch.zeros_like(rgb_pm[:, :3]))
        arr = torch.cat([rgb.clamp(0, 1), a], 1).permute(0, 2, 3, 1)
    return arr
