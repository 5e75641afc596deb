"""Lightning parts of every it3d trainer.

* :class:`AppendingCSVLogger`: ``logs/csv/metrics.csv`` keeps its rows across resumes, ``--test``
  and ``--export`` (Lightning's CSVLogger deletes the file whenever a run opens the folder again);
* :class:`StepProgressBar`: one bar over the whole training run, ``step / max_steps`` from the
  global step (right after a resume too), no ``Epoch 0/-2`` or ``v_num``; its loss values are read
  from the device every ``log_every_n_steps`` steps (each read is a host sync), not every step; where
  stderr is not a terminal (a log file) it writes a log line every tenth of the run instead of a bar.
"""
from __future__ import annotations

import csv
import logging
import os
import sys
import time
from typing import Any, Dict

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

log = logging.getLogger("it3d")


class _AppendingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):  # continue the existing file with its columns
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(set(header))

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes metrics.csv here; earlier rows are part of the run."""


class AppendingCSVLogger(CSVLogger):
    @property
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def _fmt(v: Any) -> str:
    try:
        return f"{float(v):.4g}"
    except (TypeError, ValueError):
        return str(v)


def stdout_is_terminal() -> bool:
    """Lightning draws its bars on stdout."""
    return sys.stdout.isatty()


class StepProgressBar(TQDMProgressBar):
    def __init__(self, label: str = "train", log_fraction: float = 0.1) -> None:
        super().__init__(leave=False)
        self.label = label
        self.tty = stdout_is_terminal()
        self.log_fraction = log_fraction
        self._first = True
        self._t0 = time.time()

    @property
    def is_enabled(self) -> bool:
        return super().is_enabled and self.tty

    @property
    def is_disabled(self) -> bool:
        return not self.is_enabled

    def get_metrics(self, trainer, pl_module) -> Dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    @staticmethod
    def _total(trainer) -> int:
        """``max_steps``, or a system's own ``total_steps`` when it stops earlier (DreamBooth's schedule)."""
        totals = [int(trainer.max_steps)] if trainer.max_steps and trainer.max_steps > 0 else []
        own = getattr(trainer.lightning_module, "total_steps", None)
        if isinstance(own, int) and own > 0:
            totals.append(own)
        return min(totals) if totals else 0

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._t0 = time.time()
        self._first = True
        self._reset_bar(trainer)  # a resume restarts mid-epoch: on_train_epoch_start does not run

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        self._reset_bar(trainer)

    def _reset_bar(self, trainer) -> None:
        bar = self.train_progress_bar
        bar.total = self._total(trainer) or None
        bar.n = bar.last_print_n = trainer.global_step  # steps of the whole run, not batches of this epoch
        bar.set_description(self.label, refresh=False)
        bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, self._total(trainer)
        if self.is_enabled:
            bar = self.train_progress_bar
            if self._should_update(step, bar.total or 0):
                bar.n = step
                # the logged values are device tensors: reading them waits for the device, so only as often
                # as the loggers do (log_every_n_steps), not every step
                if step % max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1)) == 0 or step == (bar.total or 0):
                    bar.set_postfix(self.get_metrics(trainer, pl_module))
                bar.refresh()
        elif total and trainer.is_global_zero and (self._first or step % max(1, round(total * self.log_fraction)) == 0
                                                   or step == total):
            self._first = False
            losses = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if "loss" in k}
            extra = "".join(f", {k} {_fmt(v)}" for k, v in losses.items())
            log.info(f"{self.label}: step {step}/{total} ({time.time() - self._t0:.0f} s{extra})")
