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
