"""Atomic file writes and the saving helpers every system uses.

Every writer goes through :func:`atomic_path`: the data is written to a temporary
file in the destination folder and renamed over the destination only once complete,
so a crash mid-write leaves the previous file intact.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str, suffix: Optional[str] = None) -> Iterator[str]:
    """Yield a temp path beside ``path``; on success rename it to ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if suffix is None:
        suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp" + suffix, dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs):
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f


def write_text(path: str, text: str) -> str:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def torch_save(obj, path: str) -> str:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


# ----------------------------------------------------------------------------- images
def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def to_uint8(img, data_range=(0.0, 1.0)) -> np.ndarray:
    """H W C float image in ``data_range`` (or already uint8) -> uint8."""
    img = to_numpy(img)
    if img.dtype == np.uint8:
        return img
    lo, hi = data_range
    img = (img.astype(np.float32) - lo) / max(hi - lo, 1e-12)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_image(path: str, img, data_range=(0.0, 1.0)) -> str:
    """Save an H W C (C in 1, 3, 4) or H W image."""
    from PIL import Image

    arr = to_uint8(img, data_range)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format=_pil_format(path))
    return path


def _pil_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}.get(ext, "PNG")


def colorize_depth(depth, mask=None) -> np.ndarray:
    """H W (or H W 1) depth -> H W 3 in [0, 1], normalised over the valid pixels (near = bright)."""
    d = to_numpy(depth).astype(np.float32)
    if d.ndim == 3:
        d = d[..., 0]
    valid = np.isfinite(d) if mask is None else (to_numpy(mask).reshape(d.shape) > 0.5) & np.isfinite(d)
    out = np.zeros_like(d)
    if valid.any():
        lo, hi = d[valid].min(), d[valid].max()
        out[valid] = 1.0 - (d[valid] - lo) / max(hi - lo, 1e-8)
    return np.repeat(out[..., None], 3, axis=-1)


def render_column(item: Dict) -> np.ndarray:
    """One grid cell ``{"type": rgb|depth|normal|mask|grayscale, "img": ..., ...}`` -> H W 3 float."""
    kind = item["type"]
    img = to_numpy(item["img"]).astype(np.float32)
    if kind == "rgb":
        lo, hi = item.get("data_range", (0.0, 1.0))
        img = np.clip((img - lo) / (hi - lo), 0, 1)
        if img.ndim == 2:
            img = img[..., None]
        if img.shape[-1] == 1:
            img = np.repeat(img, 3, -1)
        if img.shape[-1] == 4:
            img = img[..., :3] * img[..., 3:] + (1 - img[..., 3:])
        return img
    if kind == "normal":  # normals in [-1, 1] unless told otherwise
        lo, hi = item.get("data_range", (-1.0, 1.0))
        return np.clip((img[..., :3] - lo) / (hi - lo), 0, 1)
    if kind == "depth":
        return colorize_depth(img, item.get("mask"))
    if kind in ("mask", "grayscale", "opacity"):
        if img.ndim == 3:
            img = img[..., 0]
        lo, hi = item.get("data_range", (0.0, 1.0))
        return np.repeat(np.clip((img - lo) / (hi - lo), 0, 1)[..., None], 3, -1)
    raise ValueError(f"unknown image grid column type '{kind}' (expected rgb, depth, normal, mask, grayscale)")


def save_image_grid(path: str, items: Sequence[Dict]) -> str:
    """Save cells side by side: each ``{"type": "rgb"|"depth"|"normal"|"mask", "img": H W C}``."""
    cols = [render_column(it) for it in items]
    h = max(c.shape[0] for c in cols)
    padded = [np.pad(c, ((0, h - c.shape[0]), (0, 0), (0, 0)), constant_values=1.0) for c in cols]
    return save_image(path, np.concatenate(padded, axis=1))


def save_video(path: str, frames: Sequence, fps: int = 30) -> str:
    """Write H W 3 frames (float in [0, 1] or uint8) to an mp4 (H.264 via imageio-ffmpeg)."""
    import imageio.v2 as imageio

    if len(frames) == 0:
        raise ValueError(f"save_video({path}): no frames")
    arrs = [to_uint8(f) for f in frames]
    h, w = arrs[0].shape[:2]
    # libx264 + yuv420p needs even sizes; pad by one pixel of white if needed
    ph, pw = h % 2, w % 2
    if ph or pw:
        arrs = [np.pad(a, ((0, ph), (0, pw), (0, 0)), constant_values=255) for a in arrs]
    with atomic_path(path) as tmp:
        writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                    macro_block_size=1, pixelformat="yuv420p", output_params=["-movflags", "+faststart"])
        for a in arrs:
            writer.append_data(a[..., :3])
        writer.close()
    return path


def read_video(path: str) -> List[np.ndarray]:
    import imageio.v2 as imageio

    reader = imageio.get_reader(path, format="FFMPEG")
    frames = [np.asarray(f) for f in reader]
    reader.close()
    return frames


# ----------------------------------------------------------------------------- geometry
def save_ply(path: str, points, colors=None, normals=None) -> str:
    """Binary little-endian PLY with optional uint8 colours (float in [0,1] accepted) and normals."""
    pts = to_numpy(points).astype(np.float32).reshape(-1, 3)
    n = len(pts)
    fields = [("x", "f4"), ("y", "f4"), ("z", "f4")]
    cols = [pts]
    if normals is not None:
        fields += [("nx", "f4"), ("ny", "f4"), ("nz", "f4")]
        cols.append(to_numpy(normals).astype(np.float32).reshape(n, 3))
    rec = np.empty(n, dtype=[(nm, "<" + t if t == "f4" else t) for nm, t in fields]
                   + ([("red", "u1"), ("green", "u1"), ("blue", "u1")] if colors is not None else []))
    for i, name in enumerate("xyz"):
        rec[name] = pts[:, i]
    if normals is not None:
        for i, name in enumerate(("nx", "ny", "nz")):
            rec[name] = cols[1][:, i]
    if colors is not None:
        c = to_numpy(colors).reshape(n, -1)[:, :3]
        c = to_uint8(c)
        for i, name in enumerate(("red", "green", "blue")):
            rec[name] = c[:, i]
    names = {"f4": "float", "u1": "uchar"}
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property {names[t.lstrip('<>|=')]} {nm}" for nm, t in rec.dtype.descr]
    header += ["end_header"]
    with atomic_open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(rec.tobytes())
    return path


def save_mesh(path_stem: str, vertices, faces, uv=None, uv_faces=None, texture=None, vertex_colors=None,
              normals=None, glb: bool = True, metallic: float = 0.0, roughness: float = 1.0) -> Dict[str, str]:
    """Write ``<stem>.obj`` (+ ``.mtl`` and ``_texture.png`` when textured) and ``<stem>.glb``.

    ``uv``: U x 2 in [0, 1] (v up, the OBJ convention), ``uv_faces``: F x 3 indices into ``uv``;
    ``texture``: H W 3 (row 0 = v 1); ``normals``: V x 3 per vertex (written as OBJ ``vn`` and GLB
    NORMAL). The GLB embeds the texture as a PBR material (baseColorTexture, ``metallic``,
    ``roughness``); the MTL carries the same as ``map_Kd`` + ``Pm`` / ``Pr``. Coordinates are written
    as given (the exporters pass them in the asset frame). Returns the written paths.
    """
    import trimesh

    v = to_numpy(vertices).astype(np.float64).reshape(-1, 3)
    f = to_numpy(faces).astype(np.int64).reshape(-1, 3)
    vn = None if normals is None else to_numpy(normals).astype(np.float64).reshape(-1, 3)
    stem = os.fspath(path_stem)
    if stem.endswith(".obj"):
        stem = stem[:-4]
    out = {}
    name = os.path.basename(stem)
    lines: List[str] = []
    textured = uv is not None and texture is not None
    if textured:
        tex_name = f"{name}_texture.png"
        out["texture"] = save_image(os.path.join(os.path.dirname(stem), tex_name), texture)
        mtl = (f"newmtl material0\nKa 1.000 1.000 1.000\nKd 1.000 1.000 1.000\nKs 0.000 0.000 0.000\n"
               f"d 1.0\nillum 1\nPm {metallic:.3f}\nPr {roughness:.3f}\nmap_Kd {tex_name}\n")
        out["mtl"] = write_text(stem + ".mtl", mtl)
        lines.append(f"mtllib {name}.mtl")
    vc = None if vertex_colors is None else to_numpy(vertex_colors).reshape(-1, 3)
    for i, p in enumerate(v):
        if vc is not None:
            lines.append(f"v {p[0]:.6f} {p[1]:.6f} {p[2]:.6f} {vc[i, 0]:.4f} {vc[i, 1]:.4f} {vc[i, 2]:.4f}")
        else:
            lines.append(f"v {p[0]:.6f} {p[1]:.6f} {p[2]:.6f}")
    if vn is not None:
        lines += [f"vn {n[0]:.5f} {n[1]:.5f} {n[2]:.5f}" for n in vn]
    uf = to_numpy(uv_faces if uv_faces is not None else faces).astype(np.int64).reshape(-1, 3) if textured else None
    if textured:
        lines += [f"vt {t[0]:.6f} {t[1]:.6f}" for t in to_numpy(uv).reshape(-1, 2)]
        lines.append("usemtl material0")
        if vn is not None:
            lines += [f"f {a + 1}/{ta + 1}/{a + 1} {b + 1}/{tb + 1}/{b + 1} {c + 1}/{tc + 1}/{c + 1}"
                      for (a, b, c), (ta, tb, tc) in zip(f, uf)]
        else:
            lines += [f"f {a + 1}/{ta + 1} {b + 1}/{tb + 1} {c + 1}/{tc + 1}" for (a, b, c), (ta, tb, tc) in zip(f, uf)]
    elif vn is not None:
        lines += [f"f {a + 1}//{a + 1} {b + 1}//{b + 1} {c + 1}//{c + 1}" for a, b, c in f]
    else:
        lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in f]
    out["obj"] = write_text(stem + ".obj", "\n".join(lines) + "\n")
    if glb:
        if textured:
            # GLB needs per-vertex uv: split vertices by (vertex, uv) pairs
            pairs = np.stack([f.reshape(-1), uf.reshape(-1)], 1)
            uniq, inv = np.unique(pairs, axis=0, return_inverse=True)
            gv, guv = v[uniq[:, 0]], to_numpy(uv).reshape(-1, 2)[uniq[:, 1]]
            gn = None if vn is None else vn[uniq[:, 0]]
            gf = inv.reshape(-1, 3)
            from PIL import Image

            material = trimesh.visual.material.PBRMaterial(
                name="material0", baseColorTexture=Image.fromarray(to_uint8(texture)), baseColorFactor=[255, 255, 255, 255],
                metallicFactor=float(metallic), roughnessFactor=float(roughness))
            visual = trimesh.visual.TextureVisuals(uv=guv, material=material)
            mesh = trimesh.Trimesh(gv, gf, vertex_normals=gn, visual=visual, process=False)
        else:
            mesh = trimesh.Trimesh(v, f, vertex_normals=vn, vertex_colors=None if vc is None else to_uint8(vc), process=False)
        with atomic_path(stem + ".glb") as tmp:
            mesh.export(tmp, file_type="glb", include_normals=vn is not None)
        out["glb"] = stem + ".glb"
    return out
