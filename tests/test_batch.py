"""``python -m it3d.batch`` end to end: its own local Ray with 2 CPU workers, 3 inputs (one a corrupt image),
the fake fast pipeline (it3d.testing.tiny_eval): two results, one reported failure (retried once), and a
rerun that does nothing."""
import csv
import json
import os
import subprocess
import sys

import pytest

from it3d.eval import runner
from it3d.testing import tiny_eval, tiny_model_dir

from test_eval_runner import calls, make_inputs

pytest.importorskip("ray")


def batch(inputs, out):
    cmd = [sys.executable, "-m", "it3d.batch", "--config", "configs/tiny/make-it-3d.yaml", "--inputs", str(inputs),
           "--out", str(out), "--num-cpus", "2", "--lpips", tiny_model_dir("lpips"), "--clip", tiny_model_dir("clip"),
           "--max-views", "2", "--launch-cmd", " ".join(tiny_eval.FAKE_LAUNCH), "seed=3"]
    env = dict(os.environ, PYTHONPATH=runner.CUSTOM_DIR)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=runner.REPO_ROOT, env=env)


def test_batch_on_local_ray_with_a_corrupt_input(tmp_path):
    inputs = make_inputs(tmp_path / "in", ["a1", "b2"])
    os.makedirs(inputs / "c3")
    (inputs / "c3" / "rgba.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature, then garbage
    out = tmp_path / "out"
    first = batch(inputs, out)
    assert first.returncode == 1, first.stderr[-3000:]  # a failed input makes the batch fail, after the others ran
    with open(out / "results.csv") as f:
        table = {r["name"]: r for r in csv.DictReader(f)}
    assert sorted(table) == ["a1", "b2", "c3", "mean"]
    assert table["a1"]["status"] == table["b2"]["status"] == "ok" and table["mean"]["status"] == "2/3 ok"
    assert float(table["a1"]["psnr"]) > 30 and float(table["b2"]["psnr"]) > 30  # the fake renders its input +-0.02
    err = table["c3"]["status"]
    assert err.startswith("failed: train (exit 1, see logs/train.log): error: cannot read image ")
    assert str(inputs / "c3" / "rgba.png") in err
    assert [c.split()[0] for c in calls(out, "c3")] == ["train", "train"]  # retried once, then reported
    assert [c.split()[0] for c in calls(out, "a1")] == ["train", "test", "export"]
    assert all("seed=3" in c for c in calls(out, "a1"))  # key=value overrides reach the method
    assert json.loads((out / "runs" / "c3" / "failed.json").read_text())["attempts"] == 2
    assert "c3: failed: train" in first.stdout and "3 run(s) now, 1 failed" in first.stdout
    assert "[batch] 3/3 inputs finished (1 failed)" in first.stderr and "ETA" in first.stderr
    html = (out / "report.html").read_text()
    assert html.count('<tr data-name="') == 4 and "cannot read image" in html
    before = {p: os.stat(p).st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}

    second = batch(inputs, out)
    assert second.returncode == 1  # c3 is still a failed input of this batch
    assert "[batch] 0 to run, 2 done earlier, 1 failed earlier" in second.stderr
    assert "0 run(s) now, 0 failed; 1 of 3 input(s) failed in all" in second.stdout
    after = {p: os.stat(p).st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    assert after == before  # nothing ran, nothing was rewritten
