"""Fit the coarse stage without guidance and print reference-view figures.

    python tests/benchmarks/bench_coarse_fit.py [--image load/synthetic/rgba.png] [--steps 300] [--out DIR]

Trains ``configs/tiny/coarse.yaml`` (64x64, no guidance) through launch.py's code path, exports
the mesh, then prints: masked reference-view PSNR (foreground pixels, mask > 0.5), Pearson
correlation of the rendered z-depth with the input depth map on the foreground (input depth
"larger = farther" after the datamodule's conversion), and the IoU of the exported mesh's
silhouette from the reference camera with the input mask. Used by tests/test_coarse_e2e.py.
RealFusion15 photos: ``--image /work/shared/data/realfusion15/cactus/rgba.png`` (read in place).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "custom"))
sys.path.insert(0, ROOT)


def train_and_export(image: str, steps: int, out_dir: str, extra=()) -> str:
    """Train + export in ``out_dir`` (trial dir); returns it."""
    from launch import main

    cfg = os.path.join(ROOT, "configs", "tiny", "coarse.yaml")
    common = [f"data.image_path={image}", f"trial_dir={out_dir}", f"trainer.max_steps={steps}",
              f"trainer.val_check_interval={steps}", *extra]
    assert main(["--config", cfg, "--train", *common]) == 0  # after_train (default): --test and --export too
    if not os.path.isfile(os.path.join(out_dir, "save", "export", "mesh.obj")):
        assert main(["--config", os.path.join(out_dir, "configs", "parsed.yaml"), "--export"]) == 0
    return out_dir


def evaluate(stage_dir: str) -> dict:
    import torch
    import trimesh

    from it3d.losses import pearson
    from it3d.renderers.mesh_rasterizer import rasterize_mesh
    from it3d.systems.loading import load_stage

    system, dm = load_stage(stage_dir, "cpu")
    h, w = dm.resolution(10 ** 9)
    ref = dm.reference_at(h, w)
    out = system.render_view(ref["c2w"][0], float(ref["fovy"][0]), h, w, shading="albedo")
    fg = ref["mask"][0, ..., 0] > 0.5
    mse = ((out["comp_rgb"][0] - ref["rgb"][0]) ** 2).mean(-1)[fg].mean()
    res = {"psnr_masked": float(-10 * torch.log10(mse)),
           "pearson_depth": float(pearson(out["z_depth"][0, ..., 0][fg], ref["depth"][0, ..., 0][fg])),
           "opacity_iou": float(((out["opacity"][0, ..., 0] > 0.5) & fg).sum() / ((out["opacity"][0, ..., 0] > 0.5) | fg).sum())}
    mesh_path = os.path.join(stage_dir, "save", "export", "mesh.obj")
    if os.path.isfile(mesh_path):
        mesh = trimesh.load(mesh_path, force="mesh", process=False)
        # the OBJ is in the asset frame (glTF: +Y up, metres, front +Z); fidelity.json holds world -> asset
        import numpy as np

        with open(os.path.join(stage_dir, "save", "export", "fidelity.json")) as fh:
            to_asset = np.asarray(json.load(fh)["frame"]["world_to_asset"], dtype=np.float64)
        verts = np.c_[np.asarray(mesh.vertices, dtype=np.float64), np.ones(len(mesh.vertices))] @ np.linalg.inv(to_asset).T
        v = torch.tensor(verts[:, :3], dtype=torch.float32)
        f = torch.tensor(mesh.faces, dtype=torch.long)
        sil = rasterize_mesh(v, f, ref["c2w"][0], float(ref["fovy"][0]), h, w)["mask"]
        res["mesh_iou"] = float((sil & fg).sum() / (sil | fg).sum())
        res["mesh_faces"] = int(f.shape[0])
    return res


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--image", default=os.path.join(ROOT, "load", "synthetic", "rgba.png"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default=None)
    p.add_argument("--eval-only", action="store_true")
    a, extra = p.parse_known_args()
    out = a.out or os.path.join(ROOT, "outputs", "bench-coarse", os.path.basename(os.path.dirname(os.path.abspath(a.image))))
    t = time.time()
    if not a.eval_only:
        train_and_export(a.image, a.steps, out, extra)
    r = evaluate(out)
    r["seconds"] = round(time.time() - t, 1)
    print(json.dumps({"image": a.image, "steps": a.steps, **r}))
