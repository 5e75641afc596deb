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
