"""``ensure_preprocessed``: mask, recentred RGBA, depth, normal and caption of a photo, cached.

Outputs go to ``cache_dir`` (default: the photo's folder) as ``<stem>_rgba.png``,
``<stem>_depth.png``, ``<stem>_normal.png``, ``<stem>_caption.txt`` (encodings: ``maps.py``) plus
``<stem>_mask.png`` (the estimated mask on the un-framed photo, at ``max_side``) and
``<stem>_preprocess.json`` (a key per output: the photo's hash and every setting it depends on).

Precedence, per output: values given in the config (``mask_path``, ``depth_path``,
``normal_path``, ``caption``; photo alpha for the mask) > a file already in the cache dir that
preprocessing did not write (placed by hand) > a cached output whose key still matches (no
model is loaded or run) > the estimator. An output whose key changed (new photo, new settings)
is remade. Estimators load their models only when they run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..core import io
from ..core.base import build
from ..core.errors import It3dError
from ..core.image import find_sibling_map, object_warnings, read_image, read_photo
from ..core import progress
from ..core.layout import StageDir
from ..core.prepared import PreparedImage
from . import maps
from .config import PreprocessConfig, parse_preprocess_config
from .mask import NoObjectError, blank_photo

log = logging.getLogger("it3d")
DATA_KEYS = ("mask_path", "depth_path", "normal_path", "border_ratio", "depth_convention", "normal_convention")


def output_paths(image_path: str, cache_dir: Optional[str] = None) -> Dict[str, str]:
    folder = cache_dir or os.path.dirname(os.path.abspath(image_path))
    stem = os.path.splitext(os.path.basename(image_path))[0]
    names = {"mask": "mask.png", "rgba": "rgba.png", "depth": "depth.png", "normal": "normal.png",
             "caption": "caption.txt", "manifest": "preprocess.json"}
    return {k: os.path.join(folder, f"{stem}_{v}") for k, v in names.items()}


def _hash(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hash(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class _Run:
    """One ensure_preprocessed call: keys, cache checks and lazily built estimators."""

    def __init__(self, image_path: str, c: PreprocessConfig, device: torch.device) -> None:
        self.image_path, self.c, self.device = image_path, c, device
        self.paths = output_paths(image_path, c.cache_dir)
        try:
            with open(self.paths["manifest"], encoding="utf-8") as f:
                self.manifest = json.load(f).get("outputs", {})
        except (OSError, ValueError):
            self.manifest = {}
        self.written: Dict[str, str] = {}
        self.keys: Dict[str, str] = {}
        self.estimators: Dict[str, Any] = {}

    def fresh(self, name: str) -> bool:
        if not os.path.isfile(self.paths[name]):
            return False
        if name not in self.manifest:
            return True  # placed by hand: it wins
        return not self.c.overwrite and self.manifest[name] == self.keys[name]

    def mark(self, name: str) -> None:
        self.written[name] = self.keys[name]
        self.save_manifest()  # at once: an output never exists without its key

    def estimator(self, name: str):
        if name not in self.estimators:
            type_name = getattr(self.c, f"{name}_type")
            sub = "caption_model" if name == "caption" else name
            self.estimators[name] = build("estimator", type_name, getattr(self.c, sub),
                                          f"data.preprocess.{sub}", device=self.device, dtype=self.c.dtype)
        return self.estimators[name]

    def enabled(self, name: str) -> bool:
        return getattr(self.c, f"{name}_type") not in (None, "", "none")

    def save_manifest(self) -> None:
        if self.written:
            outputs = {**self.manifest, **self.written}
            io.write_text(self.paths["manifest"], json.dumps({"outputs": outputs}, indent=1, sort_keys=True))


def _check_writable(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise It3dError(f"cannot create the preprocessing cache dir {folder} ({e.strerror}): "
                        f"set data.preprocess.cache_dir to a writable folder") from None
    # no write bit counts as read-only even for root (shared data folders must never be written)
    if not os.access(folder, os.W_OK) or not os.stat(folder).st_mode & 0o222:
        raise It3dError(f"the preprocessing cache dir {folder} is read-only: set data.preprocess.cache_dir "
                        f"to a writable folder")


def _raw_mask(r: _Run, photo: np.ndarray, alpha: Optional[np.ndarray]) -> np.ndarray:
    """The mask on the un-framed photo (any resolution of its aspect), H W float in [0, 1]."""
    c = r.c
    if c.mask_path:
        m = read_image(c.mask_path)
        return m[..., 3] if m.shape[-1] == 4 else m[..., 0]
    if alpha is not None:
        return alpha
    if r.fresh("mask"):
        return read_image(r.paths["mask"])[..., 0]
    if not r.enabled("mask"):
        raise It3dError(f"{r.image_path} has no alpha channel and mask estimation is off: set data.mask_path "
                        f"or data.preprocess.mask_type")
    check_not_blank(photo, r.image_path)
    small = maps.downscale_uint8(photo, c.max_side)
    image = torch.from_numpy(small.astype(np.float32) / 255.0)[None].to(r.device)
    try:
        mask = r.estimator("mask")(image, None)[0, ..., 0].float().cpu().numpy()
    except NoObjectError as e:
        raise It3dError(f"no object could be segmented in {r.image_path}: {e}; give an RGBA image whose alpha "
                        f"shows the object, or data.mask_path") from None
    io.save_image(r.paths["mask"], mask)
    r.mark("mask")
    return mask


def _frame(r: _Run, need_depth: bool, need_normal: bool) -> None:
    """Write ``<stem>_rgba.png`` (and the hand-given depth / normal maps, framed identically)."""
    c = r.c
    photo, alpha = maps.load_photo(r.image_path)
    mask = _raw_mask(r, photo, alpha)
    object_warnings(mask, r.image_path)
    h, w = maps.working_size(mask, photo.shape[:2], c.size, c.border_ratio)
    rgb = np.asarray(maps.downscale_uint8(photo, max(h, w))).astype(np.float32) / 255.0
    h, w = rgb.shape[:2]
    planes = [rgb, maps.resize_array(mask[..., None], w, h)]
    if need_depth:
        d = read_image(c.depth_path)[..., :1]
        planes.append(maps.resize_array(1.0 - d if c.depth_convention == "disparity" else d, w, h))
    if need_normal:
        planes.append(maps.resize_array(read_image(c.normal_path)[..., :3] * 2.0 - 1.0, w, h))
    arr = torch.from_numpy(np.concatenate(planes, -1)).permute(2, 0, 1)
    alpha_t = arr[3].clamp(0, 1)
    framed = maps.frame(torch.cat([arr[:3], arr[4:]], 0), alpha_t, c.size, c.border_ratio)
    a = framed[-1:]
    maps.write_rgba(r.paths["rgba"], torch.cat([framed[:3], a], 0))
    r.mark("rgba")
    i = 3
    if need_depth:
        maps.write_depth(r.paths["depth"], framed[i:i + 1].permute(1, 2, 0)[None], a.permute(1, 2, 0)[None])
        r.mark("depth")
        i += 1
    if need_normal:
        n = torch.nn.functional.normalize(framed[i:i + 3].permute(1, 2, 0), dim=-1) * (a.permute(1, 2, 0) > 1e-3)
        maps.write_normal(r.paths["normal"], n[None])
        r.mark("normal")


def _estimator_key(c: PreprocessConfig, name: str) -> Any:
    """The estimator's parsed config (defaults filled in), so spelling a default out keeps the cache valid."""
    from ..core.config import parse_structured
    from ..core.registry import get

    type_name = getattr(c, f"{name}_type")
    if type_name in (None, "", "none"):
        return "none"
    raw = getattr(c, "caption_model" if name == "caption" else name)
    return type_name, dataclasses.asdict(parse_structured(get("estimator", type_name).Config, raw))


def ensure_preprocessed(image_path: str, cfg: Any = None, device: Any = "cpu") -> PreparedImage:
    """Make (or find) the maps of ``image_path``; returns the typed record (:class:`it3d.core.prepared.PreparedImage`):
    ``rgba``, ``depth``, ``normal`` (paths; None for a map that could not be made), ``caption``, ``mask`` (the
    estimated mask, when one was estimated) and the framing."""
    c = cfg if isinstance(cfg, PreprocessConfig) else parse_preprocess_config(cfg)
    device = torch.device(device if c.device == "auto" else c.device)
    if os.path.isdir(image_path):
        raise It3dError(f"{image_path} is a directory, not an image file")
    if not os.path.isfile(image_path):
        raise It3dError(f"image not found: {image_path}")
    r = _Run(image_path, c, device)
    est_cfg = {n: _estimator_key(c, n) for n in ("mask", "depth", "normal", "caption")}
    photo_key = _file_hash(image_path)
    r.keys["mask"] = _hash(photo_key, c.max_side, est_cfg["mask"])
    r.keys["rgba"] = _hash(photo_key, c.mask_path, r.keys["mask"], c.size, c.border_ratio)
    r.keys["depth"] = _hash(r.keys["rgba"], c.depth_path, c.depth_convention, est_cfg["depth"])
    r.keys["normal"] = _hash(r.keys["rgba"], c.normal_path, est_cfg["normal"], r.keys["depth"])
    r.keys["caption"] = _hash(r.keys["rgba"], est_cfg["caption"])

    laps = progress.Laps("preprocessing", 4)
    given_depth = bool(c.depth_path) and not r.fresh("depth")
    given_normal = bool(c.normal_path) and not r.fresh("normal")
    if not r.fresh("rgba") or given_depth or given_normal:
        _check_writable(os.path.dirname(r.paths["rgba"]))
        _frame(r, given_depth, given_normal)
    laps.lap("mask + framing")
    out: Dict[str, Any] = {"rgba": r.paths["rgba"]}
    if os.path.isfile(r.paths["mask"]):
        out["mask"] = r.paths["mask"]
    rgb, alpha = maps.read_rgba(r.paths["rgba"])
    image = maps.white_composite(rgb, alpha).to(device)
    alpha = alpha.to(device)

    depth = None
    if not r.fresh("depth") and r.enabled("depth"):
        _check_writable(os.path.dirname(r.paths["depth"]))
        depth = r.estimator("depth")(image, alpha)
        maps.write_depth(r.paths["depth"], depth, alpha)
        r.mark("depth")
    if r.fresh("depth"):  # a stale output (made from other inputs or settings) is never handed out
        out["depth"] = r.paths["depth"]
    laps.lap("depth")
    if not r.fresh("normal") and r.enabled("normal"):
        _check_writable(os.path.dirname(r.paths["normal"]))
        est = r.estimator("normal")
        kwargs = {}
        if "depth" in inspect.signature(est.__call__).parameters:
            if depth is None and "depth" in out:
                depth = maps.read_depth(out["depth"], alpha)
            kwargs["depth"] = depth
        maps.write_normal(r.paths["normal"], est(image, alpha, **kwargs))
        r.mark("normal")
    if r.fresh("normal"):  # a stale output (made from other inputs or settings) is never handed out
        out["normal"] = r.paths["normal"]
    laps.lap("normal")

    if c.caption:
        out["caption"] = c.caption
    else:
        if not r.fresh("caption") and r.enabled("caption"):
            _check_writable(os.path.dirname(r.paths["caption"]))
            io.write_text(r.paths["caption"], r.estimator("caption")(image, alpha).strip() + "\n")
            r.mark("caption")
        if r.fresh("caption"):  # a stale output is never handed out
            with open(r.paths["caption"], encoding="utf-8") as f:
                out["caption"] = f.read().strip()
    laps.lap("caption")
    if r.written:
        folder = os.path.dirname(r.paths["rgba"])
        log.info(f"preprocessed {image_path}: made {', '.join(sorted(r.written))} in {folder}")
    # a hand-given normal map is framed as given (its axes are data.normal_convention); estimated ones are OpenGL
    normal_conv = c.normal_convention if c.normal_path and out.get("normal") else "opengl"
    def path(key: str) -> Optional[str]:
        return os.path.abspath(out[key]) if out.get(key) else None

    return PreparedImage(source=os.path.abspath(image_path), rgba=path("rgba"), size=c.size,
                         border_ratio=c.border_ratio, mask=path("mask"), depth=path("depth"),
                         normal=path("normal"), caption=str(out.get("caption") or ""),
                         depth_convention="disparity", normal_convention=normal_conv)


def check_not_blank(photo: np.ndarray, path: str) -> None:
    colour = blank_photo(photo)
    if colour:
        raise It3dError(f"no object in {path}: the photo is {colour} throughout, there is nothing to segment; give a "
                        f"photo of the object, or an RGBA image whose alpha shows it")


def check_inputs(data: Any, produced_under: Optional[str] = None) -> None:
    """Before any work: the photo (``data.image_path``) and the maps given by hand exist and can be read,
    the photo is big enough, and a photo without alpha or mask is not blank. Paths under
    ``produced_under`` (a trial dir) are made by an earlier stage and are not checked."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(data, DictConfig):
        data = OmegaConf.to_container(data, resolve=True, throw_on_missing=False)
    if not isinstance(data, dict):
        return
    pre = data.get("preprocess") if isinstance(data.get("preprocess"), dict) else {}

    def given(value) -> bool:
        if not isinstance(value, str) or value in ("", "???"):
            return False
        inside = produced_under and os.path.abspath(value).startswith(os.path.abspath(produced_under) + os.sep)
        return not inside

    for key, value in [(f"data.{k}", data.get(k)) for k in ("mask_path", "depth_path", "normal_path")] + \
            [(f"data.preprocess.{k}", pre.get(k)) for k in ("mask_path", "depth_path", "normal_path")]:
        if given(value) and not os.path.isfile(value):
            raise It3dError(f"{key}: file not found: {value}")
    image = data.get("image_path")
    if not given(image):
        return
    photo, alpha = read_photo(image)
    if alpha is None and not (data.get("mask_path") or pre.get("mask_path")):
        check_not_blank(photo, image)


def preprocess_config_from_data(data_cfg: Any) -> Dict[str, Any]:
    """``data.preprocess`` completed with the datamodule's hand-given inputs (``data.mask_path``, ...)."""
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) else dict(data_cfg or {})
    pre = dict(data.get("preprocess") or {})
    names = {f.name for f in dataclasses.fields(PreprocessConfig)}
    for key in DATA_KEYS:
        if data.get(key) is not None and key not in pre and key in names:
            pre[key] = data[key]
    if not pre.get("caption") and (data.get("prompt") or data.get("caption")):
        pre["caption"] = data.get("prompt") or data.get("caption")
    image = data.get("image_path")
    if isinstance(image, str) and image != "???":
        for kind in ("depth", "normal"):  # maps shipped beside the photo win over estimators
            sibling = find_sibling_map(image, kind)
            if not pre.get(f"{kind}_path") and sibling and sibling.endswith(".png"):
                pre[f"{kind}_path"] = sibling
    return pre


def preprocess_from_config(root_cfg: Any, device: Any = None) -> PreparedImage:
    """``launch.py --preprocess`` and a staged run's preprocess stage: preprocess ``data.image_path`` with
    ``data.preprocess`` on ``device`` (the run's, from ``--gpu``; else ``data.device``, else the CPU).
    The record is written to ``<trial_dir>/prepared.json`` when the config has a trial dir: the later
    stages load it (``data.prepared``) instead of preprocessing again."""
    data = root_cfg.get("data") or {}
    image = data.get("image_path")
    if not image or image == "???":
        raise It3dError("preprocessing needs data.image_path (set it in the YAML or data.image_path=photo.png)")
    stage_dir = root_cfg.get("trial_dir")  # a staged run's preprocess stage: report to its progress file
    prog = progress.ProgressFile(str(stage_dir)) if stage_dir and os.path.isdir(str(stage_dir)) else None
    if prog is not None:
        prog.phase("preprocess")
    with progress.reporting(prog):
        record = ensure_preprocessed(str(image), preprocess_config_from_data(data), _device(root_cfg, device))
    for k, v in dataclasses.asdict(record).items():
        if v:
            log.info(f"  {k}: {v}")
    if stage_dir:
        record.save(StageDir(str(stage_dir)).prepared)
    return record


def _device(root_cfg: Any, device: Any = None) -> torch.device:
    """The estimators' device: the run's (``--gpu``), else ``data.device``, else ``system.device``; auto = CUDA
    when there is one."""
    data = root_cfg.get("data") or {}
    device = device or data.get("device") or (root_cfg.get("system") or {}).get("device") or "cpu"
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def prepare_for_stage(inputs: Any, data_cfg: Any, stage_dir: str, reuse: bool) -> Optional[PreparedImage]:
    """The record a single-stage run's datamodule loads (the runner calls this; datamodules never do).

    None when the given files are enough (``it3d.core.prepared.needs_preprocessing``: the photo has alpha
    or a mask, every required map is given, the caption is given). Else preprocessing runs once and its
    record is written to ``<stage_dir>/prepared.json`` (estimators on ``data.device``); with ``reuse`` (a resumed run, --test, --export)
    an existing record there is loaded instead."""
    from ..core.prepared import needs_preprocessing

    lacking = needs_preprocessing(inputs)
    if not lacking:
        return None
    path = StageDir(stage_dir).prepared
    if reuse and os.path.isfile(path):
        return PreparedImage.load(path)
    try:
        record = ensure_preprocessed(inputs.image_path, preprocess_config_from_data(data_cfg),
                                     _device({"data": data_cfg}))
    except It3dError as e:
        if lacking != ["caption"]:
            raise
        # only the caption was missing: the run goes on without one, as it always has, but says so
        log.warning(f"no caption for {inputs.image_path} ({str(e).splitlines()[0]}); prompts use an empty caption: "
                    f"set data.prompt=... to give one")
        return None
    os.makedirs(stage_dir, exist_ok=True)
    record.save(path)
    return record
