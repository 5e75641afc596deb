"""Checkpoints you can trust: written atomically, verified before they are used.

* :class:`AtomicCheckpointIO` (Lightning plugin) writes every checkpoint to a temp file and renames
  it, so a killed run never leaves a half-written one, and turns a load failure into one line;
* :func:`verify_checkpoint` says why a file is not a usable checkpoint (missing, empty, truncated,
  a bad CRC, not a Lightning checkpoint) or None when it is;
* :func:`newest_readable` picks the newest readable checkpoint of a ``ckpts/`` folder (``last.ckpt``,
  then ``epoch=*-step=*.ckpt`` by step, newest first; the trainer keeps the last two), saying so
  when it falls back, and stops with one line when none is readable;
* :func:`require_readable` checks a checkpoint the user named (``resume=``, ``system.weights=``).
"""
from __future__ import annotations

import glob
import logging
import os
import re
import zipfile
from typing import Any, Dict, List, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .errors import ConfigError, It3dError
from .io import atomic_path
from .layout import LAST_CKPT

log = logging.getLogger("it3d")
LAST = LAST_CKPT


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = os.fspath(path)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=False)
        except Exception:  # noqa: BLE001 - say why in one line
            why = verify_checkpoint(os.fspath(path)) or "cannot be loaded"
            raise It3dError(f"checkpoint {os.fspath(path)} is unreadable ({why})") from None


def verify_checkpoint(path: str, lightning: bool = True) -> Optional[str]:
    """None when ``path`` is a readable (Lightning, if ``lightning``) checkpoint; else why not, in a few words."""
    if not os.path.isfile(path):
        return "not found" if not os.path.isdir(path) else "a directory, not a checkpoint file"
    if os.path.getsize(path) == 0:
        return "empty file"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # reads every member and checks its CRC
        if bad is not None:
            return f"corrupt: bad checksum in {bad}"
    except zipfile.BadZipFile:
        return "truncated or not a checkpoint: no complete torch.save archive"
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means unusable
        return f"cannot be loaded: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    if lightning and not (isinstance(state, dict) and "state_dict" in state):
        return "not a Lightning checkpoint (no state_dict)"
    return None


def require_readable(path: str, key: str) -> None:
    """A checkpoint the user named: stop with one line when it is unusable."""
    why = verify_checkpoint(path, lightning=False)
    if why:
        raise ConfigError(f"{key}: {path} is unreadable ({why})" if why != "not found" else f"{key}: not found: {path}")


def _step_of(path: str) -> int:
    m = re.search(r"step=(\d+)", os.path.basename(path))
    return int(m.group(1)) if m else -1


def checkpoints(ckpt_dir: str) -> List[str]:
    """The checkpoints of a ``ckpts/`` folder, newest first: ``last.ckpt``, then by step (then mtime)."""
    found = [p for p in glob.glob(os.path.join(ckpt_dir, "*.ckpt")) if os.path.isfile(p)]
    others = sorted((p for p in found if os.path.basename(p) != LAST),
                    key=lambda p: (_step_of(p), os.path.getmtime(p)), reverse=True)
    last = [p for p in found if os.path.basename(p) == LAST]
    return last + others


def newest_readable(ckpt_dir: str) -> Optional[str]:
    """The newest readable checkpoint in ``ckpt_dir``; None when there is none at all.

    Unreadable newer ones are skipped with a warning; when every one is unreadable: one-line error.
    """
    problems = []
    for path in checkpoints(ckpt_dir):
        why = verify_checkpoint(path)
        if why is None:
            if problems:
                log.warning(f"checkpoint {problems[0][0]} is unreadable ({problems[0][1]}): using {path} instead")
            return path
        problems.append((path, why))
    if problems:
        raise It3dError(f"no readable checkpoint in {ckpt_dir}: "
                        + "; ".join(f"{os.path.basename(p)} ({why})" for p, why in problems))
    return None
