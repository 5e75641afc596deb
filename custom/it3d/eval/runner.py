"""Benchmark runner: run a method config on a folder of inputs, evaluate, tabulate, report.

    PYTHONPATH=custom python -m it3d.eval.runner --config configs/make-it-3d.yaml \\
        --inputs /work/shared/data/realfusion15 --out outputs/bench [--shard i/n] [--gpus 0,1] \\
        [--names a,b] [--lpips DIR] [--clip ID_OR_DIR] [key=value overrides for the method...]

Inputs use the RealFusion15 layout: ``<inputs>/<name>/rgba.png`` (depth.png / normal.png
optional). For each input (``<out>/runs/<name>/``) the runner calls ``launch.py --train``,
``--test`` and ``--export`` as subprocesses (logs appended to ``logs/<step>.log``; each finished step is
recorded in ``state.json`` and not run again), evaluates the renders (:mod:`it3d.eval.metrics`),
writes ``result.json``, ``media.json``, ``report.html`` and finally ``done.json``: an input with
``done.json`` is skipped by later invocations. The inputs folder is only read.

``--shard i/n`` (1-based) takes every n-th of the sorted names starting at the i-th, so a SLURM
array (``--shard $((SLURM_ARRAY_TASK_ID+1))/$SLURM_ARRAY_TASK_COUNT``) or Ray tasks can share
one ``--out``. ``--gpus 0,1`` runs one worker per GPU (``CUDA_VISIBLE_DEVICES`` set per
subprocess, inputs queued); without CUDA the inputs run one after another on the CPU.
After its inputs, each invocation rewrites ``results.csv``, ``results.md`` and ``report.html``
from every finished run in ``<out>`` (``python -m it3d.eval.report --out OUT`` does it alone).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

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
    shard: tuple = (1, 1)
    gpus: Optional[List[str]] = None
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


def parse_shard(text: str) -> tuple:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise It3dError(f"--shard {text}: expected i/n, e.g. 1/4") from None
    if not (n >= 1 and 1 <= i <= n):
        raise It3dError(f"--shard {text}: need 1 <= i <= n")
    return i, n


def shard_names(names: Sequence[str], i: int, n: int) -> List[str]:
    """Deterministic split: the sorted names i-1, i-1+n, i-1+2n, ..."""
    return sorted(names)[i - 1:: n]


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


def process_input(bc: BenchConfig, name: str, image: str, gpu: Optional[str], suite) -> Dict:
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
        log.info(f"[{name}] {step}" + (f" on GPU {gpu}" if gpu is not None else ""))
        res = run_step(launch_command(bc, step, image, run_dir, name), env, os.path.join(run_dir, "logs", f"{step}.log"))
        if res["rc"] != 0:
            row["status"] = f"failed: {step} (exit {res['rc']}, see logs/{step}.log)"
            break
        state[step] = res
        io.write_text(state_path, json.dumps(state, indent=1))
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


def _device(gpu: Optional[str]) -> str:
    import torch

    return f"cuda:{gpu}" if gpu is not None and torch.cuda.is_available() else "cpu"


def run_benchmark(bc: BenchConfig, process: Callable = process_input) -> List[Dict]:
    """Run this shard's unfinished inputs; returns their rows (the table covers every finished run)."""
    from .metrics import EvalConfig, MetricSuite

    bc.out = os.path.abspath(bc.out)
    inputs_abs = os.path.abspath(bc.inputs)
    if bc.out == inputs_abs or bc.out.startswith(inputs_abs + os.sep):
        raise It3dError(f"--out {bc.out} is inside --inputs: inputs are read-only, choose another --out")
    check_out_dir(bc)
    images = list_inputs(bc.inputs, bc.names)
    mine = shard_names(list(images), *bc.shard)
    todo = [n for n in mine if not is_done(run_dir_of(bc.out, n))]
    for n in sorted(set(mine) - set(todo)):
        log.info(f"[{n}] already done: skipped")
    gpus = bc.gpus if bc.gpus else ([None] if _device("0") == "cpu" else ["0"])
    ecfg = EvalConfig(lpips=bc.lpips, clip=bc.clip, max_views=bc.max_views)
    jobs: "queue.Queue[str]" = queue.Queue()
    for n in todo:
        jobs.put(n)
    rows: List[Dict] = []
    lock = threading.Lock()

    def worker(gpu: Optional[str]) -> None:
        suite = MetricSuite(ecfg, _device(gpu))
        while True:
            try:
                n = jobs.get_nowait()
            except queue.Empty:
                return
            row = process(bc, n, images[n], gpu, suite)
            with lock:
                rows.append(row)

    if len(gpus) == 1:
        worker(gpus[0])
    else:
        threads = [threading.Thread(target=worker, args=(g,), daemon=True) for g in gpus]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    from .report import rebuild

    rebuild(bc.out)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m it3d.eval.runner", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, nargs="+", help="method config(s), merged in order")
    p.add_argument("--inputs", required=True, help="folder of <name>/rgba.png inputs (read only)")
    p.add_argument("--out", required=True, help="benchmark output folder")
    p.add_argument("--shard", default="1/1", help="i/n: run the i-th of n deterministic shards (1-based)")
    p.add_argument("--gpus", default=None, help="GPU ids, one worker each (default: 0 with CUDA, else CPU)")
    p.add_argument("--names", default=None, help="comma-separated subset of input names")
    p.add_argument("--lpips", default=DEFAULT_LPIPS,
                   help="LPIPS weights dir, or an id under $IT3D_MODEL_ROOT (see it3d.eval.lpips)")
    p.add_argument("--clip", default=DEFAULT_CLIP, help="CLIP hub id or local dir")
    p.add_argument("--max-views", type=int, default=24, help="novel views used by CLIP / contextual (0 = all)")
    p.add_argument("--input-maps", default="", help="comma-separated maps beside rgba.png to hand to the method "
                   "instead of its own estimates: depth (data.depth_path), normal (data.normal_path)")
    p.add_argument("--launch-cmd", default=None, help=argparse.SUPPRESS)  # tests: a fake, fast pipeline
    return p


def main(argv=None) -> int:
    args, extras = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s", stream=sys.stderr)
    bad = [e for e in extras if e.startswith("-") or "=" not in e]
    if bad:
        print(f"error: unexpected argument {bad[0]} (method overrides are key=value)", file=sys.stderr)
        return 2
    try:
        bc = BenchConfig(config=args.config, inputs=args.inputs, out=args.out, overrides=extras,
                         shard=parse_shard(args.shard), names=args.names.split(",") if args.names else None,
                         gpus=[g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None,
                         lpips=args.lpips, clip=args.clip, max_views=args.max_views,
                         input_maps=[m for m in args.input_maps.split(",") if m])
        bad_maps = sorted(set(bc.input_maps) - set(outputs.INPUT_MAP_KEYS))
        if bad_maps:
            raise It3dError(f"--input-maps: unknown map '{bad_maps[0]}' (known: {', '.join(outputs.INPUT_MAP_KEYS)})")
        if args.launch_cmd:
            bc.launch_cmd = shlex.split(args.launch_cmd)
        rows = run_benchmark(bc)
    except It3dError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    print(f"{len(rows)} run(s), {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; "
          f"table: {os.path.join(bc.out, 'results.md')}, report: {os.path.join(bc.out, 'report.html')}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
