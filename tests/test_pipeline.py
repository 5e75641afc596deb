"""Staged pipelines on the toy extension: stage order, hand-off, skip finished stages, resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_launch import EXT, ROOT, launch

STAGED = os.path.join(EXT, "toy-staged.yaml")


def steps(path):
    return [int(s) for s in open(path).read().split()]


def test_staged_run_kill_and_resume(tmp_path):
    env = dict(os.environ, IT3D_CUSTOM_DIRS=EXT, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", IT3D_TOY_SLEEP_S="0.4")
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), "--config", STAGED, "--train", f"exp_root_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    trial = tmp_path / "toy-staged" / "run"
    ckpt_b = trial / "b" / "ckpts" / "last.ckpt"
    deadline = time.time() + 300
    while not ckpt_b.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt_b.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (trial / "a" / "stats.json").is_file() and not (trial / "b" / "stats.json").exists()
    a_mtime = (trial / "a" / "stats.json").stat().st_mtime
    saved_step = torch.load(ckpt_b, weights_only=False)["global_step"]
    assert saved_step >= 2
    before = steps(trial / "b" / "save" / "steps.log")  # the killed run's steps: 0, 1, ... from the start
    assert before == list(range(len(before))) and len(before) >= saved_step

    r = launch("--config", STAGED, "--train", f"resume={trial}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage 'a': finished earlier, skipped" in r.stderr
    assert f"stage 'b': resuming from {ckpt_b}" in r.stderr
    assert (trial / "a" / "stats.json").stat().st_mtime == a_mtime
    assert steps(trial / "a" / "save" / "steps.log") == [0, 1, 2]
    # the resumed process trains exactly the steps after the checkpoint, once each, starting there (not at 0)
    assert steps(trial / "b" / "save" / "steps.log")[len(before):] == list(range(saved_step, 12))
    stats = json.loads((trial / "b" / "stats.json").read_text())
    assert stats["peak_rss_bytes"] > 0 and stats["attempts"] == 2
    attempts = json.loads((trial / "b" / "stage.json").read_text())["attempts"]
    # the killed attempt counts up to its last checkpoint: at least saved_step training steps of 0.4 s each
    assert attempts[0]["wall_s"] >= 0.4 * saved_step
    assert stats["wall_s"] == pytest.approx(attempts[0]["wall_s"] + attempts[1]["wall_s"], abs=1e-3)

    # hand-off: stage b started from stage a's trained weights, not from the init value 0.5
    a_state = torch.load(trial / "a" / "ckpts" / "last.ckpt", weights_only=False)["state_dict"]
    assert float(a_state["a"]) != 0.5
    b_start = [float(v) for v in (trial / "b" / "save" / "start.txt").read_text().splitlines()[0].split()]
    assert b_start == pytest.approx([float(a_state["a"]), float(a_state["b"])], abs=1e-5)  # system.weights loaded

    # --export acts on the last trained stage
    r = launch("--config", str(trial / "configs" / "parsed.yaml"), "--export")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (trial / "b" / "save" / "export" / "params.txt").is_file()
    r = launch("--config", str(trial / "configs" / "parsed.yaml"), "--export", "--stage", "a")
    assert r.returncode == 0 and (trial / "a" / "save" / "export" / "params.txt").is_file()


def test_stage_override_errors(tmp_path):
    r = launch("--config", STAGED, "--train", f"exp_root_dir={tmp_path}", "stage.c.system.init=1")
    assert r.returncode == 1 and "no stage named 'c'" in r.stderr.splitlines()[-1]
    r = launch("--config", STAGED, "--train", f"exp_root_dir={tmp_path}", "stage.b.system.no_such_key=1")
    assert r.returncode == 1
    assert "stage 'b': unknown config key 'system.no_such_key'" in r.stderr.splitlines()[-1]
    r = launch("--config", STAGED, "--train", f"exp_root_dir={tmp_path}", "system.init=1")
    assert r.returncode == 1 and "address a stage instead" in r.stderr.splitlines()[-1]
    assert not (tmp_path / "toy-staged").exists()


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "run.lock"}


def test_changed_config_on_a_finished_trial_is_refused(tmp_path):
    r = launch("--config", STAGED, "--train", f"exp_root_dir={tmp_path}", "after_train=[]")
    assert r.returncode == 0, r.stderr[-3000:]
    trial = tmp_path / "toy-staged" / "run"
    before = _snapshot(trial)
    # the same config again: every stage is skipped
    r = launch("--config", STAGED, "--train", f"exp_root_dir={tmp_path}", "after_train=[]")
    assert r.returncode == 0 and "stage 'b': finished earlier, skipped" in r.stderr
    assert _snapshot(trial) == before
    # another input: refused before anything is written (configs/parsed.yaml included)
    r = launch("--config", STAGED, "--train", f"exp_root_dir={tmp_path}", "after_train=[]", "stage.b.system.init=0.7")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: stage 'b' of {trial} was finished with a different config: system.init: 0.5 -> 0.7; use a new "
        f"trial dir, or delete {trial / 'b'} (and the stages after it) to redo it")
    assert _snapshot(trial) == before
    # a changed earlier stage changes the fingerprint of the stages after it
    state = json.loads((trial / "b" / "stage.json").read_text())
    a_state = json.loads((trial / "a" / "stage.json").read_text())
    assert state["config"]["(the stage before it)"] == a_state["fingerprint"]


def test_resume_outside_a_trial_dir_is_refused(tmp_path):
    stray = tmp_path / "x" / "y" / "z" / "bad.ckpt"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"PK\x03\x04 truncated")
    r = launch("--config", STAGED, "--train", f"resume={stray}")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: resume: {stray} is not inside a trial dir of this config (expected <trial>/<stage>/ckpts/<name>.ckpt "
        f"with <stage> one of a, b, or the trial dir itself)")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["y"]  # no stage folders made three levels up


def test_named_checkpoint_resumes_from_that_checkpoint(tmp_path):
    env = dict(os.environ, IT3D_CUSTOM_DIRS=EXT, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", IT3D_TOY_SLEEP_S="0.3")
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), "--config", STAGED, "--train", f"exp_root_dir={tmp_path}",
           "after_train=[]"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    trial = tmp_path / "toy-staged" / "run"
    step4 = trial / "b" / "ckpts" / "epoch=0-step=4.ckpt"
    deadline = time.time() + 300
    while not step4.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert step4.exists() and not (trial / "b" / "stats.json").exists()
    named = trial / "b" / "ckpts" / "epoch=0-step=2.ckpt"
    assert named.exists() and torch.load(named, weights_only=False)["global_step"] == 2
    killed_at = steps(trial / "b" / "save" / "steps.log")

    r = launch("--config", STAGED, "--train", f"resume={named}", "after_train=[]")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"stage 'b': resuming from {named}" in r.stderr  # not from last.ckpt (step 4)
    assert steps(trial / "b" / "save" / "steps.log")[len(killed_at):] == list(range(2, 12))
    # a finished stage is not retrained from one of its checkpoints
    r = launch("--config", STAGED, "--train", f"resume={trial / 'b' / 'ckpts' / 'last.ckpt'}", "after_train=[]")
    assert r.returncode == 1 and "stage 'b' has finished" in r.stderr.strip().splitlines()[-1]
