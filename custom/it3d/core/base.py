"""Base classes: Configurable (nested dataclass Config), Updateable (receives the
global step), and one base class per registry kind."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Protocol, runtime_checkable

import torch
import torch.nn as nn

from . import registry
from .config import parse_structured, validate_dataclass


class Configurable:
    """Holds ``self.cfg``, an instance of the nested ``Config`` dataclass."""

    @dataclass
    class Config:
        pass

    cfg: Any

    def parse_config(self, cfg: Any, path: str = "") -> Any:
        return parse_structured(self.Config, cfg, path)

    @classmethod
    def validate_config(cls, cfg: Any, path: str) -> Any:
        """Check ``cfg`` (and the sub-components it names) without building anything."""
        return validate_dataclass(cls.Config, cfg, path)


class Updateable:
    """Components whose behaviour depends on the training step.

    ``do_update_step`` visits every Updateable attribute / child module once, then
    calls this object's own ``update_step``.
    """

    def do_update_step(self, epoch: int, global_step: int, on_load_weights: bool = False, _seen=None) -> None:
        seen = set() if _seen is None else _seen
        if id(self) in seen:
            return
        seen.add(id(self))
        children = list(vars(self).values())
        if isinstance(self, nn.Module):
            children += list(self._modules.values())
        for child in children:
            items = child.values() if isinstance(child, dict) else child if isinstance(child, (list, tuple)) else [child]
            for c in items:
                if isinstance(c, Updateable):
                    c.do_update_step(epoch, global_step, on_load_weights, seen)
        self.update_step(epoch, global_step, on_load_weights)

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        pass


class BaseObject(Configurable, Updateable):
    """A configurable, non-module component (prompt processors, estimators, exporters...)."""

    def __init__(self, cfg: Any = None, path: str = "", **kwargs) -> None:
        self.cfg = self.parse_config(cfg, path)
        self.configure(**kwargs)

    def configure(self, **kwargs) -> None:
        pass


class BaseModule(nn.Module, Configurable, Updateable):
    """A configurable ``nn.Module`` component."""

    def __init__(self, cfg: Any = None, path: str = "", **kwargs) -> None:
        super().__init__()
        self.cfg = self.parse_config(cfg, path)
        self.configure(**kwargs)

    def configure(self, **kwargs) -> None:
        pass


# --------------------------------------------------------------------- one base per kind
class BaseGeometry(BaseModule):
    pass


class BaseMaterial(BaseModule):
    pass


class BaseBackground(BaseModule):
    pass


class BaseRenderer(BaseModule):
    pass


class BaseGuidance(BaseModule):
    """A prior that scores renders. Contract (what the systems call, and nothing else):

    * ``forward(rgb (B H W 3) in [0, 1], batch, step) -> {"loss_<name>": scalar tensor, ...}`` (plus
      optional detached extras for logging); the system multiplies each ``loss_*`` by the entry's weight;
    * ``set_prompt(text)`` once before training: the caption (or the user's prompt); a prior that takes
      no text ignores it;
    * ``set_reference(ref)`` once before training: the reference view (``rgb``, ``mask``, ``c2w``, angles);
      a prior that needs no reference ignores it.
    """

    def forward(self, rgb: torch.Tensor, batch: Dict[str, Any], step: Optional[int] = None, **kwargs: Any
                ) -> Dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(rgb, batch, step)")

    def set_prompt(self, text: str) -> None:
        """The text prompt (caption); nothing by default."""

    def set_reference(self, ref: Dict[str, Any]) -> None:
        """The reference view; nothing by default."""


class BaseLoss(BaseModule):
    pass


class BasePromptProcessor(BaseObject):
    pass


class BaseEstimator(BaseObject):
    pass


@runtime_checkable  # a hint of ExportParts: --typecheck (beartype) checks it with isinstance
class RenderView(Protocol):
    """A trained stage's render of one camera: ``(c2w (4 4), fovy_deg, height, width, **options) -> outputs with
    batch size 1`` (``comp_rgb``, ``opacity``, ``depth``...). Options a stage does not know are ignored
    (``shading``, ``bg_color``, ``normals``)."""

    def __call__(self, c2w: torch.Tensor, fovy_deg: float, height: int, width: int, **options: Any
                 ) -> Dict[str, Any]: ...


@runtime_checkable
class TrainedStage(Protocol):
    """What builders may use of a trained stage (a coarse NeRF system): its geometry (``isosurface(...)``
    for implicit fields), its device, and :class:`RenderView` ``render_view``."""

    geometry: Any
    device: torch.device

    def render_view(self, c2w: torch.Tensor, fovy_deg: float, height: int, width: int, **kwargs: Any
                    ) -> Dict[str, Any]: ...


@dataclass(frozen=True, eq=False)
class ExportParts:
    """What an exporter gets of a trained stage (its system's ``export()`` builds it; exporters never see
    the system): the stage's parts, as threestudio's exporters get them, and what baking and checking
    a file need besides.

    * ``geometry``: what is exported: an implicit field (``isosurface(...)``, ``forward(points) ->
      {"features"}``) or a point cloud (``positions``, ``colors()``);
    * ``render_view``: the stage's :class:`RenderView` (through its renderer, in eval mode), for texture
      bakes from renders and for the fidelity check;
    * ``device``: where the stage's parts live;
    * ``material``, ``background``, ``renderer``: the stage's other parts (None where the stage has none);
    * ``reference``: the reference view record (``c2w``, ``fovy``, ``elevation``, ``azimuth``,
      ``camera_distances``, ``rgb``, ``mask``); None when the stage has no datamodule with one;
    * ``surface``: an implicit field whose isosurface is the mesh to texture when ``geometry`` has none
      (the refined point cloud's coarse stage); None otherwise.
    """

    geometry: Any
    render_view: RenderView
    device: torch.device
    material: Optional[BaseMaterial] = None
    background: Optional[BaseBackground] = None
    renderer: Optional[BaseRenderer] = None
    reference: Optional[Dict[str, Any]] = None
    surface: Any = None


class BaseExporter(BaseObject):
    """Writes a trained stage's parts to files. Contract: ``export(parts: ExportParts, stem) -> {kind: path}``
    (``stem``: the output path without its extension, or the file itself for single-file exporters)."""

    def export(self, parts: ExportParts, stem: str) -> Dict[str, str]:
        raise NotImplementedError(f"{type(self).__name__} must implement export(parts, stem)")


class BaseBuilder(BaseObject):
    """Builds a stage's starting point from a previous stage (e.g. NeRF -> point cloud). Contract:
    ``build(source: TrainedStage, reference) -> {"points" (N 3), "colors" (N 3), ...}`` with the
    reference view record (``rgb``, ``mask``, ``c2w``, ``fovy``...); ``release()`` after it."""

    def build(self, source: TrainedStage, reference: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement build(source, reference)")

    def release(self) -> None:
        """Let go of the models the build used (called once the result is built); nothing by default."""


for _kind, _base in (
    ("geometry", BaseGeometry),
    ("material", BaseMaterial),
    ("background", BaseBackground),
    ("renderer", BaseRenderer),
    ("guidance", BaseGuidance),
    ("loss", BaseLoss),
    ("prompt-processor", BasePromptProcessor),
    ("estimator", BaseEstimator),
    ("exporter", BaseExporter),
    ("builder", BaseBuilder),
):
    registry.declare_base(_kind, _base)


def build(kind: str, type_name: str, cfg: Any = None, path: str = "", **kwargs) -> Any:
    """Instantiate a registered component."""
    cls = registry.get(kind, type_name)
    return cls(cfg, path=path, **kwargs)
