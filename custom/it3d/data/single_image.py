"""``single-image`` datamodule: one RGBA photo (or RGB + mask) -> reference view + random novel views.

Inputs. ``image_path`` is RGBA, or RGB with ``mask_path``. Depth / normal maps come from
``depth_path`` / ``normal_path``, else ``<stem>_depth.png`` / ``<stem>_normal.png`` beside the
image, else (RealFusion15 layout) ``depth.png`` / ``normal.png`` beside ``rgba.png``, else the
preprocessing record (``it3d.core.prepared.PreparedImage``: ``data.prepared``, or handed over by the
runner as ``prepared_image``). The datamodule never runs preprocessing: the preprocess stage (or the
runner, before a single-stage run) does, once. Depth maps are read as
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
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..core import cameras, registry
from ..core.base import Updateable
from ..core.config import ConfigError, check, check_section, unbounded
from ..core.image import check_photo_size, object_warnings, read_image, recentre, resize
from ..core.prepared import ImageInputs, PreparedImage, sources
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
        preprocess: dict = field(default_factory=dict)  # how the preprocess stage makes missing maps / caption
        device: str = "auto"  # the preprocessing estimators' device: auto = the run's (--gpu), filled by launch
        # the preprocess stage's record (<trial>/preprocess/prepared.json); a staged run's runner fills it
        prepared: Optional[str] = None
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
        check_section("preprocess", dataclasses.asdict(parsed), path)  # registered by it3d.preprocess
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
        self.prepared_image: Optional[PreparedImage] = None  # set by the runner before setup, or data.prepared

    # ------------------------------------------------------------------ inputs
    def image_inputs(self) -> ImageInputs:
        """What this datamodule needs from the photo (the runner preprocesses when the given files lack it)."""
        c = self.cfg
        return ImageInputs(c.image_path, c.mask_path, c.depth_path, c.normal_path, c.require_depth, c.require_normal,
                           c.depth_convention, c.normal_convention, c.prompt or c.caption)

    def _record(self) -> Optional[PreparedImage]:
        """The preprocessing record: handed over by the runner, or ``data.prepared`` (loaded, never remade)."""
        if self.prepared_image is None and self.cfg.prepared:
            self.prepared_image = PreparedImage.load(self.cfg.prepared)
        return self.prepared_image

    def prepare(self) -> "SingleImageDataModule":
        """Load and frame the inputs (idempotent); after it ``reference`` and ``caption`` are set.

        The files come from :func:`it3d.core.prepared.sources`: the photo and its hand-given maps when they
        are complete, else the preprocessing record's RGBA and maps."""
        if self._planes is not None:
            return self
        c = self.cfg
        img = read_image(c.image_path)
        check_photo_size(img.shape, c.image_path)
        src = sources(self.image_inputs(), self._record(), has_alpha=img.shape[-1] == 4)
        if src.image != c.image_path:
            img = read_image(src.image)
        if img.shape[-1] == 4:
            rgb, alpha = img[..., :3], img[..., 3:]
        else:
            rgb = img[..., :3] if img.shape[-1] >= 3 else np.repeat(img, 3, -1)
            alpha = read_image(src.mask)[..., :1]
        h, w = rgb.shape[:2]
        if not src.prepared:  # preprocessing warned about its own framing already
            object_warnings(alpha[..., 0], c.image_path)
        alpha_t = torch.from_numpy(np.ascontiguousarray(alpha)).permute(2, 0, 1)
        if alpha_t.shape[-2:] != (h, w):
            alpha_t = resize(alpha_t, h, w)
        planes = [torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1) * alpha_t, alpha_t]
        self._has = {"depth": False, "normal": False}
        for kind, path in src.maps.items():
            arr = torch.from_numpy(np.ascontiguousarray(read_image(path))).permute(2, 0, 1)
            arr = arr[:1] if kind == "depth" else arr[:3]
            if arr.shape[-2:] != (h, w):
                arr = resize(arr, h, w)
            if kind == "depth" and src.conventions["depth"] == "disparity":
                arr = 1.0 - arr  # larger = farther (affine: scale/shift stay unknown)
            if kind == "normal":
                arr = arr * 2 - 1
                if src.conventions["normal"] == "opencv":
                    arr = arr * torch.tensor([1.0, -1.0, -1.0])[:, None, None]
            planes.append(arr * alpha_t)
            self._has[kind] = True
        self._planes = recentre(torch.cat(planes, 0).float(), alpha_t[0], c.border_ratio)
        self.caption = src.caption
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
