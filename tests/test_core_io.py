import os

import numpy as np
import pytest
import torch

from it3d.core import io


def test_atomic_write_crash_keeps_previous_file(tmp_path):
    path = tmp_path / "ckpt.txt"
    io.write_text(str(path), "good")
    with pytest.raises(RuntimeError):
        with io.atomic_open(str(path), "w") as f:
            f.write("half-writ")
            raise RuntimeError("simulated crash mid-write")
    assert path.read_text() == "good"
    assert sorted(os.listdir(tmp_path)) == ["ckpt.txt"]  # no temp file left behind


def test_atomic_torch_save_crash(tmp_path, monkeypatch):
    path = str(tmp_path / "last.ckpt")
    io.torch_save({"step": 1}, path)

    def boom(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        io.torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1


def test_atomic_checkpoint_io(tmp_path, monkeypatch):
    from it3d.core.checkpoint import AtomicCheckpointIO

    cio = AtomicCheckpointIO()
    path = str(tmp_path / "ckpts" / "last.ckpt")
    cio.save_checkpoint({"global_step": 3}, path)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        cio.save_checkpoint({"global_step": 4}, path)
    monkeypatch.undo()
    assert cio.load_checkpoint(path)["global_step"] == 3


def test_save_image_roundtrip(tmp_path):
    from PIL import Image

    img = np.zeros((4, 6, 3), np.float32)
    img[1, 2] = [1.0, 0.5, 0.0]
    io.save_image(str(tmp_path / "a.png"), img)
    back = np.asarray(Image.open(tmp_path / "a.png"))
    assert back.shape == (4, 6, 3)
    assert tuple(back[1, 2]) == (255, 128, 0) and back[0, 0].sum() == 0


def test_image_grid_columns(tmp_path):
    from PIL import Image

    h, w = 8, 8
    depth = torch.linspace(1, 2, h * w).reshape(h, w, 1)
    items = [{"type": "rgb", "img": torch.ones(h, w, 3) * 0.5},
             {"type": "depth", "img": depth},
             {"type": "normal", "img": torch.tensor([0.0, 0.0, 1.0]).expand(h, w, 3)},
             {"type": "mask", "img": torch.ones(h, w, 1)}]
    io.save_image_grid(str(tmp_path / "g.png"), items)
    g = np.asarray(Image.open(tmp_path / "g.png")).astype(int)
    assert g.shape == (h, 4 * w, 3)
    assert tuple(g[0, 0]) == (128, 128, 128)
    assert g[0, w].tolist() == [255, 255, 255] and g[-1, 2 * w - 1].tolist() == [0, 0, 0]  # near bright, far dark
    assert tuple(g[0, 2 * w]) == (128, 128, 255)  # +z normal
    assert tuple(g[0, 3 * w]) == (255, 255, 255)


def test_video_roundtrip(tmp_path):
    frames = [np.full((17, 21, 3), i * 40, np.uint8) for i in range(5)]
    path = io.save_video(str(tmp_path / "v.mp4"), frames, fps=10)
    back = io.read_video(path)
    assert len(back) == 5
    assert back[0].shape[:2] == (18, 22)  # padded to even size for yuv420p
    assert abs(float(back[3][:17, :21].mean()) - 120) < 4


def test_ply_roundtrip(tmp_path):
    import trimesh

    pts = np.random.default_rng(0).random((50, 3)).astype(np.float32)
    cols = np.random.default_rng(1).random((50, 3))
    io.save_ply(str(tmp_path / "p.ply"), pts, cols)
    pc = trimesh.load(str(tmp_path / "p.ply"))
    assert np.allclose(pc.vertices, pts, atol=1e-6)
    assert np.array_equal(pc.colors[:, :3], io.to_uint8(cols))


def test_mesh_obj_glb_textured(tmp_path):
    import trimesh

    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    uv = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float32)
    tex = np.random.default_rng(0).random((16, 16, 3))
    out = io.save_mesh(str(tmp_path / "mesh"), v, f, uv=uv, uv_faces=f, texture=tex)
    assert set(out) == {"obj", "mtl", "texture", "glb"}
    m = trimesh.load(out["obj"], force="mesh")
    assert len(m.faces) == 4
    g = trimesh.load(out["glb"], force="mesh")
    assert len(g.faces) == 4 and g.visual.uv is not None


# ----------------------------------------------------------------------------- checkpoints you can trust
def _ckpt(path, step, lightning=True):
    state = {"state_dict": {"w": torch.full((4096,), float(step))}, "global_step": step} if lightning else {"x": 1}
    torch.save(state, str(path))
    return path


def test_verify_checkpoint_says_why(tmp_path):
    from it3d.core.checkpoint import verify_checkpoint

    good = _ckpt(tmp_path / "good.ckpt", 3)
    assert verify_checkpoint(str(good)) is None
    data = good.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    assert verify_checkpoint(str(tmp_path / "cut.ckpt")).startswith("truncated or not a checkpoint")
    flipped = bytearray(data)
    i = data.index(np.float32(3.0).tobytes() * 4) + 8  # inside the tensor's bytes
    flipped[i] ^= 0xFF
    (tmp_path / "flip.ckpt").write_bytes(bytes(flipped))
    assert verify_checkpoint(str(tmp_path / "flip.ckpt")).startswith("corrupt: bad checksum in ")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert verify_checkpoint(str(tmp_path / "empty.ckpt")) == "empty file"
    assert verify_checkpoint(str(_ckpt(tmp_path / "plain.ckpt", 0, lightning=False))) == \
        "not a Lightning checkpoint (no state_dict)"
    assert verify_checkpoint(str(tmp_path / "nope.ckpt")) == "not found"


def test_newest_readable_falls_back_then_stops(tmp_path, caplog):
    import logging

    from it3d.core.checkpoint import checkpoints, newest_readable
    from it3d.core.errors import It3dError

    d = tmp_path / "ckpts"
    d.mkdir()
    for step in (10, 20):
        _ckpt(d / f"epoch=0-step={step}.ckpt", step)
    _ckpt(d / "last.ckpt", 20)
    assert [os.path.basename(p) for p in checkpoints(str(d))] == ["last.ckpt", "epoch=0-step=20.ckpt",
                                                                  "epoch=0-step=10.ckpt"]
    assert newest_readable(str(d)) == str(d / "last.ckpt")
    for name in ("last.ckpt", "epoch=0-step=20.ckpt"):
        (d / name).write_bytes((d / name).read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="it3d"):
        assert newest_readable(str(d)) == str(d / "epoch=0-step=10.ckpt")
    assert caplog.records[0].getMessage().startswith(f"checkpoint {d / 'last.ckpt'} is unreadable (truncated")
    (d / "epoch=0-step=10.ckpt").write_bytes(b"")
    with pytest.raises(It3dError) as e:
        newest_readable(str(d))
    assert str(e.value) == (f"no readable checkpoint in {d}: last.ckpt (truncated or not a checkpoint: no complete "
                            f"torch.save archive); epoch=0-step=20.ckpt (truncated or not a checkpoint: no complete "
                            f"torch.save archive); epoch=0-step=10.ckpt (empty file)")
    assert newest_readable(str(tmp_path / "none")) is None


KILL_BETWEEN_WRITE_AND_RENAME = """
import os, signal, sys
sys.path.insert(0, {custom!r})
import numpy as np
from it3d.core import io
from it3d.runner.stage_state import Attempt

target, folder = sys.argv[1], sys.argv[2]

def write(version):
    if target == "stats":
        Attempt(folder, {{"version": version}}).finish()
    elif target == "ply":
        io.save_ply(os.path.join(folder, "points.ply"), np.full((version * 10, 3), version, np.float32))
    else:
        v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32) * version
        io.save_mesh(os.path.join(folder, "mesh"), v, np.array([[0, 1, 2]]))

write(1)
last = {{"stats": "stats.json", "ply": "points.ply", "mesh": "mesh.obj"}}[target]
rename = os.replace
# dies with the temp file of `last` written, before its rename
os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL) if dst.endswith(last) else rename(src, dst)
write(2)
"""


@pytest.mark.parametrize("target,files", [("stats", ["stats.json", "stage.json"]), ("ply", ["points.ply"]),
                                          ("mesh", ["mesh.obj", "mesh.glb"])])
def test_kill_between_temp_write_and_rename_keeps_the_old_file(tmp_path, target, files):
    import json
    import signal
    import subprocess
    import sys

    custom = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "custom")
    script = tmp_path / "kill.py"
    script.write_text(KILL_BETWEEN_WRITE_AND_RENAME.format(custom=custom))
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, str(script), target, str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    temps = [f for f in os.listdir(out) if f.startswith(".") and ".tmp" in f]
    assert len(temps) == 1 and temps[0].startswith("." + files[0]), temps  # died after writing it, before renaming
    if target == "stats":
        assert json.loads((out / "stage.json").read_text())["config"] == {"version": 2}  # renamed before the kill
        assert json.loads((out / "stats.json").read_text())["attempts"] == 1  # the first, whole
    elif target == "ply":
        import trimesh

        assert len(trimesh.load(str(out / "points.ply")).vertices) == 10  # version 1, whole
    else:
        import trimesh

        assert trimesh.load(str(out / "mesh.obj"), force="mesh").vertices.max() == 1.0
        assert len(trimesh.load(str(out / "mesh.glb"), force="mesh").faces) == 1
    for f in files:
        assert (out / f).is_file()
