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

    r = launch("--config", STAGED, "--train", f"resume={trial}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage 'a': finished earlier, skipped" in r.stderr
    assert f"stage 'b': resuming from {ckpt_b}" in r.stderr
    assert (trial / "a" / "stats.json").stat().st_mtime == a_mtime
    assert steps(trial / "a" / "save" / "steps.log") == [0, 1, 2]
    b_steps = steps(trial / "b" / "save" / "steps.log")
    resumed = b_steps[b_steps.index(saved_step, 1 if saved_step == 0 else 0):]
    assert resumed == list(range(saved_step, 12))
    stats = json.loads((trial / "b" / "stats.json").read_text())
    assert stats["wall_s"] > 0 and stats["peak_rss_bytes"] > 0

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
