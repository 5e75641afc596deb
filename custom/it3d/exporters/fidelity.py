"""Export fidelity: does the exported file look like what the trained stage renders?

The exported GLB (or OBJ) is read back from disk with trimesh (a glTF reader, so whatever went
wrong in writing shows), mapped from the asset frame back to the stage's world frame with the
frame the exporter used, and rendered unlit with :func:`it3d.renderers.mesh_rasterizer.render_textured`
(bilinear texture lookups, ``ssaa`` supersampling) at the reference view and the novel views.
The stage renders the same cameras itself (albedo, white background). Per view:

* ``psnr`` (dB) of the whole image (both on white), and
* ``mask_iou``: IoU of the exported mesh's coverage > 0.5 and the stage's opacity > 0.5.

:func:`write_fidelity` writes ``fidelity.json`` (targets: reference-view mask IoU >= 0.95 and
PSNR >= 25 dB) and ``preview.png``: a left column with the reference view (exported mesh above,
stage render below), then the 8 novel views as a 2 x 4 grid of (exported | stage) pairs.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch

from ..core import io
from ..core.cameras import Camera
from ..core.errors import It3dError
from ..renderers.mesh_rasterizer import render_textured
from .conventions import AssetFrame

TARGET_PSNR = 25.0
TARGET_IOU = 0.95
StageRender = Callable[[Camera], Tuple[torch.Tensor, torch.Tensor]]  # view -> (rgb H W 3, opacity H W)


def read_asset(path: str) -> Dict[str, Any]:
    """An exported mesh as a viewer sees it -> vertices (asset frame), faces, per-vertex uv, texture (H W 3 float)."""
    import trimesh

    if not os.path.isfile(path):
        raise It3dError(f"export fidelity: {path} not found")
    mesh = trimesh.load(path, force="mesh", process=False)
    vis = getattr(mesh, "visual", None)
    uv = getattr(vis, "uv", None)
    mat = getattr(vis, "material", None)
    img = getattr(mat, "baseColorTexture", None) if mat is not None else None
    img = img if img is not None else getattr(mat, "image", None)
    if uv is None or img is None:
        raise It3dError(f"export fidelity: {path} has no UV texture (uv: {uv is not None}, image: {img is not None})")
    tex = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return {"vertices": np.asarray(mesh.vertices, dtype=np.float64), "faces": np.asarray(mesh.faces, dtype=np.int64),
            "uv": np.asarray(uv, dtype=np.float32), "texture": tex}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


@torch.no_grad()
def measure(path: str, frame: AssetFrame, views: List[Camera], stage_render: StageRender, ssaa: int = 2
            ) -> Dict[str, Any]:
    """Render the file at ``path`` and the stage at every view -> per-view figures and the images."""
    asset = read_asset(path)
    v = torch.from_numpy(frame.to_world(asset["vertices"])).float()
    f = torch.from_numpy(asset["faces"])
    uv = torch.from_numpy(asset["uv"])
    tex = torch.from_numpy(asset["texture"])
    rows, images = [], []
    for view in views:
        ex = render_textured(v, f, uv, tex, view.c2w.float().cpu(), view.fovy, view.height, view.width, ssaa=ssaa)
        rgb, opacity = stage_render(view)
        rgb, opacity = rgb.float().cpu().clamp(0, 1), opacity.float().cpu().reshape(view.height, view.width)
        rows.append({"view": view.name, "elevation": round(view.elevation, 4), "azimuth": round(view.azimuth, 4),
                     "psnr": round(psnr(ex["rgb"], rgb), 3), "mask_iou": round(mask_iou(ex["coverage"] > 0.5, opacity > 0.5), 4)})
        images.append((ex["rgb"].numpy(), rgb.numpy()))
    return {"views": rows, "images": images}


def summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    ref = next(r for r in rows if r["view"] == "reference")
    novel = [r for r in rows if r["view"] != "reference"]
    mean = (lambda k: round(float(np.mean([r[k] for r in novel])), 4) if novel else None)  # noqa: E731
    return {"reference": {"psnr": ref["psnr"], "mask_iou": ref["mask_iou"]},
            "novel_mean": {"psnr": mean("psnr"), "mask_iou": mean("mask_iou")},
            "targets": {"reference_psnr_db": TARGET_PSNR, "reference_mask_iou": TARGET_IOU},
            "meets_targets": bool(ref["psnr"] >= TARGET_PSNR and ref["mask_iou"] >= TARGET_IOU)}


def preview(images: List[Tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Left: reference (exported above, stage below); right: the novel views, 4 per row, each exported | stage."""
    (ref_ex, ref_st), novel = images[0], images[1:]
    h, w = ref_ex.shape[:2]
    gap = np.ones((h, max(2, w // 16), 3), np.float32)
    cells = [np.concatenate([e, s, gap], 1) for e, s in novel]
    rows = []
    for i in range(0, len(cells), 4):
        row = cells[i:i + 4]
        row += [np.ones_like(cells[0])] * (4 - len(row))
        rows.append(np.concatenate(row, 1))
    left = np.concatenate([ref_ex, ref_st] + [np.ones((h, w, 3), np.float32)] * max(0, len(rows) - 2), 0)
    right = np.concatenate(rows, 0) if rows else np.ones((2 * h, 0, 3), np.float32)
    hh = max(left.shape[0], right.shape[0])
    pad = lambda a: np.pad(a, ((0, hh - a.shape[0]), (0, 0), (0, 0)), constant_values=1.0)  # noqa: E731
    return np.concatenate([pad(left), np.ones((hh, 2 * gap.shape[1], 3), np.float32), pad(right)], 1)


def write_fidelity(folder: str, path: str, frame: AssetFrame, views: List[Camera], stage_render: StageRender,
                   extra: Dict[str, Any], ssaa: int = 2) -> Dict[str, Any]:
    """Measure ``path``; write ``folder``/fidelity.json and ``folder``/preview.png; return the JSON record."""
    res = measure(path, frame, views, stage_render, ssaa)
    record = {"file": os.path.basename(path), **summary(res["views"]), "views": res["views"],
              "frame": frame.describe(), **extra}
    io.save_image(os.path.join(folder, "preview.png"), preview(res["images"]))
    io.write_text(os.path.join(folder, "fidelity.json"), json.dumps(record, indent=2) + "\n")
    return record
