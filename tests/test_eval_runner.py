"""Benchmark inputs (it3d.eval.runner) scheduled on Ray (it3d.batch) + reports, driven by a fake fast
pipeline (it3d.testing.tiny_eval FAKE_LAUNCH) on a local Ray with 2 CPU workers started once for the module.

The end-to-end run of the real tiny method config is in test_eval_e2e.py; the CLI (its own local Ray, a
corrupt input, a rerun that does nothing) in test_batch.py.
"""
import base64
import csv
import json
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from it3d.batch import cli
from it3d.batch.scheduler import RayOptions, run_batch
from it3d.eval import report, runner
from it3d.testing import tiny_eval, tiny_model_dir

from it3d.testing import realfusion15_dir

REALFUSION = realfusion15_dir()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def make_inputs(root, names, size=40):
    """Synthetic RealFusion15-layout inputs: an RGBA disc of a different colour per name."""
    yy, xx = np.mgrid[:size, :size]
    for k, n in enumerate(names):
        os.makedirs(root / n)
        img = np.zeros((size, size, 4), np.uint8)
        disc = (yy - size / 2) ** 2 + (xx - size / 2 - k) ** 2 < (size / 3) ** 2
        img[disc] = [200 - 60 * k, 50 + 40 * k, 120, 255]
        Image.fromarray(img).save(root / n / "rgba.png")
    return root


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray (2 CPUs) for the module: run_batch uses the running one instead of starting its own."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


def snapshot(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


def bench(inputs, out, **kw):
    kw.setdefault("lpips", tiny_model_dir("lpips"))
    kw.setdefault("clip", tiny_model_dir("clip"))
    return runner.BenchConfig(config=["configs/tiny/make-it-3d.yaml"], inputs=str(inputs), out=str(out),
                              launch_cmd=list(tiny_eval.FAKE_LAUNCH), max_views=4, **kw)


def calls(out, name):
    p = os.path.join(out, "runs", name, "trial", "fake_calls.log")
    return open(p).read().splitlines() if os.path.isfile(p) else []


@pytest.fixture(scope="module")
def realfusion_bench(tmp_path_factory):
    names = ["cat_statue", "colorful_teapot"]
    if not all(os.path.isfile(os.path.join(REALFUSION, n, "rgba.png")) for n in names):
        pytest.skip(f"RealFusion15 inputs not found at {REALFUSION} (set IT3D_REALFUSION15)")
    out = tmp_path_factory.mktemp("bench")
    before = snapshot(REALFUSION)
    rows = run_batch(bench(REALFUSION, out, names=names))
    assert snapshot(REALFUSION) == before, "the runner wrote into the inputs folder"
    return out, names, rows


def test_runner_writes_table_and_reports(realfusion_bench):
    out, names, rows = realfusion_bench
    assert sorted(r["name"] for r in rows) == names and all(r["status"] == "ok" for r in rows)
    for r in rows:
        # the fake renders the recentred input +-0.02 noise at the reference view: PSNR >= 10 log10(1/0.02^2)
        assert r["psnr"] >= 10 * math.log10(1 / 0.02 ** 2) - 0.5 and r["ssim"] > 0.8
        assert r["clip"] > 0.5 and r["lpips"] >= 0 and r["cx"] >= 0
        assert r["time_train_s"] > 0 and r["peak_rss_gib"] > 0 and "wall_s:refine" in r
        assert math.isnan(r["peak_gpu_gib:refine"]) and r["notes"] == "peak_gpu: not recorded by the pipeline (no CUDA)"
        assert r["reference_source"] == "preprocess/rgba_rgba.png"
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["name"] for t in table] == names + ["mean"]
    assert float(table[-1]["psnr"]) == pytest.approx(np.mean([r["psnr"] for r in rows]), abs=1e-3)
    assert table[-1]["peak_gpu_gib:refine"] == "nan"
    md = open(out / "results.md").read()
    assert md.count("\n| ") == 4 and "n/a" in md  # header, 2 inputs, mean
    for n in names:
        html = open(out / "runs" / n / "report.html").read()
        for needed in ("<video", "turntable.mp4", "mesh.obj", "points.ply", "input.png", "0000.png", 'id="metrics"'):
            assert needed in html, needed
        assert "http://" not in html and "https://" not in html
        srcs = re.findall(r'src="([^"]+)"', html)
        assert srcs and all(s.startswith(("data:image/png;base64,", "data:video/mp4;base64,")) for s in srcs)  # embedded
        for src in re.findall(r'(?:href|data-file)="([^"]+)"', html):  # downloads and provenance: files beside it
            assert not os.path.isabs(src) and os.path.isfile(out / "runs" / n / src), src
        first = re.search(r'<img class="t" src="data:image/png;base64,([^"]+)" data-file="([^"]+)"', html)
        assert base64.b64decode(first.group(1)) == (out / "runs" / n / first.group(2)).read_bytes()
    assert not os.path.isdir(os.path.join(REALFUSION, names[0], "preprocess"))


def test_second_invocation_skips_finished_inputs(realfusion_bench):
    out, names, _ = realfusion_bench
    done = {n: os.stat(out / "runs" / n / "done.json").st_mtime_ns for n in names}
    assert run_batch(bench(REALFUSION, out, names=names)) == []
    assert all(len(calls(out, n)) == 3 for n in names)  # train, test, export once each
    assert done == {n: os.stat(out / "runs" / n / "done.json").st_mtime_ns for n in names}
    assert os.path.isfile(out / "results.csv")


def test_failed_step_is_retried_once_reported_and_resumed(tmp_path, monkeypatch):
    inputs = make_inputs(tmp_path / "in", ["b2"])
    monkeypatch.setenv("IT3D_FAKE_FAIL", "b2:test")  # the driver's IT3D_* variables travel with the tasks
    rows = {r["name"]: r for r in run_batch(bench(inputs, tmp_path / "out"))}
    assert rows["b2"]["status"] == "failed: test (exit 1, see logs/test.log): error: fake failure of b2 (test)"
    assert [c.split()[0] for c in calls(tmp_path / "out", "b2")] == ["train", "test", "test"]  # retried once
    run = tmp_path / "out" / "runs" / "b2"
    assert not os.path.isfile(run / "done.json")
    failed = json.loads((run / "failed.json").read_text())
    assert failed["attempts"] == 2 and failed["error"] == rows["b2"]["status"]
    assert "failed: test" in open(tmp_path / "out" / "results.md").read()
    monkeypatch.delenv("IT3D_FAKE_FAIL")
    assert run_batch(bench(inputs, tmp_path / "out")) == []  # failed earlier on the same image: skipped
    rows = run_batch(bench(inputs, tmp_path / "out"), RayOptions(retry_failed=True))
    assert [(r["name"], r["status"]) for r in rows] == [("b2", "ok")]
    assert [c.split()[0] for c in calls(tmp_path / "out", "b2")] == ["train", "test", "test", "test", "export"]
    assert not os.path.isfile(run / "failed.json") and os.path.isfile(run / "done.json")


def test_a_changed_image_runs_again_after_a_failure(tmp_path):
    inputs = make_inputs(tmp_path / "in", ["a1"])
    good = (inputs / "a1" / "rgba.png").read_bytes()
    (inputs / "a1" / "rgba.png").write_bytes(b"not an image")
    rows = run_batch(bench(inputs, tmp_path / "out"))
    assert rows[0]["status"].startswith("failed: train (exit 1, see logs/train.log): error: cannot read image")
    (inputs / "a1" / "rgba.png").write_bytes(good)
    assert [r["status"] for r in run_batch(bench(inputs, tmp_path / "out"))] == ["ok"]


def test_a_task_that_raises_is_retried_once_then_reported(tmp_path):
    inputs = make_inputs(tmp_path / "in", ["a1", "b2"])
    run = tmp_path / "out" / "runs" / "a1"
    os.makedirs(run)
    (run / "state.json").write_text("[]")  # a corrupt record: process_input raises inside its Ray task
    rows = {r["name"]: r for r in run_batch(bench(inputs, tmp_path / "out"))}
    assert rows["b2"]["status"] == "ok"  # the other input is not stopped
    err = rows["a1"]["status"]
    assert err.startswith("failed: task crashed (") and "list indices must be integers" in err, err
    assert json.loads((run / "failed.json").read_text())["attempts"] == 2
    assert json.loads((run / "result.json").read_text())["status"] == err  # so the tables list it
    with open(tmp_path / "out" / "results.csv") as f:
        assert {t["name"]: t["status"] for t in csv.DictReader(f)}["a1"] == err


def test_tasks_ask_ray_for_one_gpu_each_on_gpu_clusters():
    from it3d.batch.scheduler import task_resources

    class FakeRay:
        def __init__(self, res):
            self.res = res

        def cluster_resources(self):
            return self.res

    assert task_resources(FakeRay({"CPU": 2.0}), RayOptions()) == {"num_cpus": 1}
    assert task_resources(FakeRay({"CPU": 32.0, "GPU": 4.0}), RayOptions()) == {"num_gpus": 1, "num_cpus": 8}
    assert task_resources(FakeRay({"CPU": 32.0, "GPU": 4.0}), RayOptions(cpus_per_task=2)) == {"num_gpus": 1,
                                                                                              "num_cpus": 2}


def test_cli_and_guards(tmp_path, capsys):
    inputs = make_inputs(tmp_path / "in", ["a1"])
    args = ["--config", "configs/tiny/make-it-3d.yaml", "--inputs", str(inputs), "--out", str(tmp_path / "out"),
            "--lpips", str(tmp_path / "no-lpips"), "--clip", tiny_model_dir("clip"), "--max-views", "2",
            "--launch-cmd", " ".join(tiny_eval.FAKE_LAUNCH), "system.foo=1"]
    assert cli.main(args) == 0
    row = report.collect_rows(str(tmp_path / "out"))[0]
    assert math.isnan(row["lpips"]) and math.isnan(row["cx"]) and "lpips: LPIPS weights" in row["notes"]
    assert "system.foo=1" in calls(tmp_path / "out", "a1")[0]
    other = args[:1] + ["configs/tiny/customize-it-3d.yaml"] + args[2:]
    assert cli.main(other) == 1 and "holds results of" in capsys.readouterr().err
    assert cli.main(args[:4] + ["--out", str(inputs / "x")]) == 1  # never write into the inputs
    assert cli.main(args[:4] + ["--out", str(tmp_path / "out2"), "--names", "zz"]) == 1
    assert cli.main(args + ["--bogus"]) == 2
    # the old runner is an alias; its home-made scheduling flags say what replaced them
    assert alias(args + ["--shard", "1/2"]) == 2 and "--shard was removed: Ray" in capsys.readouterr().err
    assert alias(args + ["--gpus", "0,1"]) == 2 and "num_gpus=1" in capsys.readouterr().err


def alias(argv):
    """``python -m it3d.eval.runner <argv>``, run in this process (the module's ``__main__`` block)."""
    import runpy
    import sys
    from unittest import mock

    with mock.patch.object(sys, "argv", ["it3d.eval.runner"] + list(argv)), mock.patch.dict(sys.modules), \
            pytest.raises(SystemExit) as e:
        sys.modules.pop("it3d.eval.runner", None)  # as a fresh `python -m` finds it: not imported yet
        runpy.run_module("it3d.eval.runner", run_name="__main__", alter_sys=False)
    return e.value.code


# ----------------------------------------------------------------------------- headless Chromium
def chromium(tmp_path, url, *extra):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=8000", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_reports_render_in_headless_chromium(realfusion_bench, tmp_path):
    out, names, _ = realfusion_bench
    dom = chromium(tmp_path, (out / "report.html").as_uri(), "--dump-dom").stdout
    rows = re.findall(r'<tr data-name="([^"]+)"', dom)
    assert rows == names + ["mean"]
    videos = re.findall(r"<video[^>]*>", dom)
    assert len(videos) == 2
    for v in videos:
        # data-state is set by the page's script once the first frame decoded ('loaded') or failed ('error')
        assert 'data-state="loaded"' in v, v
        assert os.path.isfile(out / re.search(r'data-file="([^"]+)"', v).group(1))
    run_report = out / "runs" / names[0] / "report.html"
    dom = chromium(tmp_path, run_report.as_uri(), "--dump-dom").stdout
    assert 'data-state="loaded"' in dom and '<table id="metrics">' in dom and "psnr" in dom
    shot = tmp_path / "shot.png"
    chromium(tmp_path, run_report.as_uri(), f"--screenshot={shot}", "--window-size=900,700")
    px = np.asarray(Image.open(shot).convert("RGB")).astype(np.float32)
    assert px.std() > 10 and len(np.unique(px.reshape(-1, 3), axis=0)) > 50  # images, video, text: not blank


def test_reference_view_comes_from_the_stage_datamodule(tmp_path):
    """The GT at the reference view is the datamodule's own framing (recentred, border 0.2, white bg)."""
    from it3d.eval import outputs

    inputs = make_inputs(tmp_path / "in", ["a1"], size=40)  # a disc of colour (200, 50, 120) in a 40 x 40 RGBA
    image = str(inputs / "a1" / "rgba.png")
    stage = tmp_path / "run" / "trial" / "coarse"
    os.makedirs(stage / "configs")
    (stage / "configs" / "parsed.yaml").write_text(
        f"data_type: single-image\ndata:\n  image_path: {image}\n  heights: [32]\n  widths: [32]\n"
        f"  resolution_milestones: []\n  border_ratio: 0.2\n  preprocess: {{cache_dir: {tmp_path / 'run' / 'pre'}}}\n")
    rgb, mask, source = outputs.reference_image(str(tmp_path / "run"), str(stage), image, (32, 32))
    assert source == "datamodule" and rgb.shape == (1, 32, 32, 3) and mask.shape == (1, 32, 32, 1)
    ys, xs = np.nonzero(mask[0, ..., 0].numpy())
    # the object's bbox spans (1 - border) of the side, centred
    assert abs((ys.max() - ys.min() + 1) - 0.8 * 32) <= 1.5 and abs((ys.min() + ys.max()) / 2 - 15.5) <= 1
    assert abs((xs.max() - xs.min() + 1) - 0.8 * 32) <= 1.5 and abs((xs.min() + xs.max()) / 2 - 15.5) <= 1
    assert np.allclose(rgb[0, 16, 16].numpy(), np.array([200, 50, 120]) / 255, atol=0.02)
    assert np.allclose(rgb[0, 0, 0].numpy(), 1.0) and not os.path.exists(tmp_path / "run" / "pre")
