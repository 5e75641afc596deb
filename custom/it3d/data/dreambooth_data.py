"""``dreambooth`` datamodule: the reference image as DreamBooth instance images, one per modality.

Customize-It-3D (sec. 3.1, A.1) fine-tunes Stable Diffusion on the reference's foreground mask,
depth map, normal map and RGB photo, each with its own prompt, in that order: 25 / 50 / 50 / 75
steps by default (``modalities``: a list of ``{modality, prompt, steps}``; ``step_scale`` scales
every count, at least one step each). Prompts are templates over ``{identifier}`` (``sks``) and
``{class_name}``; the class name is ``class_name`` when set, else the head noun phrase of the
caption (``core.caption.class_from_caption``: "a photo of a teddy bear on a table" ->
"teddy bear"), so the class prompt "a photo of teddy bear" names a class the base model knows.

The inputs (image, mask, depth, normal, caption, framing) are those of ``single-image``, whose
config this one extends (a staged run shares one ``data`` section). Instance images are
``resolution`` square, built by :func:`modality_image` -- the encoding a renderer's outputs must
use to be compared with them (the multi-modal DreamBooth guidance): rgb on white; mask white on
black; depth near = bright, normalised over the foreground, black background; normal: the
camera-space normal map ``(n_cam + 1) / 2`` (OpenGL axes: x right, y up, z towards the viewer --
the estimator's own map, turned back from the world space the datamodule stores) composited on
:data:`NORMAL_BACKGROUND` by :func:`normal_image`, the same function the coarse system renders its
``normal``-shaded views with, so training images and renders agree in space and background.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..core import registry
from ..core.caption import class_from_caption
from ..core.config import ConfigError, parse_structured
from ..core.errors import It3dError
from ..core.typing import Float, Tensor
from .single_image import SingleImageDataModule

MODALITIES = ("mask", "depth", "normal", "rgb")
# Customize-It-3D official preprocess_image.py writes the estimator's normal map with normal[~mask] = 0
NORMAL_BACKGROUND = (0.0, 0.0, 0.0)


def normal_image(normal: Float[Tensor, "B H W 3"], opacity: Float[Tensor, "B H W 1"], c2w: Float[Tensor, "B 4 4"],
                 background=NORMAL_BACKGROUND) -> Float[Tensor, "B H W 3"]:
    """World-space normals weighted by opacity (``|normal| <= opacity``: a renderer's ``comp_normal``, or a unit
    normal map times its mask) -> the camera-space normal map ``(R^T n + 1) / 2`` of camera ``c2w`` composited
    over ``background``: ``(R^T normal + opacity) / 2 + (1 - opacity) * background``."""
    n_cam = torch.einsum("bhwi,bij->bhwj", normal, c2w[:, :3, :3].to(normal))
    bg = torch.as_tensor(background, dtype=normal.dtype, device=normal.device).view(1, 1, 1, 3)
    return ((n_cam + opacity) * 0.5 + (1.0 - opacity) * bg).clamp(0.0, 1.0)


@dataclass
class ModalityEntry:
    modality: str = "???"
    prompt: str = "???"
    steps: int = "???"  # type: ignore[assignment]


def default_modalities() -> List[Dict[str, Any]]:
    return [
        {"modality": "mask", "prompt": "a foreground mask of {identifier} {class_name}", "steps": 25},
        {"modality": "depth", "prompt": "a depth map of {identifier} {class_name}", "steps": 50},
        {"modality": "normal", "prompt": "a normal map of {identifier} {class_name}", "steps": 50},
        {"modality": "rgb", "prompt": "a rgb photo of {identifier} {class_name}", "steps": 75},
    ]


def depth_image(depth: Float[Tensor, "B H W 1"], mask: Float[Tensor, "B H W 1"]) -> Float[Tensor, "B H W 3"]:
    """Depth (larger = farther, any affine scale) -> near = bright in [0, 1] over ``mask > 0.5``, black outside."""
    out = torch.zeros_like(depth)
    for b in range(depth.shape[0]):
        fg = mask[b] > 0.5
        if fg.any():
            lo, hi = depth[b][fg].min(), depth[b][fg].max()
            out[b] = torch.where(fg, 1.0 - (depth[b] - lo) / (hi - lo).clamp_min(1e-8), torch.zeros_like(depth[b]))
    return out.expand(*depth.shape[:-1], 3)


def modality_image(modality: str, rgb: Float[Tensor, "B H W 3"], mask: Float[Tensor, "B H W 1"],
                   depth: Optional[Float[Tensor, "B H W 1"]] = None,
                   normal: Optional[Float[Tensor, "B H W 3"]] = None,
                   c2w: Optional[Float[Tensor, "B 4 4"]] = None) -> Float[Tensor, "B H W 3"]:
    """The image DreamBooth sees for ``modality`` (``rgb`` already composited on its background; ``normal``
    unit world-space normals of the view ``c2w``)."""
    if modality == "rgb":
        return rgb.clamp(0, 1)
    if modality == "mask":
        return mask.clamp(0, 1).expand(*mask.shape[:-1], 3)
    if modality == "depth":
        if depth is None:
            raise It3dError("the depth modality needs a depth map")
        return depth_image(depth, mask)
    if modality == "normal":
        if normal is None or c2w is None:
            raise It3dError("the normal modality needs a normal map and its camera")
        return normal_image(normal * mask, mask, c2w)
    raise ConfigError(f"unknown DreamBooth modality '{modality}'{registry.suggest(modality, MODALITIES)} "
                      f"(known: {', '.join(MODALITIES)})")


def entry_at(schedule: Sequence[Sequence[Any]], step: int) -> int:
    """Index of the (modality, prompt, steps) entry that trains at ``step`` (the last one after the schedule ends)."""
    end = 0
    for i, (_, _, steps) in enumerate(schedule):
        end += steps
        if step < end:
            return i
    return len(schedule) - 1


def scaled_steps(steps: int, scale: float) -> int:
    """A modality's step count times ``step_scale``, at least one step unless it has none."""
    return max(1, int(round(int(steps) * scale))) if int(steps) else 0


@registry.register("dreambooth", kind="datamodule")
class DreamBoothDataModule(SingleImageDataModule):
    @dataclass
    class Config(SingleImageDataModule.Config):
        resolution: int = 512
        identifier: str = "sks"
        class_name: str = ""  # default: the head noun phrase of the caption
        modalities: List[Any] = field(default_factory=default_modalities)
        step_scale: float = 1.0

    cfg: Config

    def configure(self, **kwargs) -> None:
        entries = [parse_structured(ModalityEntry, e, f"data.modalities.{i}")
                   for i, e in enumerate(self.cfg.modalities)]
        if not entries:
            raise ConfigError("data.modalities: at least one {modality, prompt, steps} entry is needed")
        for i, e in enumerate(entries):
            if e.modality not in MODALITIES:
                raise ConfigError(f"data.modalities.{i}.modality: unknown '{e.modality}'"
                                  f"{registry.suggest(e.modality, MODALITIES)} (known: {', '.join(MODALITIES)})")
            if int(e.steps) < 0:
                raise ConfigError(f"data.modalities.{i}.steps must be >= 0, got {e.steps}")
        if self.cfg.step_scale <= 0:
            raise ConfigError(f"data.step_scale must be > 0, got {self.cfg.step_scale}")
        self.entries = entries
        used = {e.modality for e in entries}
        self.cfg.require_depth = self.cfg.require_depth or "depth" in used
        self.cfg.require_normal = self.cfg.require_normal or "normal" in used
        super().configure(**kwargs)
        self._class_name: Optional[str] = None

    # ------------------------------------------------------------------ prompts / schedule
    @property
    def class_name(self) -> str:
        if self._class_name is None:
            self.prepare()
            name = self.cfg.class_name or class_from_caption(self.caption)
            if not name:
                raise It3dError("data.class_name: no class name for the DreamBooth prompts and none could be read from "
                                "the caption: set data.class_name=<class> (e.g. 'teddy bear')")
            self._class_name = name
        return self._class_name

    def prompt(self, template: str) -> str:
        return template.format(identifier=self.cfg.identifier, class_name=self.class_name)

    @property
    def schedule(self) -> List[Tuple[str, str, int]]:
        """[(modality, prompt, steps)] in training order, step counts scaled by ``step_scale``."""
        return [(e.modality, self.prompt(e.prompt), scaled_steps(e.steps, self.cfg.step_scale)) for e in self.entries]

    @property
    def total_steps(self) -> int:
        return sum(s for _, _, s in self.schedule)

    def instance_images(self) -> Dict[str, Tensor]:
        """modality -> 1 R R 3 instance image."""
        res = self.cfg.resolution
        ref = self.reference_at(res, res)
        return {m: modality_image(m, ref["rgb"], ref["mask"], ref.get("depth"), ref.get("normal"), ref["c2w"])
                for m in {e.modality for e in self.entries}}

    # ------------------------------------------------------------------ loaders
    def setup(self, stage: Optional[str] = None) -> None:
        self.prepare()
        self._batch = {"images": self.instance_images(), "schedule": self.schedule}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Repeat(self._batch), batch_size=None, num_workers=0)

    def test_dataloader(self) -> DataLoader:
        items = [{"modality": m, "prompt": p, "index": i} for i, (m, p, _) in enumerate(self.schedule)]
        return DataLoader(_List(items), batch_size=None, num_workers=0)

    def predict_dataloader(self) -> DataLoader:
        """``--export``: one item; the system (re)writes its pipeline dir."""
        return DataLoader(_List([{"index": 0}]), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return self.test_dataloader()


class _Repeat(IterableDataset):
    def __init__(self, batch: Dict) -> None:
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


class _List(Dataset):
    def __init__(self, items: List[Dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict:
        return self.items[i]
