"""What the page shows about a job, read from the files its run writes.

* stages: the ``stages`` of ``trial/configs/parsed.yaml`` (written when the run starts); a stage is done
  when its ``stats.json`` exists (its wall time), the current one reports ``logs/progress.json``
  (:mod:`it3d.core.progress`: phase, step / total, ETA, the innermost task);
* the latest validation image: the newest ``<stage>/save/it<step>-val/*.png`` or ``save/it<step>-*.png``;
* results: the last stage's ``save/test/turntable.mp4`` and ``save/export/`` files, ``report.html``;
  :func:`downloads` copies them under ``downloads/`` with the photo's name (GLB, OBJ + MTL + texture as a
  zip, PLY, the report with the files it shows as a zip).
"""
from __future__ import annotations

import glob
import html
import json
import os
import re
import shutil
import time
import zipfile
from typing import Dict, List, Optional

from ..core import progress
from ..core.layout import StageDir
from ..eval import outputs
from ..eval.runner import STEPS, is_done

LAST_LINES = 3


def _read(path: str) -> Dict:
    try:
        with open(path) as f:
            return json.load(f) or {}
    except (OSError, ValueError):
        return {}


def stages(trial: str) -> List[Dict]:
    names: List[str] = []
    parsed = StageDir(trial).parsed_config
    if os.path.isfile(parsed):
        from omegaconf import OmegaConf

        names = [str(s.get("name")) for s in (OmegaConf.load(parsed).get("stages") or []) if hasattr(s, "get")]
    out = []
    for n in names:
        sdir = os.path.join(trial, n)
        stats = _read(StageDir(sdir).stats)
        out.append({"name": n, "dir": sdir, "done": bool(stats), "wall_s": stats.get("wall_s"),
                    "progress": progress.read(sdir)})
    return out


_VAL = re.compile(r"it(\d+)-(?:val/\d+|\d+)\.png$")


def latest_validation(trial: str) -> Optional[str]:
    found = [p for p in glob.glob(os.path.join(trial, "*", "save", "it*-val", "*.png"))
             + glob.glob(os.path.join(trial, "*", "save", "it*-*.png")) if _VAL.search(p.replace(os.sep, "/"))]
    return max(found, key=lambda p: (os.path.getmtime(p), p)) if found else None


def results(run_dir: str) -> Dict[str, Optional[str]]:
    """The last stage's turntable, GLB, OBJ (+ MTL, texture), PLY, and the trial's report (paths or None)."""
    trial = os.path.join(run_dir, "trial")
    dirs = outputs.stage_dirs(trial) if os.path.isdir(trial) else []
    last = next((d for d in reversed(dirs) if os.path.isdir(os.path.join(d, "save", "export"))), None)
    export = os.path.join(last, "save", "export") if last else ""

    def f(name: str) -> Optional[str]:
        p = os.path.join(export, name)
        return p if export and os.path.isfile(p) else None

    render = outputs.render_stage(trial) if dirs else None
    report = os.path.join(run_dir, "report.html")
    return {"turntable": outputs.turntable(render) if render else None, "glb": f("mesh.glb"), "obj": f("mesh.obj"),
            "ply": f("points.ply"), "report": report if is_done(run_dir) and os.path.isfile(report) else None}


def _fresh(dst: str, srcs: List[str]) -> bool:
    return os.path.isfile(dst) and all(os.path.getmtime(dst) >= os.path.getmtime(s) for s in srcs)


def _zip(dst: str, files: Dict[str, str]) -> str:
    tmp = dst + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for arc, src in files.items():
            z.write(src, arc)
    os.replace(tmp, dst)
    return dst


def report_files(run_dir: str) -> Dict[str, str]:
    """report.html and every file of the run it links to, by their paths relative to the run dir."""
    report = os.path.join(run_dir, "report.html")
    with open(report, encoding="utf-8") as fh:
        text = fh.read()
    files = {"report.html": report}
    for ref in re.findall(r'(?:src|href)="([^"]+)"', text):
        ref = html.unescape(ref)
        p = os.path.normpath(os.path.join(run_dir, ref))
        local = not ref.startswith(("http:", "https:", "data:", "/")) and p.startswith(run_dir + os.sep)
        if local and os.path.isfile(p):
            files[os.path.relpath(p, run_dir)] = p
    return files


def downloads(run_dir: str, stem: str) -> List[str]:
    """``downloads/<stem>.glb``, ``<stem>_obj.zip``, ``<stem>.ply``, ``<stem>_report.zip`` (made once, remade when
    their sources change); the ones that can be made."""
    r = results(run_dir)
    out_dir = os.path.join(run_dir, "downloads")
    os.makedirs(out_dir, exist_ok=True)
    made = []
    for key, ext in (("glb", ".glb"), ("ply", ".ply")):
        if r[key]:
            dst = os.path.join(out_dir, stem + ext)
            if not _fresh(dst, [r[key]]):
                shutil.copyfile(r[key], dst + ".tmp")
                os.replace(dst + ".tmp", dst)
            made.append(dst)
    if r["obj"]:
        folder = os.path.dirname(r["obj"])
        files = {n: os.path.join(folder, n) for n in ("mesh.obj", "mesh.mtl", "mesh_texture.png")
                 if os.path.isfile(os.path.join(folder, n))}
        dst = os.path.join(out_dir, f"{stem}_obj.zip")
        made.append(dst if _fresh(dst, list(files.values())) else _zip(dst, files))
    if r["report"]:
        files = report_files(run_dir)
        dst = os.path.join(out_dir, f"{stem}_report.zip")
        made.append(dst if _fresh(dst, list(files.values())) else _zip(dst, files))
    return made


def view(run_dir: str, sched: Dict) -> Dict:
    """Everything the page shows about one job (see :func:`status_html`)."""
    trial = os.path.join(run_dir, "trial")
    st = _read(os.path.join(run_dir, "status.json"))
    job = _read(os.path.join(run_dir, "job.json"))
    v: Dict = {"id": job.get("id", os.path.basename(run_dir)), "state": sched["state"],
               "position": sched.get("position"), "queued": sched.get("queued"), "slot": sched.get("slot"),
               "stages": stages(trial), "method": job.get("method"), "preset": job.get("preset")}
    now = time.time()
    if st.get("started"):
        end = st.get("finished") if v["state"] != "running" and st.get("finished") else now
        v["elapsed_s"] = max(0.0, end - st["started"])
    cur = next((s for s in v["stages"] if not s["done"]), None)
    v["current"] = cur["name"] if cur else None
    p = (cur or {}).get("progress") or {}
    if v["state"] == "running" and p:
        eta = p.get("eta_s")
        v.update(phase=p.get("phase"), step=p.get("step"), total=p.get("total"), task=p.get("task"),
                 eta_s=None if eta is None else max(0.0, eta - (now - p.get("updated", now))))
    steps = _read(os.path.join(run_dir, "state.json"))
    if v["state"] == "running" and cur is None and all(s in steps for s in STEPS):
        v["phase"] = "evaluating"
    res = _read(os.path.join(run_dir, "result.json"))
    if v["state"] == "failed":
        v["error"] = res.get("status") if str(res.get("status", "")).startswith("failed") else \
            f"the worker exited with code {st.get('exit_code')}: " + " / ".join(_tail(run_dir))
    v["val_image"] = latest_validation(trial)
    return v


def _tail(run_dir: str) -> List[str]:
    try:
        with open(os.path.join(run_dir, "logs", "app-worker.log"), errors="replace") as f:
            lines = [ln.strip() for ln in f.read()[-8192:].splitlines() if ln.strip()]
    except OSError:
        return []
    return lines[-LAST_LINES:]


STATE_TEXT = {"queued": "queued", "running": "running", "done": "finished", "failed": "failed",
              "cancelled": "cancelled", "interrupted": "interrupted (the app or the machine stopped while it ran)",
              "new": "not started"}


def status_html(v: Optional[Dict]) -> str:
    """The status block; its data-* attributes carry the same figures for scripts and tests."""
    if not v:
        return '<div id="it3d-status" data-state="none"><p>No run selected: upload a photo and press Start.</p></div>'
    e = html.escape
    attrs = {"state": v["state"], "job": v["id"], "stage": v.get("current") or "", "phase": v.get("phase") or "",
             "step": v.get("step") if v.get("step") is not None else "", "total": v.get("total") or ""}
    head = f"<b>{e(STATE_TEXT.get(v['state'], v['state']))}</b>"
    if v["state"] == "queued":
        head += f": position {v.get('position')} of {v.get('queued')} in the queue (one job per GPU)"
    if v["state"] == "running":
        head += f" on {'GPU ' + str(v['slot']) if v.get('slot') is not None else 'the CPU'}"
    if v.get("elapsed_s") is not None:
        head += f" · elapsed {progress.fmt_s(v['elapsed_s'])}"
    if v.get("eta_s") is not None:
        head += f" · {e(v.get('current') or '')} ETA {progress.fmt_s(v['eta_s'])}"
    rows = []
    for s in v["stages"]:
        if s["done"]:
            cell = f"done in {progress.fmt_s(s['wall_s'])}"
        elif s["name"] == v.get("current") and v["state"] == "running":
            cell = _running_cell(v)
        elif s["name"] == v.get("current"):
            cell = "stopped here"
        else:
            cell = "waiting"
        rows.append(f"<tr><td>{e(s['name'])}</td><td>{cell}</td></tr>")
    if v["state"] == "running" and not v["stages"]:
        rows.append("<tr><td colspan=2>starting (loading the method, checking its models)</td></tr>")
    if v.get("phase") == "evaluating":
        rows.append("<tr><td>report</td><td>evaluating the renders</td></tr>")
    err = f'<p class="it3d-error" style="color:#b00">{e(v["error"])}</p>' if v.get("error") else ""
    data = " ".join(f'data-{k}="{e(str(x))}"' for k, x in attrs.items())
    about = " · ".join(e(str(x)) for x in (v["id"], v.get("method"), v.get("preset")) if x)
    return (f'<div id="it3d-status" {data}><p>{head}</p><table>{"".join(rows)}</table>{err}'
            f'<p style="color:#777;font-size:12px">run {about}</p></div>')


def _running_cell(v: Dict) -> str:
    e = html.escape
    phase, step, total = v.get("phase") or "starting", v.get("step"), v.get("total")
    cell = e(phase)
    if step is not None and total:
        cell += f" {step} / {total} <progress value=\"{step}\" max=\"{total}\"></progress>"
    task = v.get("task") or {}
    if task.get("desc"):
        of = f" / {task['total']}" if task.get("total") else ""
        cell += f"<br><small>{e(task['desc'])} {task.get('n', 0)}{of}</small>"
    return cell
