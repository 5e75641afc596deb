"""Shared base of the preprocessing estimators that load a pretrained model through the hub.

An estimator is built as ``Cls(cfg, path="data.preprocess.depth", device=..., dtype=...)`` and
called as ``est(image 1 H W 3 in [0, 1], mask 1 H W 1 | None)``. Its model is loaded on first
use, so building an estimator whose output is already cached costs nothing; ``n_calls`` counts
the model runs (the cache tests read it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.base import BaseEstimator


class HubEstimator(BaseEstimator):
    @dataclass
    class Config:
        pretrained_model_name_or_path: str = "???"

    def __init__(self, cfg: Any = None, path: str = "", **kwargs) -> None:
        self.cfg_path = path
        super().__init__(cfg, path, **kwargs)

    def configure(self, device: Any = "cpu", dtype: Any = "auto", **kwargs) -> None:
        from ..core import hub

        self.device = torch.device(device)
        self.dtype = hub.resolve_dtype(dtype, self.device)
        self.n_calls = 0
        self._loaded = None

    @property
    def config_key(self) -> str:
        return f"{self.cfg_path}.pretrained_model_name_or_path" if self.cfg_path else "pretrained_model_name_or_path"

    def loaded(self):
        """The (model, processor, ...) tuple from :meth:`load`, loaded once."""
        if self._loaded is None:
            self._loaded = self.load()
        return self._loaded

    def load(self):
        raise NotImplementedError
