"""launch.py end to end with a toy extension system (registered from tests/extensions via IT3D_CUSTOM_DIRS)."""
import csv
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXT = os.path.join(ROOT, "tests", "extensions")
TOY = os.path.join(EXT, "toy.yaml")


def launch(*args, cwd=None, extra_dirs=EXT):
    env = dict(os.environ, IT3D_CUSTOM_DIRS=extra_dirs, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    r = launch("--config", TOY, "--train", f"exp_root_dir={root}")
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "toy" / "run", r


def test_trial_dir_layout(trained):
    trial, r = trained
    assert "CUDA is not available: running on CPU" in r.stderr
    for rel in ("configs/raw.yaml", "configs/parsed.yaml", "ckpts/last.ckpt", "save/it3-val/0.png",
                "save/it6-val/1.png", "logs/csv/metrics.csv"):
        assert (trial / rel).is_file(), rel
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(trial / "logs" / "tb"))
    rows = list(csv.DictReader(open(trial / "logs" / "csv" / "metrics.csv")))
    assert any(row.get("train/loss") for row in rows)
    assert torch.load(trial / "ckpts" / "last.ckpt", weights_only=False)["global_step"] == 6
    parsed = (trial / "configs" / "parsed.yaml").read_text()
    assert "loss_weight:" in parsed and f"trial_dir: {trial}" in parsed


def test_resume_continues_at_saved_step(trained, tmp_path):
    trial, _ = trained
    steps_before = (trial / "save" / "steps.log").read_text().split()
    assert steps_before == [str(i) for i in range(6)]
    r = launch("--config", str(trial / "configs" / "parsed.yaml"), "--train",
               f"resume={trial / 'ckpts' / 'last.ckpt'}", "trainer.max_steps=9")
    assert r.returncode == 0, r.stderr[-3000:]
    steps = (trial / "save" / "steps.log").read_text().split()
    assert steps == [str(i) for i in range(9)]  # 6, 7, 8 appended: continued, not restarted
    assert torch.load(trial / "ckpts" / "last.ckpt", weights_only=False)["global_step"] == 9


def test_test_and_export_use_checkpoint(trained):
    trial, _ = trained
    ckpt = trial / "ckpts" / "last.ckpt"
    r = launch("--config", str(trial / "configs" / "parsed.yaml"), "--test", f"resume={ckpt}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (trial / "save" / "test" / "0.png").is_file()
    r = launch("--config", str(trial / "configs" / "parsed.yaml"), "--export", f"resume={ckpt}")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = map(float, (trial / "save" / "export" / "params.txt").read_text().split())
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert a == pytest.approx(float(state["a"]), abs=1e-5) and b == pytest.approx(float(state["b"]), abs=1e-5)
    assert a != 0.5  # trained away from the init


def test_unknown_key_one_line_error(tmp_path):
    r = launch("--config", TOY, "--train", f"exp_root_dir={tmp_path}", "system.no_such_key=1")
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "system.no_such_key" in lines[0]
    assert not (tmp_path / "toy").exists()  # failed before any work started


def test_missing_value_and_bad_type(tmp_path):
    r = launch("--config", TOY, "--train", f"exp_root_dir={tmp_path}", "system.init=abc")
    assert r.returncode == 1 and "system.init" in r.stderr.strip().splitlines()[-1]


def test_unknown_component_suggests(tmp_path):
    r = launch("--config", TOY, "--train", f"exp_root_dir={tmp_path}", "system_type=toi")
    assert r.returncode == 1
    assert "system 'toi' not found; did you mean 'toy'?" in r.stderr.strip().splitlines()[-1]


def test_timestamped_trial_dir(tmp_path):
    r = launch("--config", TOY, "--train", f"exp_root_dir={tmp_path}", "use_timestamp=true", "trainer.max_steps=1",
               "tag=ts")
    assert r.returncode == 0, r.stderr[-2000:]
    (name,) = os.listdir(tmp_path / "toy")
    assert re.fullmatch(r"ts@\d{8}-\d{6}", name)


def test_broken_extension_fails_loudly(tmp_path):
    pkg = tmp_path / "my_broken_ext"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import definitely_not_a_module_xyz\n")
    r = launch("--config", TOY, "--train", f"exp_root_dir={tmp_path}", extra_dirs=f"{EXT}{os.pathsep}{tmp_path}")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert "my_broken_ext" in last and "definitely_not_a_module_xyz" in last


def test_exactly_one_mode_required():
    r = launch("--config", TOY, "--train", "--test")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


def csv_steps(trial):
    rows = list(csv.DictReader(open(trial / "logs" / "csv" / "metrics.csv")))
    return sorted({int(r["step"]) for r in rows if r.get("train/loss")})


def test_logs_survive_resume_test_and_export(tmp_path):
    """Lightning's CSV logger used to delete logs/csv/metrics.csv whenever a run opened the folder again."""
    r = launch("--config", TOY, "--train", f"exp_root_dir={tmp_path}", "after_train=[]")
    assert r.returncode == 0, r.stderr[-3000:]
    trial = tmp_path / "toy" / "run"
    assert csv_steps(trial) == list(range(6))
    r = launch("--config", str(trial / "configs" / "parsed.yaml"), "--train", f"resume={trial}",
               "trainer.max_steps=9", "after_train=[]")
    assert r.returncode == 0, r.stderr[-3000:]
    assert csv_steps(trial) == list(range(9))  # the first run's rows are still there
    for mode in ("--test", "--export"):
        r = launch("--config", str(trial / "configs" / "parsed.yaml"), mode)
        assert r.returncode == 0, r.stderr[-3000:]
        assert csv_steps(trial) == list(range(9)), mode


def test_unreadable_newest_checkpoint_falls_back(tmp_path):
    r = launch("--config", TOY, "--train", f"exp_root_dir={tmp_path}", "after_train=[]", "trainer.max_steps=9")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = tmp_path / "toy" / "run" / "ckpts"
    assert sorted(os.listdir(ckpts)) == ["epoch=0-step=6.ckpt", "epoch=0-step=9.ckpt", "last.ckpt"]  # the last two
    parsed = str(tmp_path / "toy" / "run" / "configs" / "parsed.yaml")

    def cut(name):
        data = (ckpts / name).read_bytes()
        (ckpts / name).write_bytes(data[: len(data) // 2])

    cut("last.ckpt")
    r = launch("--config", parsed, "--export")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoint {ckpts / 'last.ckpt'} is unreadable" in r.stderr
    assert f"using {ckpts / 'epoch=0-step=9.ckpt'} instead" in r.stderr
    a, b = map(float, (tmp_path / "toy" / "run" / "save" / "export" / "params.txt").read_text().split())
    state = torch.load(ckpts / "epoch=0-step=9.ckpt", weights_only=False)["state_dict"]
    assert (a, b) == pytest.approx((float(state["a"]), float(state["b"])), abs=1e-5)

    cut("epoch=0-step=9.ckpt")
    cut("epoch=0-step=6.ckpt")
    r = launch("--config", parsed, "--export")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no readable checkpoint in {ckpts}: last.ckpt (truncated")
    assert "epoch=0-step=6.ckpt (truncated" in last


def test_second_process_on_a_running_trial_stops(tmp_path):
    trial = tmp_path / "toy" / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from it3d.core.lock import TrialLock; "
         f"TrialLock({str(trial)!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
        env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "custom")), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = launch("--config", TOY, "--train", f"exp_root_dir={tmp_path}")
        assert r.returncode == 1
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: trial dir {trial} is in use by process {holder.pid} (since ")
        assert sorted(os.listdir(trial)) == ["run.lock"]  # nothing was written
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and is taken over
    r = launch("--config", TOY, "--train", f"exp_root_dir={tmp_path}", "after_train=[]", "trainer.max_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"process {holder.pid}" in r.stderr and "taking over its stale lock" in r.stderr
    assert (trial / "run.lock").read_text() == ""  # released


def test_bad_gpu_and_typos_are_one_line(tmp_path):
    r = launch("--config", TOY, "--train", f"exp_root_dir={tmp_path}", "--gpu", "a,b")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == \
        "error: --gpu a,b: expected GPU indices such as 0 or 0,1"
    r = launch("--config", TOY, "--trian")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
