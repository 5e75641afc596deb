"""One benchmark input, start to finish: launch the method, evaluate, write the run's report.

:func:`process_input` is what one :mod:`it3d.batch` task (and one web-app job, :mod:`it3d.app`) does
for ``<out>/runs/<name>/``: it calls ``launch.py --train``, ``--test`` and ``--export`` as
subprocesses (logs appended to ``logs/<step>.log``; each finished step is recorded in ``state.json``
and not run again; ``--test`` / ``--export`` are not repeated when ``--train`` already wrote the last
stage's turntable / exports through ``after_train``), evaluates the renders
(:mod:`it3d.eval.metrics`), writes ``result.json``, ``media.json``, ``report.html`` and finally
``done.json``. Inputs use the RealFusion15 layout: ``<inputs>/<name>/rgba.png`` (depth.png /
normal.png optional); the inputs folder is only read.

Scheduling lives in :mod:`it3d.batch` (Ray), which imports this module. ``python -m it3d.eval.runner ...``
is an alias of ``python -m it3d.batch ...``: only its ``__main__`` block imports the batch package.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..core import io
from ..core.errors import It3dError
from . import outputs
from .lpips import DEFAULT_ID as DEFAULT_LPIPS
from .metrics import DEFAULT_CLIP

log = logging.getLogger("it3d.eval")
CUSTOM_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO_ROOT = os.path.dirname(CUSTOM_DIR)
STEPS = ("train", "test", "export")
GIB = 2.0 ** 30


@dataclass
class BenchConfig:
    config: List[str]
    inputs: str
    out: str
    overrides: List[str] = field(default_factory=list)
    names: Optional[List[str]] = None
    launch_cmd: List[str] = field(default_factory=lambda: [sys.executable, os.path.join(REPO_ROOT, "launch.py")])
    lpips: str = DEFAULT_LPIPS
    clip: str = DEFAULT_CLIP
    max_views: int = 24
    input_maps: List[str] = field(default_factory=list)  # e.g. ["depth", "normal"]: hand <name>/depth.png to the method


# ----------------------------------------------------------------------------- inputs
def list_inputs(inputs: str, names: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """``{name: <inputs>/<name>/rgba.png}`` for the (sorted) input folders, or the ones named."""
    if not os.path.isdir(inputs):
        raise It3dError(f"--inputs {inputs}: no such folder")
    found = {d: os.path.join(inputs, d, "rgba.png") for d in sorted(os.listdir(inputs))
             if os.path.isfile(os.path.join(inputs, d, "rgba.png"))}
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            from ..core.registry import suggest

            raise It3dError(f"--names: no input '{missing[0]}' in {inputs}{suggest(missing[0], found)}")
        found = {n: found[n] for n in sorted(set(names))}
    if not found:
        raise It3dError(f"--inputs {inputs}: no <name>/rgba.png inside")
    return found


# ----------------------------------------------------------------------------- one input
def run_dir_of(out: str, name: str) -> str:
    return os.path.join(out, "runs", name)


def is_done(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, "done.json"))


def _read_json(path: str, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


# Runs the command as ITS child, so the child's peak RSS is not polluted by this (large) process's
# forked image: wait4 reports ru_maxrss of the command (and the descendants it waited for).
# The command dies with the wrapper (PR_SET_PDEATHSIG) and the wrapper kills it when the runner
# goes away or signals it, so an interrupted benchmark leaves no orphaned training behind.
_RSS_WRAPPER = """
import ctypes, os, signal, subprocess, sys, time
def _die_with_parent():
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except Exception:
        pass
parent = os.getppid()
p = subprocess.Popen(sys.argv[2:], preexec_fn=_die_with_parent)
def _stop(*_):
    p.kill()
signal.signal(signal.SIGTERM, _stop)
signal.signal(signal.SIGINT, _stop)
while True:
    pid, st, ru = os.wait4(p.pid, os.WNOHANG)
    if pid:
        break
    if os.getppid() != parent:
        p.kill()
    time.sleep(0.2)
open(sys.argv[1], 'w').write(str(ru.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(st))
"""


def run_step(cmd: List[str], env: Dict[str, str], log_path: str) -> Dict:
    """Run one subprocess (output to ``log_path``); its wall time and peak RSS in bytes."""
    import subprocess

    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    rss_path = log_path + ".rss"
    t0 = time.time()
    with open(log_path, "a") as f:  # appended: a retried step keeps the log of the failed attempt
        f.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')}\n$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        rc = subprocess.call([sys.executable, "-c", _RSS_WRAPPER, rss_path, *cmd], stdout=f,
                             stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    wall = time.time() - t0
    try:
        with open(rss_path) as f:
            rss = int(f.read())
        os.remove(rss_path)
    except (OSError, ValueError):
        rss = None
    return {"rc": rc, "wall_s": wall, "peak_rss_bytes": rss}


def launch_command(bc: BenchConfig, mode: str, image: str, run_dir: str, name: str) -> List[str]:
    cfgs = [os.path.abspath(c) for c in bc.config]
    return (list(bc.launch_cmd) + ["--config", *cfgs, f"--{mode}", "--gpu", "0"]
            + outputs.image_overrides(image, run_dir, os.path.join(run_dir, "trial"), name, bc.input_maps)
            + list(bc.overrides))


def timing_columns(state: Dict, trial_dir: str) -> Dict[str, float]:
    """Outside-measured time per step + peak RSS, and per-stage figures from the pipeline's stats.json."""
    nan = float("nan")
    row: Dict[str, float] = {}
    for s in STEPS:
        row[f"time_{s}_s"] = state.get(s, {}).get("wall_s", nan)
    rss = [state[s]["peak_rss_bytes"] for s in STEPS if state.get(s, {}).get("peak_rss_bytes") is not None]
    row["peak_rss_gib"] = max(rss) / GIB if rss else nan
    for stage, modes in outputs.stage_stats(trial_dir).items():
        row[f"wall_s:{stage}"] = sum(float(m.get("wall_s") or 0.0) for m in modes.values() if isinstance(m, dict))
        gpu = [m.get("peak_gpu_mem_bytes") for m in modes.values() if isinstance(m, dict)]
        gpu = [g for g in gpu if g is not None]
        row[f"peak_gpu_gib:{stage}"] = max(gpu) / GIB if gpu else nan
    return row


def evaluate_run(run_dir: str, image: str, suite, row: Dict, notes: Dict[str, str]) -> Dict:
    """Metrics of one finished run; returns the media dict for the report."""
    import torch

    from .metrics import METRICS, pick_views

    trial = os.path.join(run_dir, "trial")
    stage = outputs.render_stage(trial)
    media: Dict = {"exports": outputs.exports(trial)}
    media["input_thumb"] = outputs.save_thumbnail(image, os.path.join(run_dir, "report_files", "input.png"))
    for k in METRICS:
        row[k] = float("nan")
    if stage is None:
        notes["metrics"] = "no stage rendered save/test/rgb"
        return media
    frames = outputs.frames(stage)
    media.update(render=frames[0] if frames else None, video=outputs.turntable(stage))
    for kind in ("normal", "depth"):
        fr = outputs.frames(stage, kind)
        media[kind] = [fr[i] for i in sorted({0, len(fr) // 4, len(fr) // 2})] if fr else []
    if not frames:
        notes["metrics"] = "no reference-view render (save/test/rgb/0000.png)"
        return media
    render = outputs.load_rgb(frames[0])
    size = tuple(render.shape[1:3])
    ref = outputs.reference_image(run_dir, stage, image, size)
    if ref is None:
        notes["metrics"] = "no reference image (save/test/reference.png, the datamodule, or preprocess/<stem>_rgba.png)"
        return media
    ref_rgb, ref_mask, source = ref
    media["reference"] = io.save_image(os.path.join(run_dir, "report_files", "reference.png"), ref_rgb[0])
    row["reference_source"] = source if source == "datamodule" else os.path.relpath(source, run_dir)
    views = [outputs.load_rgb(frames[i], size) for i in pick_views(len(frames), suite.cfg.max_views)]
    vals, why = suite.evaluate(render, ref_rgb, ref_mask, torch.cat(views) if views else None)
    row.update(vals)
    notes.update(why)
    return media


def last_error(log_path: str) -> str:
    """The error of the last attempt in a step log: its last ``error: ...`` line, else its last line."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            text = f.read()[-65536:]
    except OSError:
        return ""
    attempt = text.rsplit("\n==== ", 1)[-1].splitlines()[2:]  # after the header and the command line
    lines = [ln.strip() for ln in attempt if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [""])[-1][:300]


def made_by_train(trial_dir: str) -> Dict[str, bool]:
    """Which of ``--test`` / ``--export`` the ``--train`` step already did (``after_train``): the last stage holds
    its turntable / its exported files."""
    stages = outputs.stage_dirs(trial_dir)
    if not stages:
        return {"test": False, "export": False}
    last = stages[-1]
    return {"test": outputs.turntable(last) is not None,
            "export": bool(outputs.exports(trial_dir).get(os.path.basename(last)))}


def metric_device(gpu: Optional[str]) -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{gpu}" if gpu is not None else "cuda:0"


def process_input(bc: BenchConfig, name: str, image: str, gpu: Optional[str] = None, suite=None) -> Dict:
    """Run, evaluate and report one input (resuming from ``state.json``); returns its result row. ``gpu``: set
    ``CUDA_VISIBLE_DEVICES`` for the launches (None: keep this process's, as a Ray GPU task has it)."""
    run_dir = run_dir_of(bc.out, name)
    state_path = os.path.join(run_dir, "state.json")
    state = _read_json(state_path, {})
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([CUSTOM_DIR] + [p for p in [env.get("PYTHONPATH")] if p])
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    row: Dict = {"name": name, "status": "ok"}
    notes: Dict[str, str] = {}
    for step in STEPS:
        if step in state:
            continue
        if step != "train" and made_by_train(os.path.join(run_dir, "trial"))[step]:
            state[step] = {"rc": 0, "by": "train (after_train)"}  # no wall time: it is inside time_train_s
            io.write_text(state_path, json.dumps(state, indent=1))
            continue
        log.info(f"[{name}] {step}" + (f" on GPU {gpu}" if gpu is not None else ""))
        log_path = os.path.join(run_dir, "logs", f"{step}.log")
        res = run_step(launch_command(bc, step, image, run_dir, name), env, log_path)
        if res["rc"] != 0:
            err = last_error(log_path)
            row["status"] = f"failed: {step} (exit {res['rc']}, see logs/{step}.log)" + (f": {err}" if err else "")
            break
        state[step] = res
        io.write_text(state_path, json.dumps(state, indent=1))
    if suite is None:
        from .metrics import EvalConfig, MetricSuite

        suite = MetricSuite(EvalConfig(lpips=bc.lpips, clip=bc.clip, max_views=bc.max_views), metric_device(gpu))
    media: Dict = {}
    if row["status"] == "ok":
        try:
            media = evaluate_run(run_dir, image, suite, row, notes)
        except Exception as e:  # one bad run must not stop the benchmark: record it, keep going
            import traceback

            io.write_text(os.path.join(run_dir, "logs", "evaluate.log"), traceback.format_exc())
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            row["status"] = f"failed: evaluation ({msg}; see logs/evaluate.log)"
    row.update(timing_columns(state, os.path.join(run_dir, "trial")))
    gpu_cols = [v for k, v in row.items() if k.startswith("peak_gpu_gib:")]
    if not gpu_cols:
        notes["peak_gpu"] = "the pipeline wrote no <stage>/stats.json"
    elif all(v != v for v in gpu_cols):
        notes["peak_gpu"] = "not recorded by the pipeline (no CUDA)"
    row["notes"] = "; ".join(f"{k}: {v}" for k, v in notes.items())
    io.write_text(os.path.join(run_dir, "result.json"), json.dumps(row, indent=1))
    relmedia = {k: (os.path.relpath(v, run_dir) if isinstance(v, str) else
                    [os.path.relpath(x, run_dir) for x in v] if isinstance(v, list) else
                    {s: [os.path.relpath(x, run_dir) for x in fs] for s, fs in v.items()} if isinstance(v, dict) else v)
                for k, v in media.items() if v is not None}
    io.write_text(os.path.join(run_dir, "media.json"), json.dumps(relmedia, indent=1))
    from .report import load_media, write_run_report

    write_run_report(run_dir, row, load_media(run_dir))
    if row["status"] == "ok":
        io.write_text(os.path.join(run_dir, "done.json"), json.dumps({"finished": time.time()}))
    return row


# ----------------------------------------------------------------------------- benchmark
def check_out_dir(bc: BenchConfig) -> None:
    """``<out>/benchmark.json`` records the method; refuse to mix two methods in one --out."""
    meta = {"config": [os.path.abspath(c) for c in bc.config], "overrides": list(bc.overrides),
            "inputs": os.path.abspath(bc.inputs)}
    p = os.path.join(bc.out, "benchmark.json")
    old = _read_json(p, None)
    if old is not None and (old.get("config"), old.get("overrides")) != (meta["config"], meta["overrides"]):
        raise It3dError(f"--out {bc.out} holds results of {old.get('config')} {old.get('overrides')}: "
                        f"use another --out for {meta['config']} {meta['overrides']}")
    if old is None:
        io.write_text(p, json.dumps(meta, indent=1))


if __name__ == "__main__":  # ``python -m it3d.eval.runner``: the same as ``python -m it3d.batch`` (one scheduler)
    from it3d.batch.cli import main as batch_main  # an entry script's import: it3d.eval itself never imports batch

    raise SystemExit(batch_main(prog="python -m it3d.eval.runner"))
