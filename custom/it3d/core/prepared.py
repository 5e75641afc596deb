"""The photo a run trains on, as typed records: what a datamodule asks for and what preprocessing made.

Preprocessing happens once, in its stage (a staged method's ``preprocess`` stage, ``launch.py
--preprocess``, or the runner before a single-stage run): it returns a :class:`PreparedImage`,
written as ``prepared.json`` in that stage's dir (:attr:`it3d.core.layout.StageDir.prepared`). Every
later stage *loads* the record (``data.prepared``); no datamodule runs an estimator, hashes the
photo or parses the estimators' configs.

* :class:`ImageInputs` -- what a datamodule needs: the photo, the maps given by hand, which maps it
  requires (DreamBooth's depth / normal modalities require theirs), the caption given by hand;
* :class:`PreparedImage` -- what preprocessing made: the framed RGBA, the estimated mask, the depth
  and normal maps aligned with that RGBA (their conventions), the caption, and the framing
  (``size``, ``border_ratio``);
* :func:`sources` -- the one rule both sides follow to pick the files a datamodule reads: the photo
  and the maps beside it when they are complete (hand-given inputs win, as they always have), else
  the prepared RGBA with the maps aligned to it (never a mix of the two framings);
* :func:`needs_preprocessing` -- why a run must preprocess before its datamodule can load (no alpha
  and no mask, a required map missing, no caption), empty when the given files are enough.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from . import io
from .errors import It3dError
from .image import find_sibling_map, read_image

VERSION = 1
MAP_KINDS = ("depth", "normal")


@dataclass(frozen=True)
class ImageInputs:
    """A datamodule's image inputs (``data.*`` of the single-image family)."""

    image_path: str
    mask_path: Optional[str] = None
    depth_path: Optional[str] = None
    normal_path: Optional[str] = None
    require_depth: bool = True
    require_normal: bool = False
    depth_convention: str = "disparity"
    normal_convention: str = "opengl"
    caption: str = ""  # data.prompt or data.caption: when set, no caption model runs

    def given_map(self, kind: str) -> Optional[str]:
        """``data.<kind>_path`` (must exist), else the map shipped beside the photo, else None."""
        given = getattr(self, f"{kind}_path")
        if given:
            if not os.path.isfile(given):
                raise It3dError(f"data.{kind}_path: file not found: {given}")
            return given
        return find_sibling_map(self.image_path, kind)

    def required(self, kind: str) -> bool:
        return bool(getattr(self, f"require_{kind}"))


@dataclass(frozen=True)
class PreparedImage:
    """Preprocessing's output for one photo (paths are absolute; maps are aligned with ``rgba``).

    ``depth`` is a 16-bit disparity-convention PNG and ``normal`` camera-space OpenGL ``(n + 1) / 2``
    (``it3d.preprocess.maps``), except a hand-given normal map, framed as given (``normal_convention``
    says its axes)."""

    source: str  # the user's photo
    rgba: str  # the recentred square RGBA (size x size; the object spans 1 - border_ratio)
    size: int
    border_ratio: float
    mask: Optional[str] = None  # the estimated mask on the un-framed photo (when one was estimated)
    depth: Optional[str] = None
    normal: Optional[str] = None
    caption: str = ""
    depth_convention: str = "disparity"
    normal_convention: str = "opengl"

    def map(self, kind: str) -> Optional[str]:
        return getattr(self, kind)

    # ------------------------------------------------------------------ the record on disk
    def save(self, path: str) -> str:
        data = {"version": VERSION, **dataclasses.asdict(self)}
        return io.write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str, key: str = "data.prepared") -> "PreparedImage":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise It3dError(f"{key}: {path} not found: run the preprocess stage first (launch.py --preprocess)") \
                from None
        except (OSError, ValueError) as e:
            raise It3dError(f"{key}: {path} is not a readable preprocessing record ({e}); delete it and "
                            f"preprocess again") from None
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise It3dError(f"{key}: {path} is not a version-{VERSION} preprocessing record; preprocess again")
        names = {f.name for f in dataclasses.fields(cls)}
        record = cls(**{k: v for k, v in data.items() if k in names})
        for kind in ("rgba",) + MAP_KINDS:
            p = record.map(kind)
            if p and not os.path.isfile(p):
                raise It3dError(f"{key}: {path} names {kind} {p}, which is gone; preprocess again")
        return record


def use_stage_record(datamodule: Any, stage_dir: str) -> None:
    """A datamodule rebuilt from a finished stage's config (``load_stage``, evaluation) gets the record that
    stage used: ``data.prepared`` when its config names one, else the one a single-stage run kept in its own
    dir (``<stage_dir>/prepared.json``). Datamodules that take no record are left alone."""
    from .layout import StageDir

    if not hasattr(datamodule, "prepared_image") or datamodule.cfg.prepared:
        return
    path = StageDir(stage_dir).prepared
    if os.path.isfile(path):
        datamodule.prepared_image = PreparedImage.load(path)


@dataclass(frozen=True)
class Sources:
    """The files a datamodule reads: an image (RGBA, or RGB + ``mask``) and the maps aligned with it."""

    image: str
    mask: Optional[str] = None
    maps: Dict[str, str] = field(default_factory=dict)
    conventions: Dict[str, str] = field(default_factory=dict)
    caption: str = ""
    prepared: bool = False  # from preprocessing (framed there; its framing warnings were given)


def _has_alpha(path: str) -> bool:
    return read_image(path).shape[-1] == 4


def needs_preprocessing(inputs: ImageInputs, has_alpha: Optional[bool] = None) -> List[str]:
    """What the given files lack (``mask``, ``depth``, ``normal``, ``caption``); empty: no preprocessing.
    ``has_alpha``: whether the photo has an alpha channel, when the caller has decoded it already."""
    why = []
    if has_alpha is None:
        has_alpha = _has_alpha(inputs.image_path)
    if not has_alpha and not inputs.mask_path:
        why.append("mask")
    why += [k for k in MAP_KINDS if inputs.required(k) and inputs.given_map(k) is None]
    if not inputs.caption:
        why.append("caption")
    return why


def sources(inputs: ImageInputs, prepared: Optional[PreparedImage], has_alpha: Optional[bool] = None) -> Sources:
    """The files to read for ``inputs``: the given ones when they hold the mask and every required map,
    else the prepared RGBA and its maps (a required map missing from both is an error naming the fix)."""
    caption = inputs.caption or (prepared.caption if prepared else "")
    lacking = [k for k in needs_preprocessing(inputs, has_alpha) if k != "caption"]
    if not lacking:
        maps = {k: p for k in MAP_KINDS if (p := inputs.given_map(k))}
        conv = {"depth": inputs.depth_convention, "normal": inputs.normal_convention}
        return Sources(inputs.image_path, inputs.mask_path, maps, conv, caption, prepared=False)
    if prepared is None:
        what = lacking[0]
        how = ("set data.mask_path or give an RGBA image" if what == "mask" else
               f"set data.{what}_path or put <stem>_{what}.png beside the image")
        raise It3dError(f"no {what} for {inputs.image_path}: {how}, or preprocess it first (a staged config's "
                        f"preprocess stage, launch.py --preprocess, or data.prepared=<prepared.json>)")
    maps = {k: p for k in MAP_KINDS if (p := prepared.map(k))}
    for kind in MAP_KINDS:
        if inputs.required(kind) and kind not in maps:
            raise It3dError(f"no {kind} map for {inputs.image_path}: preprocessing could not make one; set "
                            f"data.{kind}_path or enable its estimator in data.preprocess")
    conv = {"depth": prepared.depth_convention, "normal": prepared.normal_convention}
    return Sources(prepared.rgba, None, maps, conv, caption, prepared=True)
