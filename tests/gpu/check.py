#!/usr/bin/env python
"""GPU check and speed budget: both methods, every stage, published layouts at full size, fp16 and bf16.

Not collected by pytest and never part of CI (CI has no GPU). On a CUDA machine it

1. builds full-size random-weight models in the published hub layouts (``it3d.testing``, ``size="full"``:
   SD2-base, Zero123-XL, CLIP ViT-L/14, SAM ViT-B/H, Depth Anything V2-S, BLIP-large) for exactly the
   hub ids the configs name (found by the pre-flight), under ``$IT3D_MODEL_ROOT/<hub id>`` -- the same
   resolution path a user's local copy takes;
2. runs ``launch.py --train`` of each method config in each precision with a few steps per stage at the
   papers' resolutions (coarse 128 -> 256 / 100 px, refine 800 px with the real point counts, DreamBooth
   512 px), ``$IT3D_SYNC_TIMING=1`` so each step is timed after a device sync, ``$IT3D_DTYPE_LOG`` so each
   model reports the dtype it ran in;
3. prints per stage: ms/step, peak GPU memory, finite losses, the dtypes the frozen models ran in, and the
   projected minutes at the papers' step counts (ms/step x steps + the stage's fixed cost: model loading,
   point-cloud building, class images projected to their count), then the total; and which backends were
   chosen (hash grid, point rasterizer, SDPA). ``--out DIR`` gets ``gpu_check.json`` and the run logs.

Usage::

    python tests/gpu/check.py --out /tmp/gpu                       # CUDA, full size, fp16 + bf16
    python tests/gpu/check.py --rehearsal --out /tmp/r             # CPU rehearsal: tiny configs and models

Bringing the missing packages to a machine without internet (the GPU image has torch, transformers,
lightning, scipy, scikit-image but not diffusers, omegaconf, trimesh, xatlas): on a machine with
internet, download wheels for the target's Python (here 3.12, x86-64) into ``.whl/``::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 omegaconf==2.4.0 trimesh==5.2.0 \\
        xatlas==0.0.11 importlib_metadata

copy ``.whl/`` over, and on the GPU machine::

    python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "custom"))

# hub id (as the configs name it) -> it3d.testing builder
BUILDERS = {
    "stabilityai/stable-diffusion-2-base": "sd",
    "bennyguo/zero123-xl-diffusers": "zero123",
    "openai/clip-vit-large-patch14": "clip",
    "openai/clip-vit-base-patch16": "clip-b16",
    "facebook/sam-vit-base": "sam",
    "facebook/sam-vit-huge": "sam-huge",
    "depth-anything/Depth-Anything-V2-Small-hf": "depth",
    "Salesforce/blip-image-captioning-large": "caption",
}
METHODS = {"make-it-3d": "configs/make-it-3d.yaml", "customize-it-3d": "configs/customize-it-3d.yaml"}
TINY = {"make-it-3d": "configs/tiny/make-it-3d.yaml", "customize-it-3d": "configs/tiny/customize-it-3d.yaml"}


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- the configs' own figures
def stage_figures(config: str, image: str) -> Dict[str, Dict[str, Any]]:
    """Per stage of a method config: its run type and the papers' step counts (what the projection uses)."""
    from it3d.runner.cli import import_extensions, prepare_config
    from it3d.runner.pipeline import prepare_stages

    import_extensions()
    cfg, _ = prepare_config([os.path.join(ROOT, config)], [f"data.image_path={image}", "exp_root_dir=/tmp/it3d-plan"])
    out = {}
    for spec, scfg, _ in prepare_stages(cfg, "cpu"):
        info: Dict[str, Any] = {"run": spec.run}
        if spec.run == "lightning":
            if scfg.get("data_type") == "dreambooth":
                from it3d.data.dreambooth_data import scaled_steps

                scale = float(scfg.data.get("step_scale", 1.0))
                info["steps"] = sum(scaled_steps(m["steps"], scale) for m in scfg.data.modalities)
                info["class_images"] = int(scfg.system.num_class_images) if scfg.system.get("prior_preservation", True) else 0
                info["class_steps"] = int(scfg.system.class_inference_steps)
                info["class_batch"] = int(scfg.system.class_batch_size)
            else:
                info["steps"] = int(scfg.trainer.max_steps)
                info["resolutions"] = len(scfg.get("data", {}).get("heights", []) or [])
        out[spec.name] = info
    return out


def required_ids(config: str, image: str) -> List[str]:
    from it3d.runner.cli import prepare_config
    from it3d.runner.preflight import plan_stages, required_models

    cfg, parsed = prepare_config([os.path.join(ROOT, config)], [f"data.image_path={image}", "exp_root_dir=/tmp/it3d-plan"])
    return [r.id for r in required_models(cfg, plan_stages(cfg, parsed, "cpu")) if not r.status.startswith("stage:")]


# ----------------------------------------------------------------------------- models
def build_models(model_root: str, build_root: str, ids: List[str]) -> Dict[str, float]:
    """Full-size published-layout models at ``$IT3D_MODEL_ROOT/<id>`` (symlinks to the built folders)."""
    from it3d.testing import model_dir

    unknown = [i for i in ids if i not in BUILDERS]
    if unknown:
        raise SystemExit(f"no full-size builder for {unknown}: add them to BUILDERS")
    times = {}
    for hub_id in ids:
        t0 = time.time()
        d = model_dir(BUILDERS[hub_id], "full", build_root)
        link = os.path.join(model_root, hub_id)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.islink(link):
            os.symlink(d, link)
        times[hub_id] = round(time.time() - t0, 1)
        log(f"  model {hub_id}: {times[hub_id]} s")
    return times


# ----------------------------------------------------------------------------- runs
def overrides(stages: Dict[str, Dict[str, Any]], steps: int, refine_steps: int, rehearsal: bool) -> List[str]:
    out = []
    for name, info in stages.items():
        if info["run"] != "lightning":
            continue
        s = f"stage.{name}."
        out += [s + "after_train=[]", s + "trainer.limit_val_batches=0", s + "trainer.enable_progress_bar=false",
                s + "checkpoint.every_n_train_steps=100000", s + "trainer.log_every_n_steps=1"]
        if "class_images" in info:  # dreambooth: 1/25 of the schedule; two batches of class images at the
            # config's batch size (the second one warm), 4 sampler steps each: enough to time a step
            out += [s + "data.step_scale=0.04", s + f"system.num_class_images={2 * info['class_batch']}",
                    s + "system.class_inference_steps=4"]
        elif name == "refine":
            out += [s + f"trainer.max_steps={refine_steps}"]
        else:  # coarse: both resolutions of the schedule (when it has two) are timed
            half = max(1, steps // 2)
            out += [s + f"trainer.max_steps={steps}", s + f"data.azimuth_warmup_steps={half}"]
            if info.get("resolutions", 1) == 2:
                out += [s + f"data.resolution_milestones=[{half}]"]
    return out


def read_stage(stage_dir: str) -> Dict[str, Any]:
    r: Dict[str, Any] = {}
    try:
        stats = json.load(open(os.path.join(stage_dir, "stats.json")))
        r["wall_s"] = stats.get("wall_s")
        r["peak_gb"] = None if stats.get("peak_gpu_mem_bytes") is None else round(stats["peak_gpu_mem_bytes"] / 2**30, 2)
    except (OSError, ValueError):
        r["wall_s"] = None
    try:
        t = json.load(open(os.path.join(stage_dir, "logs", "step_times.json")))
        r.update(steps=t["steps"], ms_step=t["median_ms"], ms_sum=sum(t["ms"]))
    except (OSError, ValueError, KeyError):
        pass
    try:
        rows = list(csv.DictReader(open(os.path.join(stage_dir, "logs", "csv", "metrics.csv"))))
        vals = [float(v) for row in rows for k, v in row.items() if k.startswith("train/") and v not in ("", None)]
        r["finite"] = bool(vals) and all(math.isfinite(v) for v in vals)
    except (OSError, ValueError):
        r["finite"] = None
    try:
        r["class_images"] = json.load(open(os.path.join(stage_dir, "save", "class_images", "timing.json")))
    except (OSError, ValueError):
        pass
    return r


def dtypes(log_path: str) -> Dict[str, List[str]]:
    """model (folder or id) -> the sorted set of weight dtypes it ran with (top-level calls)."""
    out: Dict[str, set] = {}
    try:
        for line in open(log_path):
            rec = json.loads(line)
            if rec["part"]:
                continue
            name = rec["model"].split("/models/")[-1] + (f"/{rec['subfolder']}" if rec["subfolder"] else "")
            out.setdefault(name, set()).add(rec["param_dtype"] + ("+autocast" if rec["autocast"] else ""))
    except OSError:
        pass
    return {k: sorted(v) for k, v in sorted(out.items())}


def run_method(method: str, config: str, precision: str, image: str, work: str, env: Dict[str, str],
               figures: Dict[str, Dict[str, Any]], steps: int, refine_steps: int, rehearsal: bool,
               timeout: float, extra: List[str] = ()) -> Dict[str, Any]:
    out_root = os.path.join(work, "runs", f"{method}-{precision}")
    shutil.rmtree(out_root, ignore_errors=True)
    dlog = os.path.join(out_root, "dtypes.jsonl")
    os.makedirs(out_root, exist_ok=True)
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), "--config", os.path.join(ROOT, config), "--train",
           "use_timestamp=false", f"exp_root_dir={out_root}", f"precision={precision}", f"data.image_path={image}",
           "tag=run", *overrides(figures, steps, refine_steps, rehearsal)]
    if not rehearsal:  # random BLIP weights caption nothing; the prompts and DreamBooth's class need words
        cmd.append("data.preprocess.caption=a photo of a teddy bear on a table")
    cmd += list(extra)
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env={**env, "IT3D_DTYPE_LOG": dlog}, capture_output=True, text=True,
                           timeout=max(10.0, timeout))
        rc, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = "timeout", (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    with open(os.path.join(out_root, "stderr.log"), "w") as f:
        f.write(err)
    trial = next((os.path.join(out_root, d, "run") for d in os.listdir(out_root)
                  if os.path.isdir(os.path.join(out_root, d, "run"))), None)
    stages = {name: read_stage(os.path.join(trial, name)) if trial else {} for name in figures}
    result = {"method": method, "precision": precision, "rc": rc, "wall_s": round(time.time() - t0, 1),
              "stages": stages, "dtypes": dtypes(dlog),
              "error": None if rc == 0 else [l for l in err.strip().splitlines() if l.strip()][-3:]}
    return result


# ----------------------------------------------------------------------------- projection and table
def project(stage: Dict[str, Any], info: Dict[str, Any]) -> Optional[float]:
    """Minutes at the papers' settings: steps x ms/step + the stage's fixed cost (class images scaled)."""
    if stage.get("wall_s") is None:
        return None
    if info["run"] != "lightning" or "ms_step" not in stage:
        return stage["wall_s"] / 60.0
    fixed = stage["wall_s"] - stage.get("ms_sum", 0.0) / 1000.0
    ci = stage.get("class_images")
    if ci and info.get("class_images"):
        fixed += class_image_seconds(ci, info) - ci["seconds"]
    return (info["steps"] * stage["ms_step"] / 1000.0 + max(0.0, fixed)) / 60.0


def class_image_seconds(ci: Dict[str, Any], info: Dict[str, Any]) -> float:
    """Seconds the papers' class images take, from a run's ``class_images/timing.json``: the pipeline's load,
    then per batch of the config's size its sampler steps at the measured per-step time plus the rest of a
    batch (prompt encoding, VAE decode), both read off the step stamps of the run's last full batch (the
    first pays kernel selection and allocation). A timing without stamps (older runs): the average per
    image and step, load included."""
    n, steps = info["class_images"], info["class_steps"]
    batch = info.get("class_batch") or ci.get("batch_size") or 1
    stamped = [b for b in ci.get("batches", []) if len(b.get("step_ends", [])) >= 2]
    if not stamped:
        return ci["seconds"] / max(1, ci["images"] * ci["steps"]) * n * steps
    full = max(b["images"] for b in stamped)
    b = [b for b in stamped if b["images"] == full][-1]
    ends = b["step_ends"]
    per_step = (ends[-1] - ends[0]) / (len(ends) - 1)
    rest = max(0.0, b["seconds"] - len(ends) * per_step)
    # a batch measured smaller than the config's: time in proportion to images (an upper bound on a GPU)
    per_batch = (steps * per_step + rest) * batch / b["images"]
    return ci.get("load_seconds", 0.0) + math.ceil(n / batch) * per_batch


def table(results: List[Dict[str, Any]], figures: Dict[str, Dict[str, Dict[str, Any]]]) -> str:
    head = f"{'method':16} {'prec':5} {'stage':11} {'steps':>5} {'ms/step':>8} {'paper':>6} {'setup s':>8} " \
           f"{'proj min':>8} {'peak GB':>8} {'finite':>6}"
    lines = [head, "-" * len(head)]
    for res in results:
        total = 0.0
        for name, info in figures[res["method"]].items():
            st = res["stages"].get(name, {})
            proj = project(st, info)
            total += proj or 0.0
            setup = None if st.get("wall_s") is None else st["wall_s"] - st.get("ms_sum", 0.0) / 1000.0
            lines.append(f"{res['method']:16} {res['precision']:5} {name:11} {st.get('steps', '-')!s:>5} "
                         f"{st.get('ms_step', '-')!s:>8} {info.get('steps', '-')!s:>6} "
                         f"{'-' if setup is None else f'{setup:.1f}':>8} {'-' if proj is None else f'{proj:.2f}':>8} "
                         f"{st.get('peak_gb', '-')!s:>8} {st.get('finite', '-')!s:>6}")
        lines.append(f"{res['method']:16} {res['precision']:5} {'TOTAL':11} {'':>5} {'':>8} {'':>6} {'':>8} "
                     f"{total:8.2f}   rc={res['rc']}")
    return "\n".join(lines)


def backends(device: str) -> Dict[str, Any]:
    import torch

    info: Dict[str, Any] = {"torch": torch.__version__, "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["sdpa_flash"] = torch.backends.cuda.flash_sdp_enabled()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        from it3d.encodings.factory import build_encoding

        enc = build_encoding({"otype": "HashGrid"}).to(device)
        info["hash_grid"] = getattr(enc, "backend", None) or getattr(enc, "backend_name", None) or "torch"
    except Exception as e:  # report, don't stop the check
        info["hash_grid"] = f"error: {e}"
    try:
        from it3d.renderers.point_rasterizer import pytorch3d_available

        info["point_rasterizer"] = "pytorch3d" if device.startswith("cuda") and pytorch3d_available() else "torch"
    except Exception as e:
        info["point_rasterizer"] = f"error: {e}"
    for mod in ("tinycudann", "nerfacc", "pytorch3d"):
        try:
            __import__(mod)
            info[mod] = True
        except ImportError:
            info[mod] = False
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/it3d-gpu-check")
    p.add_argument("--precisions", default="fp16,bf16")
    p.add_argument("--methods", default="make-it-3d,customize-it-3d")
    p.add_argument("--steps", type=int, default=40, help="coarse steps per run (half at each resolution)")
    p.add_argument("--refine-steps", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=420.0, help="start no run past this many seconds")
    p.add_argument("--deadline-s", type=float, default=540.0, help="kill a run still going at this many seconds")
    p.add_argument("--rehearsal", action="store_true", help="CPU rehearsal: the tiny configs with tiny models")
    p.add_argument("--work", default="/tmp/it3d-gpu-work")
    p.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every run")
    a = p.parse_args(argv)
    t_start = time.time()
    os.makedirs(a.out, exist_ok=True)
    import torch

    device = "cuda" if torch.cuda.is_available() and not a.rehearsal else "cpu"
    info = backends(device)
    log(f"backends: {json.dumps(info)}")
    image = os.path.join(a.work, "img", "photo.png")  # a lone copy: every preprocessing estimator runs
    os.makedirs(os.path.dirname(image), exist_ok=True)
    shutil.copy(os.path.join(ROOT, "load", "synthetic", "rgba.png"), image)
    configs = TINY if a.rehearsal else METHODS
    methods = [m for m in a.methods.split(",") if m]
    figures = {m: stage_figures(configs[m], image) for m in methods}
    paper = {m: stage_figures(METHODS[m], image) for m in methods}  # the papers' steps, also in a rehearsal
    env = dict(os.environ, HF_HUB_OFFLINE="1", IT3D_SYNC_TIMING="1")
    report: Dict[str, Any] = {"backends": info, "paper_steps": paper, "runs": []}
    if not a.rehearsal:
        model_root = os.path.join(a.work, "models")
        ids = sorted({i for m in methods for i in required_ids(METHODS[m], image)})
        log(f"building {len(ids)} full-size models: {ids}")
        report["build_s"] = build_models(model_root, os.path.join(a.work, "built"), ids)
        env["IT3D_MODEL_ROOT"] = model_root
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    for precision in [x for x in a.precisions.split(",") if x]:
        for method in methods:
            left = a.budget_s - (time.time() - t_start)
            if left < 30:
                log(f"skipped {method} {precision}: budget spent")
                report["runs"].append({"method": method, "precision": precision, "rc": "skipped", "stages": {}})
                continue
            log(f"run {method} {precision} ({left:.0f} s left)")
            res = run_method(method, configs[method], precision, image, a.work, env, figures[method], a.steps,
                             a.refine_steps, a.rehearsal, a.deadline_s - (time.time() - t_start), a.extra)
            report["runs"].append(res)
            log(json.dumps({k: v for k, v in res.items() if k != "dtypes"}))
            log(f"  dtypes: {json.dumps(res['dtypes'])}")
            with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
                json.dump(report, f, indent=1)
            if res["rc"] != 0:
                shutil.copy(os.path.join(a.work, "runs", f"{method}-{precision}", "stderr.log"),
                            os.path.join(a.out, f"stderr-{method}-{precision}.log"))
    ran = [r for r in report["runs"] if r["rc"] != "skipped"]
    text = table(ran, paper)
    log("\nprojected at the papers' step counts (ms/step x paper steps + fixed cost per stage):\n" + text)
    with open(os.path.join(a.out, "gpu_table.txt"), "w") as f:
        f.write(json.dumps(info) + "\n\n" + text + "\n")
    ok = all(r["rc"] == 0 and all(s.get("finite") is not False for s in r["stages"].values()) for r in ran)
    log(f"check {'passed' if ok and ran else 'FAILED'} in {time.time() - t_start:.0f} s")
    return 0 if ok and ran else 1


if __name__ == "__main__":
    sys.exit(main())
