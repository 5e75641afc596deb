"""Both methods end to end with the tiny offline models (issue: photo -> 3D asset in one command).

make-it-3d: one uninterrupted --train. customize-it-3d: killed during the coarse stage, then
resumed: DreamBooth is not rerun, coarse continues from its checkpoint, refine completes.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")


def _cmd(config, *extra):
    return [sys.executable, os.path.join(ROOT, "launch.py"), "--config", os.path.join(ROOT, config), "--train",
            "use_timestamp=false", *extra]


def _check_quiet(stderr):
    """Only it3d's own log lines: no library warnings, loading bars or tracebacks without --verbose."""
    stray = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(("[INFO] ", "[WARNING] "))]
    assert not stray, stray[:5]


def _check_final_outputs(stage_dir):
    import trimesh

    save = os.path.join(stage_dir, "save")
    video = os.path.join(save, "test", "turntable.mp4")
    assert os.path.getsize(video) > 1000
    from it3d.core.io import read_video

    frames = read_video(video)
    assert len(frames) >= 4 and np.asarray(frames).std() > 1.0  # not a blank video
    pc = trimesh.load(os.path.join(save, "export", "points.ply"))
    assert len(pc.vertices) > 100 and pc.colors is not None
    mesh = trimesh.load(os.path.join(save, "export", "mesh.obj"), force="mesh")
    assert len(mesh.faces) > 10
    glb = trimesh.load(os.path.join(save, "export", "mesh.glb"), force="mesh")
    assert len(glb.faces) > 10
    check_exported_asset(os.path.join(save, "export"))


def check_exported_asset(export_dir):
    """glTF conventions read back with pygltflib (1 m tall, base at Y = 0, centred, embedded PNG, PBR, UVs
    in [0, 1]) and the fidelity record of the export; returns the record."""
    import json

    from test_export_assets import read_glb

    g, pos, _, _, uv, img, png = read_glb(os.path.join(export_dir, "mesh.glb"))
    assert pos[:, 1].min() == pytest.approx(0.0, abs=1e-5) and pos[:, 1].max() == pytest.approx(1.0, abs=1e-4)
    assert np.abs(pos.min(0) + pos.max(0))[[0, 2]].max() < 1e-4
    assert img.mimeType == "image/png" and png.std() > 0.01 and 0.0 <= uv.min() and uv.max() <= 1.0
    assert g.materials[0].pbrMetallicRoughness.metallicFactor == 0.0
    rec = json.load(open(os.path.join(export_dir, "fidelity.json")))
    assert len(rec["views"]) == 9 and os.path.isfile(os.path.join(export_dir, "preview.png"))
    print(f"{export_dir}: reference {rec['reference']}, novel mean {rec['novel_mean']}")
    return rec


def test_make_it_3d_tiny_end_to_end(tmp_path):
    t0 = time.time()
    r = subprocess.run(_cmd("configs/tiny/make-it-3d.yaml", f"exp_root_dir={tmp_path}"), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=900)
    wall = time.time() - t0
    assert r.returncode == 0, r.stderr[-4000:]
    _check_quiet(r.stderr)
    trial = tmp_path / "tiny-make-it-3d" / "synthetic"
    for stage in ("preprocess", "coarse", "refine"):
        assert (trial / stage / "stats.json").is_file(), stage
    assert torch.load(trial / "coarse" / "ckpts" / "last.ckpt", weights_only=False)["global_step"] == 60
    assert (trial / "refine" / "ckpts" / "last.ckpt").is_file()
    # the intermediate stage renders no orbit and exports nothing by default: refine supersedes it
    assert not (trial / "coarse" / "save" / "export").exists() and not (trial / "coarse" / "save" / "test").exists()
    _check_final_outputs(str(trial / "refine"))
    print(f"tiny make-it-3d end to end: {wall:.1f} s")

    # texture editing: the same coarse geometry, an edited reference (colour channels swapped)
    from PIL import Image

    src = np.asarray(Image.open(os.path.join(ROOT, "load", "synthetic", "rgba.png")))
    edited = src.copy()
    edited[..., :3] = src[..., [2, 0, 1]]
    os.makedirs(tmp_path / "edit")
    Image.fromarray(edited).save(tmp_path / "edit" / "edited.png")
    r = subprocess.run(_cmd("configs/tiny/texture-edit.yaml", f"exp_root_dir={tmp_path}",
                            f"data.image_path={tmp_path / 'edit' / 'edited.png'}", "data.preprocess.caption=a toy",
                            f"stage.refine.system.coarse_stage_dir={trial / 'coarse'}"),
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    import trimesh

    edit = tmp_path / "tiny-texture-edit" / "edited" / "refine"
    before = trimesh.load(str(trial / "refine" / "save" / "points_init.ply"))
    after = trimesh.load(str(edit / "save" / "points_init.ply"))
    from scipy.spatial import cKDTree

    # frozen geometry: every new point lies on the old cloud (the reference mask may differ by resampling)
    dist, idx = cKDTree(np.asarray(before.vertices)).query(np.asarray(after.vertices))
    assert np.median(dist) < 1e-5 and (dist < 1e-3).mean() > 0.95
    c0, c1 = before.colors[idx, :3].astype(int), after.colors[:, :3].astype(int)
    moved = np.abs(c0[:, [2, 0, 1]] - c1).max(1) <= 2  # reference points took the edited colours
    assert moved.mean() > 0.05 and not np.array_equal(c0, c1)
    _check_final_outputs(str(edit))


def test_customize_it_3d_tiny_kill_and_resume(tmp_path):
    env = _env()
    trial = tmp_path / "tiny-customize-it-3d" / "synthetic"
    ckpt = trial / "coarse" / "ckpts" / "last.ckpt"
    t0 = time.time()
    proc = subprocess.Popen(_cmd("configs/tiny/customize-it-3d.yaml", f"exp_root_dir={tmp_path}"), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 900
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if proc.poll() is not None:
        pytest.fail("run ended before the coarse stage saved a checkpoint:\n" + proc.stderr.read().decode()[-4000:])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_wall = time.time() - t0
    assert (trial / "dreambooth" / "stats.json").is_file()
    assert (trial / "dreambooth" / "save" / "pipeline" / "model_index.json").is_file()
    assert not (trial / "coarse" / "stats.json").exists()
    db_mtime = (trial / "dreambooth" / "stats.json").stat().st_mtime
    saved = torch.load(ckpt, weights_only=False)["global_step"]
    assert 0 < saved < 60

    t1 = time.time()
    r = subprocess.run(_cmd("configs/tiny/customize-it-3d.yaml", f"resume={trial}"), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    _check_quiet(r.stderr)
    assert "stage 'dreambooth': finished earlier, skipped" in r.stderr
    assert f"stage 'coarse': resuming from {ckpt}" in r.stderr
    assert (trial / "dreambooth" / "stats.json").stat().st_mtime == db_mtime
    assert torch.load(ckpt, weights_only=False)["global_step"] == 60
    _check_final_outputs(str(trial / "refine"))
    print(f"tiny customize-it-3d: {first_wall:.1f} s until killed in coarse, {time.time() - t1:.1f} s to finish")
