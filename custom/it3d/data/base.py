from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl

from ..core import registry
from ..core.base import Configurable
from ..core.config import parse_structured


class BaseDataModule(pl.LightningDataModule, Configurable):
    @dataclass
    class Config:
        pass

    def __init__(self, cfg: Any = None, path: str = "data", **kwargs) -> None:
        super().__init__()
        self.cfg = parse_structured(self.Config, cfg, path)
        self.configure(**kwargs)

    def configure(self, **kwargs) -> None:
        pass


registry.declare_base("datamodule", BaseDataModule)
