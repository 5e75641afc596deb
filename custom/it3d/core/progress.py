"""Progress of a running stage, on disk and on the terminal.

A stage in progress keeps ``<stage dir>/logs/progress.json`` up to date (written atomically, at most
every ``MIN_INTERVAL`` seconds and at every phase change), so that anything watching the trial (the web
app, a person with ``cat``) sees what the run itself did::

    {"stage": "coarse", "phase": "train", "step": 120, "total": 5000, "started": 1718000000.0,
     "updated": 1718000042.5, "elapsed_s": 42.5, "eta_s": 1725.1, "val_step": 100,
     "task": {"desc": "building point cloud", "n": 3, "total": 11}}

``phase``: ``preprocess``, ``train``, ``test`` (turntable frames), ``export`` or ``done``; ``step`` /
``total`` count the phase's steps (training steps, test frames, export batches). ``eta_s`` comes from
the rate of the steps made in this process (a resumed run does not count the steps it skipped).
``task`` is the innermost :func:`bar` running now (point-cloud building, export, preprocessing).

:func:`bar` is the progress bar of work that is not a training loop: a tqdm bar on a terminal, silent
when stderr is not a TTY (logs, CI), and it reports to the stage's progress file when one is active
(:func:`reporting`, :class:`it3d.runner.progress_callback.ProgressCallback`). This module imports
nothing heavy: the web app reads progress files with it.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, Dict, Iterable, Iterator, Optional

from .layout import PROGRESS

FILE = PROGRESS
MIN_INTERVAL = 0.5  # seconds between two writes of the same phase


def path_of(stage_dir: str) -> str:
    return os.path.join(stage_dir, FILE)


def read(stage_dir: str) -> Optional[Dict[str, Any]]:
    """The stage's last progress record, or None (no file, or caught mid-replace on an odd filesystem)."""
    try:
        with open(path_of(stage_dir), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def eta(step: int, total: int, step0: int, elapsed: float) -> Optional[float]:
    """Seconds left at the rate of the steps made since ``step0`` (None before the first one)."""
    done = step - step0
    if done <= 0 or total <= 0:
        return None
    return max(0.0, (total - step) * elapsed / done)


def fmt_s(seconds: Optional[float]) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour on); ``?`` for unknown."""
    if seconds is None:
        return "?"
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressFile:
    """One stage's ``logs/progress.json``: :meth:`phase` starts a phase, :meth:`step` advances it."""

    def __init__(self, stage_dir: str, stage: Optional[str] = None, min_interval: float = MIN_INTERVAL) -> None:
        self.path = path_of(stage_dir)
        self.min_interval = min_interval
        self.state: Dict[str, Any] = {"stage": stage or os.path.basename(os.path.normpath(stage_dir))}
        self._last_write = 0.0
        self._t0 = time.time()
        self._step0 = 0

    def phase(self, name: str, total: int = 0, step: int = 0) -> None:
        self._t0, self._step0 = time.time(), int(step)
        self.state.update(phase=name, step=int(step), total=int(total), started=self._t0, eta_s=None)
        self.state.pop("task", None)
        self.write(force=True)

    def step(self, step: int, total: Optional[int] = None, force: bool = False) -> None:
        if total is not None:
            self.state["total"] = int(total)
        self.state["step"] = int(step)
        self.state["eta_s"] = eta(int(step), int(self.state.get("total") or 0), self._step0, time.time() - self._t0)
        self.write(force=force)

    def set(self, force: bool = False, **fields: Any) -> None:
        self.state.update(fields)
        self.write(force=force)

    def write(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_write < self.min_interval:
            return
        self._last_write = now
        self.state.update(updated=now, elapsed_s=round(now - self._t0, 3))
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:  # no fsync: a progress record is worth nothing after a crash
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.state, f)
            os.replace(tmp, self.path)
        except OSError:  # progress must never stop a run
            with contextlib.suppress(OSError):
                os.remove(tmp)


_active: Optional[ProgressFile] = None


def active() -> Optional[ProgressFile]:
    return _active


@contextlib.contextmanager
def reporting(progress: Optional[ProgressFile]) -> Iterator[Optional[ProgressFile]]:
    """Make ``progress`` the file that :func:`bar` reports to inside the block (None: leave it as it is)."""
    global _active
    if progress is None:
        yield _active
        return
    prev, _active = _active, progress
    try:
        yield progress
    finally:
        _active = prev


class Bar:
    """A counted task: a tqdm bar on a TTY (nothing otherwise), mirrored into the active progress file."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 unit: str = "it") -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.n = total, desc, 0
        self._tqdm = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
        self._report(force=True)

    def _report(self, force: bool = False) -> None:
        p = _active
        if p is not None:
            p.set(task={"desc": self.desc, "n": self.n, "total": self.total}, force=force)

    def update(self, n: int = 1, what: Optional[str] = None) -> None:
        self.n += n
        if self._tqdm is not None:
            if what:
                self._tqdm.set_postfix_str(what, refresh=False)
            self._tqdm.update(n)
        self._report(force=self.total is not None and self.n >= self.total)

    def __iter__(self):
        try:
            for item in self.iterable:  # type: ignore[union-attr]
                yield item
                self.update()
        finally:
            self.close()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        p = _active
        if p is not None and (p.state.get("task") or {}).get("desc") == self.desc:
            p.state.pop("task", None)
            p.write(force=True)

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "", unit: str = "it") -> Bar:
    """``for x in bar(xs, desc="..."):`` or ``with bar(total=n, desc="...") as b: ... b.update(what="step")``."""
    return Bar(iterable, total, desc, unit)


class Laps:
    """Named steps of one job, timed and counted on a :func:`bar`: ``t[name] = laps.lap(name)`` after each."""

    def __init__(self, desc: str, total: int) -> None:
        self.bar = Bar(total=total, desc=desc, unit="step")
        self._t0 = time.time()

    def lap(self, name: str) -> float:
        now = time.time()
        dt, self._t0 = now - self._t0, now
        self.bar.update(what=name)
        if self.bar.total is not None and self.bar.n >= self.bar.total:
            self.bar.close()
        return dt
