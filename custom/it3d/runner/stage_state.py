"""What a trial dir remembers about each of its stages.

``<stage>/stage.json`` is written when a stage starts: the fingerprint of its config (and of its
input files, and of the stage before it), the config it was computed from, and one entry per
attempt (a first run, then each resume) with its wall time so far -- updated whenever a
checkpoint is saved, so the time of a killed attempt counts up to its last saved progress.
``<stage>/stats.json`` is written last and marks the stage finished: wall time over all attempts,
peak memory.

A re-run on the same trial dir must not mix configs: :func:`check_unchanged` refuses, naming the
first keys that differ, when a started or finished stage would now get a different config.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from ..core import io
from ..core.errors import ConfigError
from ..core.layout import STAGE_STATE, STATS as STATS_FILE

STATE, STATS = STAGE_STATE, STATS_FILE
# keys that say where or how verbosely a stage runs, not what it computes
IGNORED = {"trial_dir", "stage_dirs", "resume", "stages", "stage", "timestamp", "use_timestamp", "exp_root_dir",
           "n_gpus", "name", "tag", "description", "after_train", "system.device", "data.device",
           "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps"}
INPUT_KEYS = ("image_path", "mask_path", "depth_path", "normal_path")


def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if isinstance(node, dict) and node:
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = node
    return out


def _file_digest(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stage_config(scfg: DictConfig, trial_dir: str, previous: Optional[str] = None) -> Dict[str, Any]:
    """The flat ``{dotted key: value}`` a stage's fingerprint is computed from (paths inside the trial
    dir written relative to it, so a moved trial keeps its fingerprints)."""
    container = OmegaConf.to_container(scfg, resolve=True, throw_on_missing=False)
    flat = _flatten(container)
    root = os.path.abspath(trial_dir)
    out: Dict[str, Any] = {}
    for key, value in flat.items():
        if key in IGNORED or key.split(".")[0] in IGNORED:
            continue
        if isinstance(value, str) and value.startswith(root):
            value = "<trial>" + value[len(root):]
        out[key] = value
    for key in INPUT_KEYS:  # the same path with a new picture in it is a new input
        path = flat.get(f"data.{key}")
        if isinstance(path, str) and os.path.isfile(path) and not os.path.abspath(path).startswith(root + os.sep):
            out[f"data.{key} (file contents)"] = _file_digest(path)
    if previous:
        out["(the stage before it)"] = previous
    return out


def fingerprint(flat: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:20]


def read_state(stage_dir: str) -> Dict[str, Any]:
    try:
        with open(os.path.join(stage_dir, STATE), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _short(v: Any) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:28] + "..." + s[-28:]


def differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    keys = sorted(set(old) | set(new), key=lambda k: (k.endswith(")"), k))  # plain keys first
    missing = "(not set)"
    return [f"{k}: {_short(old.get(k, missing))} -> {_short(new.get(k, missing))}"
            for k in keys if old.get(k, missing) != new.get(k, missing)]


def check_unchanged(stage_dir: str, name: str, flat: Dict[str, Any]) -> None:
    """Stop with one line when this stage was started or finished with another config."""
    state = read_state(stage_dir)
    if not state.get("fingerprint") or state["fingerprint"] == fingerprint(flat):
        return
    diff = differences(state.get("config") or {}, flat)
    more = f" (and {len(diff) - 2} more)" if len(diff) > 2 else ""
    what = "finished" if is_done(stage_dir) else "started"
    raise ConfigError(f"stage '{name}' of {os.path.dirname(stage_dir)} was {what} with a different config: "
                      f"{'; '.join(diff[:2]) or 'its inputs changed'}{more}; use a new trial dir, or delete "
                      f"{stage_dir} (and the stages after it) to redo it")


def is_done(stage_dir: str) -> bool:
    return os.path.isfile(os.path.join(stage_dir, STATS))


def _write_state(stage_dir: str, state: Dict[str, Any]) -> None:
    io.write_text(os.path.join(stage_dir, STATE), json.dumps(state, indent=1, sort_keys=True) + "\n")


class Attempt:
    """One run of a stage: recorded in ``stage.json`` at the start and at every checkpoint."""

    def __init__(self, stage_dir: str, flat: Dict[str, Any]) -> None:
        self.stage_dir = stage_dir
        self.t0 = time.time()
        os.makedirs(stage_dir, exist_ok=True)
        state = read_state(stage_dir)
        self.previous = [a for a in state.get("attempts", []) if isinstance(a, dict)]
        self.state = {"fingerprint": fingerprint(flat), "config": flat,
                      "attempts": self.previous + [self._entry()]}
        _write_state(stage_dir, self.state)

    def _entry(self) -> Dict[str, Any]:
        return {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.t0)),
                "wall_s": round(time.time() - self.t0, 3), "peak_rss_bytes": _peak_rss(),
                "peak_gpu_mem_bytes": _peak_gpu()}

    def beat(self) -> None:
        self.state["attempts"][-1] = self._entry()
        _write_state(self.stage_dir, self.state)

    def finish(self) -> Dict[str, Any]:
        """Write ``stats.json`` (the stage is finished): totals over every attempt."""
        self.beat()
        attempts = self.state["attempts"]
        gpu = [a["peak_gpu_mem_bytes"] for a in attempts if a.get("peak_gpu_mem_bytes") is not None]
        stats = {"wall_s": round(sum(float(a.get("wall_s", 0)) for a in attempts), 3),
                 "attempts": len(attempts),
                 "peak_rss_bytes": max(int(a.get("peak_rss_bytes") or 0) for a in attempts),
                 "peak_gpu_mem_bytes": max(gpu) if gpu else None}
        io.write_text(os.path.join(self.stage_dir, STATS), json.dumps(stats, indent=2) + "\n")
        return stats

    def callback(self):
        """A Lightning callback that records this attempt whenever a checkpoint is saved."""
        from lightning.pytorch.callbacks import Callback

        attempt = self

        class _Beat(Callback):
            def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
                attempt.beat()

        return _Beat()


def _peak_rss() -> int:
    """The process's peak RSS so far (it cannot be reset between stages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_gpu() -> Optional[int]:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
