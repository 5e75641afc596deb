"""Per-step wall time of training, for the speed tables (``tests/gpu/check.py``).

:class:`StepTimer` records each training step's duration and writes ``<trial>/logs/step_times.json``
when training ends: the step count, every duration (ms) and the median after a warm-up. On CUDA the
timer synchronises the device around a step only when ``$IT3D_SYNC_TIMING=1`` (measuring runs):
otherwise a step's time is its launch time and the next step absorbs the rest, which the median
over many steps still reflects; normal runs get no extra host sync.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import List

import lightning.pytorch as pl

from ..core import io
from ..core.layout import StageDir
from ..core.profiling import SYNC_TIMING_ENV, sync_if_timing

WARMUP = 2


def _sync(module: pl.LightningModule) -> None:
    sync_if_timing(module.device)


class StepTimer(pl.Callback):
    def __init__(self, trial_dir: str) -> None:
        self.path = StageDir(trial_dir).step_times
        self.times: List[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(pl_module)
        self.times.append((time.perf_counter() - self._t0) * 1000.0)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.times or not trainer.is_global_zero:
            return
        steady = self.times[WARMUP:] or self.times
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        io.write_text(self.path, json.dumps({
            "steps": len(self.times), "median_ms": round(statistics.median(steady), 3),
            "mean_ms": round(statistics.fmean(steady), 3), "warmup": WARMUP, "synced": os.environ.get(SYNC_TIMING_ENV) == "1",
            "ms": [round(t, 3) for t in self.times]}, indent=1) + "\n")
