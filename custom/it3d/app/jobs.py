"""App jobs: one photo, one method, one trial -- on disk, so a restarted app finds every job again.

A job lives in ``<out>/runs/<id>/`` (the layout of a batch input, :mod:`it3d.eval.runner`):
``job.json`` (method, preset, config files, overrides, the photo), ``input/<photo>``, ``status.json``
(when it was queued, started and finished, the worker's exit code, cancelled or not),
``logs/app-worker.log`` and everything
:func:`it3d.eval.runner.process_input` writes (``trial/``, ``state.json``, ``result.json``, ``report.html``,
``done.json``). A job runs as ``python -m it3d.app.worker <run dir>`` -- the same launches as
``python -m it3d.batch``, so the same code as ``launch.py`` -- in its own process group, one per slot
(GPU, or the CPU); the others wait in a FIFO queue. A job's state is read from its files:

``done`` (done.json) > ``running`` / ``queued`` (this app's scheduler) > ``cancelled`` (status.json) >
``failed`` (result.json says so, or the worker exited non-zero) > ``interrupted`` (started, never ended:
the app or the machine died) > ``queued`` (queued by an app that stopped; a new app queues it again).
``failed``, ``cancelled`` and ``interrupted`` jobs can be resumed: the worker continues the same trial
(finished steps and stages are skipped, the interrupted stage resumes from its last checkpoint).
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Deque, Dict, List, Optional

from ..core import io
from ..core.errors import It3dError
from ..eval import runner
from . import presets

log = logging.getLogger("it3d.app")
MIN_SIDE = 32


def runs_dir(out: str) -> str:
    return os.path.join(out, "runs")


def read_json(path: str, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def check_photo(path: str, name: Optional[str] = None) -> None:
    """Refuse what cannot be a photo of one object, with the reason in one line."""
    from PIL import Image, UnidentifiedImageError

    import numpy as np

    name = name or os.path.basename(path)
    try:
        with Image.open(path) as im:
            im.load()
            rgba = np.asarray(im.convert("RGBA"))
            has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise It3dError(f"{name} is not an image ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        f"upload a PNG, JPEG or WebP photo") from None
    h, w = rgba.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise It3dError(f"{name} is {w}x{h} pixels: too small (at least {MIN_SIDE} px a side)")
    if has_alpha and rgba[..., 3].max() == 0:
        raise It3dError(f"no object found in {name}: the image is fully transparent (its alpha channel is empty)")
    rgb = rgba[..., :3][rgba[..., 3] > 0] if has_alpha else rgba[..., :3].reshape(-1, 3)
    if rgb.size == 0 or float(rgb.astype(np.float32).std(0).max()) < 1.0:
        raise It3dError(f"no object found in {name}: the image is one flat colour")


def new_job(out: str, photo: str, method: str, preset: str, overrides: List[str], upload_name: str = "",
            launch_cmd: Optional[List[str]] = None) -> str:
    """Check the photo and the overrides, make the job's folder; returns the job id. ``launch_cmd``: instead of
    ``launch.py`` (tests: :data:`it3d.testing.tiny_eval.FAKE_LAUNCH`)."""
    upload_name = os.path.basename(upload_name or photo)
    check_photo(photo, upload_name)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        raise It3dError(f"advanced settings: '{bad[0]}' is not key=value (e.g. stage.coarse.trainer.max_steps=500)")
    configs = presets.config_files(method, preset)
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.splitext(upload_name)[0])[:40] or "photo"
    job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}"
    k = 1
    while os.path.exists(os.path.join(runs_dir(out), job_id)):
        k += 1
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}-{k}"
    run_dir = os.path.join(runs_dir(out), job_id)
    image = os.path.join(run_dir, "input", stem + (os.path.splitext(upload_name)[1].lower() or ".png"))
    os.makedirs(os.path.dirname(image))
    shutil.copyfile(photo, image)
    job = {"id": job_id, "method": method, "preset": preset, "config": configs, "overrides": list(overrides),
           "image": image, "upload_name": upload_name, "created": time.time()}
    if launch_cmd:
        job["launch_cmd"] = list(launch_cmd)
    io.write_text(os.path.join(run_dir, "job.json"), json.dumps(job, indent=1))
    return job_id


def load_job(run_dir: str) -> Dict:
    job = read_json(os.path.join(run_dir, "job.json"))
    if not job:
        raise It3dError(f"{run_dir}: no job.json (not an app job)")
    return job


def bench_config(job: Dict, out: str) -> runner.BenchConfig:
    lpips, clip = presets.eval_models(job["preset"])
    bc = runner.BenchConfig(config=list(job["config"]), inputs=os.path.dirname(job["image"]), out=out,
                            overrides=list(job["overrides"]), lpips=lpips, clip=clip, max_views=8)
    if job.get("launch_cmd"):
        bc.launch_cmd = list(job["launch_cmd"])
    return bc


def list_jobs(out: str) -> List[str]:
    """Job ids, newest first."""
    root = runs_dir(out)
    if not os.path.isdir(root):
        return []
    ids = [d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "job.json"))]

    def created(d: str):
        return (read_json(os.path.join(root, d, "job.json"), {}) or {}).get("created", 0), d

    return sorted(ids, key=created, reverse=True)


def set_status(run_dir: str, **fields) -> Dict:
    st = read_json(os.path.join(run_dir, "status.json"), {}) or {}
    st.update(fields, updated=time.time())
    io.write_text(os.path.join(run_dir, "status.json"), json.dumps(st, indent=1))
    return st


def file_state(run_dir: str) -> str:
    """The state a job's files say it is in, when no scheduler holds it (see the module doc)."""
    if runner.is_done(run_dir):
        return "done"
    st = read_json(os.path.join(run_dir, "status.json"), {}) or {}
    if st.get("cancelled"):
        return "cancelled"
    res = read_json(os.path.join(run_dir, "result.json"), {}) or {}
    if str(res.get("status", "")).startswith("failed") or st.get("exit_code") not in (None, 0):
        return "failed"
    if st.get("started"):
        return "interrupted"
    return "queued" if st.get("queued") else "new"


class Scheduler:
    """One worker process per slot (a GPU id, or None for the CPU); the other jobs wait in order."""

    def __init__(self, out: str, slots: List[Optional[str]], poll_s: float = 0.5) -> None:
        self.out = os.path.abspath(out)
        self.slots = list(slots) or [None]
        self.queue: Deque[str] = collections.deque()
        self.running: Dict[str, tuple] = {}  # id -> (Popen, slot)
        self.lock = threading.Lock()
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="it3d-app-scheduler", daemon=True)

    def start(self) -> "Scheduler":
        """Queue again the jobs an earlier app left queued (oldest first), then start the loop."""
        for job_id in reversed(list_jobs(self.out)):
            if file_state(self.run_dir(job_id)) == "queued":
                self.submit(job_id)
        self._thread.start()
        return self

    def run_dir(self, job_id: str) -> str:
        return os.path.join(runs_dir(self.out), job_id)

    # ------------------------------------------------------------------ requests
    def submit(self, job_id: str) -> None:
        """Queue a new job, or resume one that is failed, cancelled or interrupted."""
        with self.lock:
            if job_id in self.queue or job_id in self.running:
                return
            run_dir = self.run_dir(job_id)
            load_job(run_dir)
            if runner.is_done(run_dir):
                raise It3dError(f"job {job_id} is finished; nothing to resume")
            set_status(run_dir, cancelled=False, queued=time.time())
            self.queue.append(job_id)

    def cancel(self, job_id: str) -> bool:
        with self.lock:
            if job_id in self.queue:
                self.queue.remove(job_id)
                set_status(self.run_dir(job_id), cancelled=True, finished=time.time())
                return True
            entry = self.running.get(job_id)
        if entry is None:
            return False
        set_status(self.run_dir(job_id), cancelled=True)
        _kill_group(entry[0])
        return True

    def state(self, job_id: str) -> Dict:
        """``{"state": ..., "position": k (1-based, queued only), "slot": ...}``."""
        with self.lock:
            if job_id in self.running:
                return {"state": "running", "slot": self.running[job_id][1]}
            if job_id in self.queue:
                return {"state": "queued", "position": list(self.queue).index(job_id) + 1, "queued": len(self.queue)}
        return {"state": file_state(self.run_dir(job_id))}

    def shutdown(self, kill: bool = True) -> None:
        self._stop.set()
        if kill:
            with self.lock:
                procs = [p for p, _ in self.running.values()]
            for p in procs:
                _kill_group(p)

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._reap()
                self._start_queued()
            except Exception:  # the scheduler must outlive one bad job
                log.exception("scheduler")
            self._stop.wait(self.poll_s)

    def _reap(self) -> None:
        with self.lock:
            finished = [(j, p) for j, (p, _) in self.running.items() if p.poll() is not None]
            for j, _ in finished:
                del self.running[j]
        for j, p in finished:
            set_status(self.run_dir(j), finished=time.time(), exit_code=p.returncode)
            log.info(f"job {j}: worker exited with {p.returncode} ({file_state(self.run_dir(j))})")

    def _start_queued(self) -> None:
        with self.lock:
            busy = {s for _, s in self.running.values()}
            free = [s for s in self.slots if s not in busy]
            while free and self.queue:
                job_id, slot = self.queue.popleft(), free.pop(0)
                self.running[job_id] = (self._spawn(job_id, slot), slot)

    def _spawn(self, job_id: str, slot: Optional[str]) -> subprocess.Popen:
        run_dir = self.run_dir(job_id)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([runner.CUSTOM_DIR] + [p for p in [env.get("PYTHONPATH")] if p])
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
        logf = open(os.path.join(run_dir, "logs", "app-worker.log"), "a")
        logf.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} worker on {'GPU ' + slot if slot else 'CPU'}\n")
        logf.flush()
        p = subprocess.Popen([sys.executable, "-m", "it3d.app.worker", run_dir], stdout=logf, stderr=subprocess.STDOUT,
                             env=env, cwd=runner.REPO_ROOT, start_new_session=True, preexec_fn=_die_with_app)
        logf.close()
        set_status(run_dir, started=time.time(), finished=None, exit_code=None, pid=p.pid, slot=slot)
        log.info(f"job {job_id}: started on {'GPU ' + slot if slot else 'CPU'} (pid {p.pid})")
        return p


def _die_with_app() -> None:
    """In the worker before exec: SIGTERM when the app dies (PR_SET_PDEATHSIG), so no job runs on unwatched."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def _kill_group(p: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the worker's process group (the worker and its launch.py runs); after ``grace_s``, SIGKILL the rest."""
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    try:
        p.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
