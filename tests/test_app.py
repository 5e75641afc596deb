"""The app's jobs without a browser: upload checks, the status block, and the scheduler (one job per slot, queue
positions, cancel, resume, an app restart) driving real worker processes over the fake fast pipeline."""
import os
import re
import time

import numpy as np
import pytest
from PIL import Image

from it3d.app import jobs, status
from it3d.core.errors import It3dError
from it3d.testing import tiny_eval

PHOTO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "load", "synthetic", "rgba.png")


def test_uploads_that_are_not_a_photo_of_an_object_are_refused(tmp_path):
    cases = {"notes.txt": "notes.txt is not an image", "small.png": "small.png is 20x10 pixels: too small",
             "clear.png": "no object found in clear.png: the image is fully transparent",
             "flat.jpg": "no object found in flat.jpg: the image is one flat colour"}
    (tmp_path / "notes.txt").write_text("hello")
    Image.fromarray(np.full((10, 20, 3), 128, np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.zeros((64, 64, 4), np.uint8)).save(tmp_path / "clear.png")
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "flat.jpg")
    for name, msg in cases.items():
        with pytest.raises(It3dError, match=msg):
            jobs.check_photo(str(tmp_path / name))
    jobs.check_photo(PHOTO)  # the synthetic RGBA scene is fine
    with pytest.raises(It3dError, match="not key=value"):
        jobs.new_job(str(tmp_path / "out"), PHOTO, "make-it-3d", "tiny", ["--train"])
    assert not os.path.isdir(tmp_path / "out" / "runs")  # nothing was made for a refused job


def test_status_block_shows_stage_progress_from_the_files(tmp_path):
    trial = tmp_path / "trial"
    os.makedirs(trial / "configs")
    (trial / "configs" / "parsed.yaml").write_text("stages:\n- name: preprocess\n- name: coarse\n- name: refine\n")
    os.makedirs(trial / "preprocess")
    (trial / "preprocess" / "stats.json").write_text('{"wall_s": 8.2}')
    from it3d.core import progress

    pf = progress.ProgressFile(str(trial / "coarse"))
    pf.phase("train", total=5000, step=0)
    pf.state.update(step=1200, eta_s=300.0)
    pf.write(force=True)
    os.makedirs(trial / "coarse" / "save" / "it1000-val")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(trial / "coarse" / "save" / "it1000-val" / "0.png")
    v = status.view(str(tmp_path), {"state": "running", "slot": "0"})
    assert (v["current"], v["phase"], v["step"], v["total"]) == ("coarse", "train", 1200, 5000)
    assert 295 < v["eta_s"] <= 300 and v["val_image"].endswith("it1000-val/0.png")
    html = status.status_html(v)
    assert 'data-stage="coarse"' in html and 'data-step="1200"' in html and "on GPU 0" in html
    assert "done in 0:08" in html and "train 1200 / 5000" in html
    assert re.search(r"coarse ETA (4:59|5:00)", html), html
    html = status.status_html(status.view(str(tmp_path), {"state": "queued", "position": 2, "queued": 3}))
    assert "position 2 of 3 in the queue" in html


def wait_state(sched, job, want, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = sched.state(job)
        if st["state"] == want:
            return st
        time.sleep(0.2)
    raise AssertionError(f"{job}: still {sched.state(job)} after {timeout} s, wanted {want}; worker log:\n"
                         + _log(sched, job))


def _log(sched, job):
    p = os.path.join(sched.run_dir(job), "logs", "app-worker.log")
    return open(p).read()[-3000:] if os.path.isfile(p) else "(none)"


def fake_calls(sched, job):
    p = os.path.join(sched.run_dir(job), "trial", "fake_calls.log")
    return [c.split()[0] for c in open(p).read().splitlines()] if os.path.isfile(p) else []


def alive(run_dir):
    """Processes whose command line names this run dir (the worker, its launches)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if run_dir in cmd:
            found.append(pid)
    return found


@pytest.mark.slow
def test_scheduler_queue_cancel_resume_and_restart(tmp_path, monkeypatch):
    out = str(tmp_path / "out")

    def new(name):
        return jobs.new_job(out, PHOTO, "make-it-3d", "tiny", ["seed=1"], f"{name}.png",
                            launch_cmd=tiny_eval.FAKE_LAUNCH)

    monkeypatch.setenv("IT3D_FAKE_SLEEP", "120")  # --train lasts until it is stopped
    sched = jobs.Scheduler(out, [None], poll_s=0.1).start()
    a, b = new("a"), new("b")
    sched.submit(a)
    sched.submit(b)
    wait_state(sched, a, "running")
    assert sched.state(b) == {"state": "queued", "position": 1, "queued": 1}  # one job per slot
    assert sched.cancel(b) and sched.state(b)["state"] == "cancelled"  # a queued job leaves the queue
    deadline = time.time() + 120
    while "train" not in fake_calls(sched, a):
        assert time.time() < deadline, _log(sched, a)
        time.sleep(0.2)
    assert sched.cancel(a)
    wait_state(sched, a, "cancelled")
    # the worker and its launch are gone (SIGKILL is delivered asynchronously: a dying process keeps its
    # /proc entry for a moment after cancel returns)
    deadline = time.time() + 10
    while alive(sched.run_dir(a)) and time.time() < deadline:
        time.sleep(0.1)
    assert alive(sched.run_dir(a)) == []
    monkeypatch.delenv("IT3D_FAKE_SLEEP")
    sched.submit(a)  # resume: the same trial, the killed step again
    wait_state(sched, a, "done")
    assert fake_calls(sched, a) == ["train", "train", "test", "export"]
    assert status.results(sched.run_dir(a))["obj"].endswith("refine/save/export/mesh.obj")

    # an app restart: the running job is interrupted, the queued one queued again by the new app
    monkeypatch.setenv("IT3D_FAKE_SLEEP", "120")
    c, d = new("c"), new("d")
    sched.submit(c)
    sched.submit(d)
    wait_state(sched, c, "running")
    sched.shutdown(kill=True)
    assert jobs.file_state(sched.run_dir(c)) == "interrupted" and jobs.file_state(sched.run_dir(d)) == "queued"
    monkeypatch.delenv("IT3D_FAKE_SLEEP")
    sched2 = jobs.Scheduler(out, [None], poll_s=0.1).start()
    assert sched2.state(c)["state"] == "interrupted" and sched2.state(d)["state"] in ("queued", "running")
    sched2.submit(c)
    wait_state(sched2, d, "done")
    wait_state(sched2, c, "done")
    assert fake_calls(sched2, d) == ["train", "test", "export"]
    sched2.shutdown()
