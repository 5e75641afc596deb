"""Base classes: Configurable (nested dataclass Config), Updateable (receives the
global step), and one base class per registry kind."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

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
    pass


class BaseLoss(BaseModule):
    pass


class BasePromptProcessor(BaseObject):
    pass


class BaseEstimator(BaseObject):
    pass


class BaseExporter(BaseObject):
    pass


class BaseBuilder(BaseObject):
    """Builds a stage's starting point from a previous stage (e.g. NeRF -> point cloud)."""

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
