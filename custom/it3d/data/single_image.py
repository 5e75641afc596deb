"""``single-image`` datamodule: one RGBA photo (or RGB + mask) -> reference view + random novel views.

Inputs. ``image_path`` is RGBA, or RGB with ``mask_path``. Depth / normal maps come from
``depth_path`` / ``normal_path``, else ``<stem>_depth.png`` / ``<stem>_normal.png`` beside the
image, else (RealFusion15 layout) ``depth.png`` / ``normal.png`` beside ``rgba.png``, else the
preprocessing entry point ``it3d.preprocess.entry.ensure_preprocessed``. Depth maps are read as
8/16-bit PNG (scaled to [0, 1]) or ``.npy``; ``depth_convention: disparity`` (default; RealFusion15,
DPT, it3d.testing.scene) means larger = nearer and is negated, so ``batch depth`` is always
"larger = farther" up to an unknown scale and shift. Normal maps are camera-space RGB
``(n + 1) / 2`` (``normal_convention`` opengl: y up, z to viewer; opencv: y down, z away) and are
turned into world-space normals with the reference camera.

Framing. The object's bounding box (mask > 0.5) is cropped, centred on a square canvas so that
it spans ``1 - border_ratio`` of the side, and resized (premultiplied by alpha, antialiased) to
each needed resolution; depth and normal maps get the identical crop / pad / resize.

Training batches (``batch["ref"]``, ``batch["random"]``, ``batch["use_ref"]``): see the README's
"Components by kind" section.
``use_ref`` is drawn every step from a generator seeded with (seed, step) with probability
``ref_prob``; both ``ref`` and ``random`` are always present so a system may apply reference
losses every step. Step-dependent settings (azimuth range, resolution) follow ``update_step``; the
loader may prefetch one batch, so a milestone takes effect within one step of its value.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..core import cameras, registry
from ..core.base import Updateable
from ..core.config import ConfigError, check, unbounded
from ..core.errors import It3dError
from ..core.image import check_photo_size, find_sibling_map, object_warnings, read_image, recentre, resize
from ..core.typing import Tensor
from . import random_views as rv
from .base import BaseDataModule


@registry.register("single-image", kind="datamodule")
class SingleImageDataModule(BaseDataModule, Updateable):
    @dataclass
    class Config:
        image_path: str = "???"
        mask_path: Optional[str] = None
        depth_path: Optional[str] = None
        normal_path: Optional[str] = None
        require_depth: bool = True
        require_normal: bool = False
        # disparity (larger = nearer) | depth (larger = farther)
        depth_convention: str = check("disparity", choices=("disparity", "depth"))
        # opengl | opencv (camera-space axes of the normal map)
        normal_convention: str = check("opengl", choices=("opengl", "opencv"))
        prompt: str = ""  # overrides caption
        caption: str = ""
        preprocess: dict = field(default_factory=dict)
        device: str = "auto"  # the preprocessing estimators' device: auto = the run's (--gpu), filled by launch
        border_ratio: float = 0.2
        # reference camera
        ref_elevation: float = 0.0
        ref_azimuth: float = unbounded(0.0)
        ref_distance: float = 1.0
        ref_fovy: float = 60.0
        # training resolution schedule
        resolution_milestones: List[int] = field(default_factory=lambda: [2000])
        heights: List[int] = field(default_factory=lambda: [128, 256])
        widths: List[int] = field(default_factory=lambda: [128, 256])
        reference_height: Optional[int] = None  # dm.reference size; default the last of heights
        reference_width: Optional[int] = None
        # random novel views
        batch_size: int = 1
        ref_prob: float = 0.25
        elevation_range: List[float] = field(default_factory=lambda: [-10.0, 45.0])
        azimuth_range: List[float] = field(default_factory=lambda: [-180.0, 180.0])
        azimuth_warmup_range: List[float] = field(default_factory=lambda: [-45.0, 45.0])
        azimuth_warmup_steps: int = 2000
        camera_distance_range: List[float] = field(default_factory=lambda: [0.8, 1.2])
        fovy_range: List[float] = field(default_factory=lambda: [40.0, 80.0])
        light_position_perturb: float = 1.0
        light_distance_range: List[float] = field(default_factory=lambda: [0.8, 1.5])
        seed: int = 0
        # evaluation orbit (first frame = reference view)
        n_val_views: int = 4
        n_test_views: int = 120
        eval_height: int = 256
        eval_width: int = 256

    cfg: Config

    @classmethod
    def validate_config(cls, cfg: Any, path: str) -> Any:
        """The datamodule's config and its ``preprocess`` section (estimators included), before any work."""
        parsed = super().validate_config(cfg, path)
        try:
            from ..preprocess.config import parse_preprocess_config
            from ..preprocess.entry import preprocess_config_from_data
        except ImportError:  # pragma: no cover - preprocessing is part of it3d
            return parsed
        parse_preprocess_config(preprocess_config_from_data(dataclasses.asdict(parsed)), f"{path}.preprocess")
        return parsed

    def configure(self, **kwargs) -> None:
        c = self.cfg
        rv.check_resolutions(c.resolution_milestones, c.heights, c.widths, "data")
        if not 0.0 <= c.border_ratio < 1.0:
            raise ConfigError(f"data.border_ratio must be in [0, 1), got {c.border_ratio}")
        if c.depth_convention not in ("disparity", "depth"):
            raise ConfigError(f"data.depth_convention must be 'disparity' or 'depth', got '{c.depth_convention}'")
        if c.normal_convention not in ("opengl", "opencv"):
            raise ConfigError(f"data.normal_convention must be 'opengl' or 'opencv', got '{c.normal_convention}'")
        self.global_step = 0
        self._planes: Optional[Tensor] = None
        self._ref_cache: Dict[Tuple[int, int], Dict] = {}
        self.caption = ""

    # ------------------------------------------------------------------ inputs
    def _find_map(self, kind: str, given: Optional[str]) -> Optional[str]:
        if given:
            if not os.path.isfile(given):
                raise It3dError(f"data.{kind}_path: file not found: {given}")
            return given
        return find_sibling_map(self.cfg.image_path, kind)

    def _preprocessed(self) -> Dict[str, Any]:
        if getattr(self, "_pre", None) is not None:
            return self._pre
        try:
            from ..preprocess.entry import ensure_preprocessed
        except ImportError as e:
            raise It3dError(f"preprocessing is not available ({e}); give the maps in the config "
                            f"(data.mask_path / data.depth_path / data.normal_path) or beside the image") from None
        try:
            from ..preprocess.entry import preprocess_config_from_data

            pre_cfg = preprocess_config_from_data(dataclasses.asdict(self.cfg))
        except ImportError:
            pre_cfg = self.cfg.preprocess
        device = self.cfg.device
        if device == "auto":  # not filled by launch (a datamodule built by hand): CUDA when there is one
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._pre = ensure_preprocessed(self.cfg.image_path, pre_cfg, torch.device(device)) or {}
        return self._pre

    def _need(self, kind: str, given: Optional[str], required: bool) -> Optional[str]:
        if self._from_pre:  # maps aligned with the preprocessed (framed) RGBA
            path = self._preprocessed().get(kind)
            if path is None and required:
                raise It3dError(f"no {kind} map for {self.cfg.image_path}: preprocessing could not make one; "
                                f"set data.{kind}_path or enable its estimator in data.preprocess")
            return path
        path = self._find_map(kind, given)
        if path is None and required:
            how = (f"set data.{kind}_path, put <stem>_{kind}.png beside the image, or enable preprocessing "
                   f"(data.preprocess)")
            try:
                path = self._preprocessed().get(kind)
            except It3dError as e:
                raise It3dError(f"no {kind} map for {self.cfg.image_path}: {how} [{e}]") from None
            if not path:
                raise It3dError(f"no {kind} map for {self.cfg.image_path} and preprocessing could not make one: {how}")
        return path

    def prepare(self) -> "SingleImageDataModule":
        """Load and frame the inputs (idempotent); after it ``reference`` and ``caption`` are set."""
        if self._planes is not None:
            return self
        c = self.cfg
        img = read_image(c.image_path)
        check_photo_size(img.shape, c.image_path)
        self._from_pre = False
        # a map only preprocessing can make comes framed with its own RGBA: then use that frame throughout
        missing = [k for k, g, req in (("depth", c.depth_path, c.require_depth),
                                       ("normal", c.normal_path, c.require_normal))
                   if req and self._find_map(k, g) is None]
        if img.shape[-1] == 4 and missing:
            try:
                pre = self._preprocessed()
            except It3dError as e:
                raise It3dError(f"no {missing[0]} map for {c.image_path}: set data.{missing[0]}_path, put "
                                f"<stem>_{missing[0]}.png beside the image, or enable preprocessing [{e}]") from None
            img = read_image(pre["rgba"])
            self._from_pre = True
        if img.shape[-1] == 4:
            rgb, alpha = img[..., :3], img[..., 3:]
        else:
            rgb = img[..., :3] if img.shape[-1] >= 3 else np.repeat(img, 3, -1)
            mask_path = c.mask_path
            if mask_path is None:
                try:
                    rgba = read_image(self._preprocessed()["rgba"])
                except (It3dError, KeyError) as e:
                    raise It3dError(f"{c.image_path} has no alpha channel: set data.mask_path or enable "
                                    f"preprocessing (data.preprocess) [{e}]") from None
                rgb, alpha = rgba[..., :3], rgba[..., 3:]
                self._from_pre = True
            else:
                alpha = read_image(mask_path)[..., :1]
        h, w = rgb.shape[:2]
        if not self._from_pre:  # preprocessing warned about its own framing already
            object_warnings(alpha[..., 0], c.image_path)
        alpha_t = torch.from_numpy(np.ascontiguousarray(alpha)).permute(2, 0, 1)
        if alpha_t.shape[-2:] != (h, w):
            alpha_t = resize(alpha_t, h, w)
        planes = [torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1) * alpha_t, alpha_t]
        self._has = {"depth": False, "normal": False}
        for kind, given, req in (("depth", c.depth_path, c.require_depth), ("normal", c.normal_path, c.require_normal)):
            path = self._need(kind, given, req)
            if path is None:
                continue
            arr = torch.from_numpy(np.ascontiguousarray(read_image(path))).permute(2, 0, 1)
            arr = arr[:1] if kind == "depth" else arr[:3]
            if arr.shape[-2:] != (h, w):
                arr = resize(arr, h, w)
            if kind == "depth" and c.depth_convention == "disparity":
                arr = 1.0 - arr  # larger = farther (affine: scale/shift stay unknown)
            if kind == "normal":
                arr = arr * 2 - 1
                if c.normal_convention == "opencv":
                    arr = arr * torch.tensor([1.0, -1.0, -1.0])[:, None, None]
            planes.append(arr * alpha_t)
            self._has[kind] = True
        self._planes = recentre(torch.cat(planes, 0).float(), alpha_t[0], c.border_ratio)
        self.caption = c.prompt or c.caption
        if not self.caption:
            try:
                self.caption = str(self._preprocessed().get("caption") or "")
            except It3dError:
                self.caption = ""
        return self

    def setup(self, stage: Optional[str] = None) -> None:
        self.prepare()

    # ------------------------------------------------------------------ reference view
    def reference_at(self, height: int, width: int) -> Dict:
        """The reference view (batch size 1) with its images framed and resized to ``height`` x ``width``."""
        key = (int(height), int(width))
        if key in self._ref_cache:
            return self._ref_cache[key]
        self.prepare()
        c = self.cfg
        p = resize(self._planes, *key)
        a = p[3:4].clamp(0, 1)
        safe = a.clamp_min(1e-6)
        one = torch.ones(1)
        ref = rv.camera_batch(one * c.ref_elevation, one * c.ref_azimuth, one * c.ref_distance, one * c.ref_fovy, *key)
        ref["light_positions"] = ref["c2w"][:, :3, 3].clone()
        ref["rgb"] = (p[0:3] + (1 - a)).clamp(0, 1).permute(1, 2, 0)[None]
        ref["mask"] = a.permute(1, 2, 0)[None]
        i = 4
        if self._has["depth"]:
            ref["depth"] = (p[i:i + 1] / safe * (a > 1e-3)).permute(1, 2, 0)[None]
            i += 1
        if self._has["normal"]:
            n_cam = F.normalize((p[i:i + 3] / safe).permute(1, 2, 0), dim=-1)
            ref["normal"] = (n_cam @ ref["c2w"][0, :3, :3].T * (a.permute(1, 2, 0) > 1e-3))[None]
        self._ref_cache[key] = ref
        return ref

    @property
    def reference(self) -> Dict:
        c = self.cfg
        return self.reference_at(c.reference_height or c.heights[-1], c.reference_width or c.widths[-1])

    # ------------------------------------------------------------------ steps
    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        self.global_step = int(global_step)

    def resolution(self, step: Optional[int] = None) -> Tuple[int, int]:
        c = self.cfg
        return rv.resolution_at(self.global_step if step is None else step, c.resolution_milestones, c.heights, c.widths)

    def train_batch(self, step: int) -> Dict:
        """The training batch of ``step`` (deterministic in (seed, step))."""
        c = self.cfg
        gen = rv.step_generator(c.seed, step)
        use_ref = bool(torch.rand(1, generator=gen).item() < c.ref_prob)
        h, w = self.resolution(step)
        az = rv.azimuth_range_at(step, c.azimuth_warmup_range, c.azimuth_range, c.azimuth_warmup_steps)
        rand = rv.sample_views(gen, c.batch_size, h, w, c.elevation_range, az, c.camera_distance_range, c.fovy_range,
                               c.light_position_perturb, c.light_distance_range)
        return {"ref": self.reference_at(h, w), "random": rand, "use_ref": use_ref, "step": int(step)}

    def eval_view(self, index: int, n_views: int) -> Dict:
        c = self.cfg
        e, a, d, f = cameras.orbit_views(n_views, c.ref_elevation, c.ref_distance, c.ref_fovy, c.ref_azimuth)
        s = slice(index, index + 1)
        out = rv.camera_batch(e[s], a[s], d[s], f[s], c.eval_height, c.eval_width)
        out["light_positions"] = out["c2w"][:, :3, 3].clone()
        out["index"] = int(index)
        out["n_views"] = int(n_views)
        return out

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_TrainStream(self), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Orbit(self, self.cfg.n_val_views), batch_size=None, num_workers=0)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(_Orbit(self, self.cfg.n_test_views), batch_size=None, num_workers=0)

    def predict_dataloader(self) -> DataLoader:
        """``--export``: one batch (the reference view); the system exports in on_predict_epoch_end."""
        return DataLoader(_Orbit(self, 1), batch_size=None, num_workers=0)


class _TrainStream(IterableDataset):
    """Endless training batches; the step counter starts at the datamodule's global step."""

    def __init__(self, dm: SingleImageDataModule) -> None:
        self.dm = dm

    def __iter__(self):
        step = self.dm.global_step
        while True:
            yield self.dm.train_batch(max(step, self.dm.global_step))
            step += 1


class _Orbit(Dataset):
    def __init__(self, dm: SingleImageDataModule, n_views: int) -> None:
        self.dm, self.n = dm, int(n_views)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Dict:
        return self.dm.eval_view(index, self.n)
