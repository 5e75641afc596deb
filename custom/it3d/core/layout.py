"""The trial-dir layout: the one place that knows the names of the files and folders inside a trial.

A trial dir holds a run; a staged method's trial holds one stage dir per stage (``<trial>/<stage>``),
each laid out like a single-stage trial::

    configs/parsed.yaml        the resolved config (a staged trial's root holds the root's)
    stage.json                 config fingerprint and attempts (it3d.runner.stage_state)
    stats.json                 wall time and peak memory; marks the stage finished
    prepared.json              the preprocess stage's record (it3d.core.prepared.PreparedImage); later
                               stages load it (data.prepared)
    run.lock                   the process running the trial (it3d.core.lock)
    ckpts/last.ckpt, ckpts/epoch=*-step=*.ckpt
    save/                      what the system writes: save/test/turntable.mp4, save/export/, ...
    logs/csv/metrics.csv, logs/tb/, logs/progress.json, logs/step_times.json
    dry-run/                   --dry-run: plan.txt and the resolved configs

Everything else asks :class:`StageDir` (or :data:`TrialDir`, the same type) for these paths. The
names are what users see on disk and are pinned by the tests.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

LAST_CKPT = "last.ckpt"
LOCK = "run.lock"
STAGE_STATE = "stage.json"
STATS = "stats.json"
PREPARED = "prepared.json"
PROGRESS = os.path.join("logs", "progress.json")
TURNTABLE = os.path.join("test", "turntable.mp4")  # inside save/


@dataclass(frozen=True)
class StageDir:
    path: str

    def __fspath__(self) -> str:
        return self.path

    def _p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    # configs
    @property
    def configs(self) -> str:
        return self._p("configs")

    @property
    def parsed_config(self) -> str:
        return self._p("configs", "parsed.yaml")

    def is_trial(self) -> bool:
        """A trial (or stage) dir that a run wrote: it holds its resolved config."""
        return os.path.isfile(self.parsed_config)

    # state
    @property
    def state(self) -> str:
        return self._p(STAGE_STATE)

    @property
    def stats(self) -> str:
        return self._p(STATS)

    @property
    def lock(self) -> str:
        return self._p(LOCK)

    @property
    def prepared(self) -> str:
        return self._p(PREPARED)

    # checkpoints
    @property
    def ckpts(self) -> str:
        return self._p("ckpts")

    @property
    def last_ckpt(self) -> str:
        return self._p("ckpts", LAST_CKPT)

    # outputs
    @property
    def save(self) -> str:
        return self._p("save")

    @property
    def test_dir(self) -> str:
        return self._p("save", "test")

    @property
    def turntable(self) -> str:
        return self._p("save", TURNTABLE)

    @property
    def export_dir(self) -> str:
        return self._p("save", "export")

    # logs
    @property
    def logs(self) -> str:
        return self._p("logs")

    @property
    def metrics_csv(self) -> str:
        return self._p("logs", "csv", "metrics.csv")

    @property
    def progress(self) -> str:
        return self._p(PROGRESS)

    @property
    def step_times(self) -> str:
        return self._p("logs", "step_times.json")

    @property
    def dry_run(self) -> str:
        return self._p("dry-run")

    def stage(self, name: str) -> "StageDir":
        """The dir of stage ``name`` of a staged trial."""
        return StageDir(self._p(name))


TrialDir = StageDir  # a staged trial's root is laid out the same way; its stages are sub-dirs
