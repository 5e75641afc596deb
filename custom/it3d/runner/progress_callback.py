"""``ProgressCallback``: a Lightning stage writes its ``logs/progress.json`` (:mod:`it3d.core.progress`).

Training: ``step`` = the global step, ``total`` = ``trainer.max_steps`` (or the system's own
``total_steps`` when it stops earlier, like DreamBooth's modality schedule), ``val_step`` = the step of the
last validation (its images are ``save/it<step>-*``). ``--test``: the turntable frames rendered so far;
``--export``: the export batches. While the stage runs, the callback's file is the one
:func:`it3d.core.progress.bar` reports to (the export steps).
"""
from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl

from ..core import progress


def _total_steps(trainer, pl_module) -> int:
    total = int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else 0
    own = getattr(pl_module, "total_steps", None)
    if isinstance(own, int) and own > 0:
        total = min(total, own) if total else own
    return total


def _batches(n) -> int:
    if isinstance(n, (list, tuple)):
        return int(sum(x for x in n if x != float("inf")))
    return int(n) if n not in (None, float("inf")) else 0


class ProgressCallback(pl.Callback):
    def __init__(self, stage_dir: str, stage: Optional[str] = None) -> None:
        self.file = progress.ProgressFile(stage_dir, stage)
        self._ctx = None

    # the callback's file is the active one from setup to teardown (point-cloud building runs in setup)
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._ctx is None and trainer.is_global_zero:
            self._ctx = progress.reporting(self.file)
            self._ctx.__enter__()
            self.file.phase("setup")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A stage that fails (out of memory, a bad batch) stops reporting too: its file is no longer the
        process's active one (a later stage or run in this process must not write into it)."""
        self.teardown(trainer, pl_module, "")

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.file.phase("train", total=_total_steps(trainer, pl_module), step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            self.file.step(trainer.global_step)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and trainer.state.fn == "fit":
            self.file.set(val_step=int(trainer.global_step), force=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.file.step(trainer.global_step, force=True)

    def on_test_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.file.phase("test", total=_batches(trainer.num_test_batches))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.is_global_zero:
            self.file.step(batch_idx + 1)

    def on_test_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.file.write(force=True)

    def on_predict_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.file.phase("export", total=_batches(trainer.num_predict_batches))

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.is_global_zero:
            self.file.step(batch_idx + 1, force=True)
