"""A batch on the real pipeline: the tiny Make-It-3D config on two RealFusion15 inputs, on a local Ray (CPU)."""
import csv
import math
import os

import pytest

from it3d.batch.scheduler import RayOptions, run_batch
from it3d.eval import runner
from it3d.testing import tiny_model_dir

from it3d.testing import realfusion15_dir

REALFUSION = realfusion15_dir()
CONFIG = os.path.join(runner.REPO_ROOT, "configs", "tiny", "make-it-3d.yaml")
NAMES = ["cat_statue", "colorful_teapot"]


def bench(out, names=NAMES):
    return runner.BenchConfig(config=[CONFIG], inputs=REALFUSION, out=str(out), names=names, max_views=4,
                              lpips=tiny_model_dir("lpips"), clip=tiny_model_dir("clip"))


@pytest.mark.slow
def test_runner_on_tiny_make_it_3d(tmp_path):
    if not all(os.path.isfile(os.path.join(REALFUSION, n, "rgba.png")) for n in NAMES):
        pytest.skip(f"RealFusion15 inputs not found at {REALFUSION} (set IT3D_REALFUSION15)")
    out = tmp_path / "bench"
    # the first input alone, then both: the second invocation runs only the second input
    ray = RayOptions(num_cpus=1)  # each invocation starts (and stops) its own local Ray
    rows = run_batch(bench(out, names=NAMES[:1]), ray)
    assert [(r["name"], r["status"]) for r in rows] == [(NAMES[0], "ok")], rows[0]["status"]
    rows += run_batch(bench(out), ray)
    assert [r["name"] for r in rows] == NAMES
    assert all(r["status"] == "ok" for r in rows), {r["name"]: r["status"] for r in rows}
    for r in rows:
        for k in ("psnr", "psnr_masked", "ssim", "ssim_masked", "lpips", "clip", "cx"):
            assert math.isfinite(r[k]), (k, r["notes"])
        assert 0 < r["ssim"] <= 1 and -1 <= r["clip"] <= 1 and r["time_train_s"] > 0
        assert r["reference_source"] == "datamodule"
        html = open(out / "runs" / r["name"] / "report.html").read()
        assert "<video" in html and "turntable.mp4" in html and "export/" in html
    with open(out / "results.csv") as f:
        assert [t["name"] for t in csv.DictReader(f)] == NAMES + ["mean"]
    assert os.path.isfile(out / "report.html") and os.path.isfile(out / "results.md")
    assert run_batch(bench(out), ray) == []  # finished inputs are skipped
