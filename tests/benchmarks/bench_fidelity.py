"""Floaters and reference fit of a tiny method run's coarse stage (issue 11's CPU experiment).

Trains the coarse stage of a tiny method config (the tiny random offline models, the synthetic
scene in load/synthetic) for ``--steps`` steps, then measures on the trained NeRF:

* floaters: at 8 novel views (elevation 15 deg, azimuth 22.5 + 45 k), the volume-rendering
  weight of every sample whose projection into the reference view falls outside the
  reference silhouette (dilated by ``--dilate`` px) -- i.e. opacity outside the single-view
  visual hull -- as a mean per pixel (``outside``) and as a fraction of the rendered opacity
  (``outside_frac``);
* reference fit: PSNR of the reference view (albedo, white background) against the
  reference image on white, and the opacity IoU with the reference mask.

``--root`` chooses the it3d checkout to run (its launch.py, configs and custom/), so one script
measures the code before and after a change:

    python tests/benchmarks/bench_fidelity.py --method make-it-3d --steps 200 --out /tmp/fid-after
    python tests/benchmarks/bench_fidelity.py --root /path/to/old/checkout --method make-it-3d ...
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def train(root: str, method: str, steps: int, out: str, extra) -> str:
    stages = {"make-it-3d": ["preprocess", "coarse"], "customize-it-3d": ["preprocess", "dreambooth", "coarse"]}[method]
    src = os.path.join(root, "configs", "tiny", f"{method}.yaml")
    import yaml

    with open(src) as f:
        full = yaml.safe_load(f)
    cfg_path = os.path.join(out, f"bench-{method}.yaml")
    os.makedirs(out, exist_ok=True)
    with open(cfg_path, "w") as f:  # the tiny method without its refine stage
        yaml.safe_dump({"extends": src, "stages": [s for s in full["stages"] if s["name"] in stages]}, f)
    cmd = [sys.executable, os.path.join(root, "launch.py"), "--config", cfg_path, "--train", "use_timestamp=false",
           f"exp_root_dir={out}", "~stage.refine", f"stage.coarse.trainer.max_steps={steps}",
           f"stage.coarse.checkpoint.every_n_train_steps={steps}", f"stage.coarse.trainer.val_check_interval={steps}",
           *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    t0 = time.time()
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"training failed:\n{r.stderr[-4000:]}")
    print(f"trained {method} coarse for {steps} steps in {time.time() - t0:.0f} s", file=sys.stderr)
    return os.path.join(out, f"tiny-{method}", "synthetic", "coarse")


def measure(root: str, stage_dir: str, size: int, dilate: int) -> dict:
    sys.path.insert(0, os.path.join(root, "custom"))
    import torch
    import torch.nn.functional as F

    from it3d.core import cameras
    from it3d.eval.metrics import psnr
    from it3d.systems.loading import load_stage

    system, dm = load_stage(stage_dir, "cpu")
    c = dm.cfg
    ref = dm.reference_at(size, size)
    mask = (ref["mask"][0, ..., 0] > 0.5).float()
    hull = F.max_pool2d(mask[None, None], 2 * dilate + 1, 1, dilate)[0, 0] > 0 if dilate else mask > 0
    with torch.no_grad():
        out = system.render_view(ref["c2w"][0], c.ref_fovy, size, size, normals=False)
        ref_psnr = float(psnr(out["comp_rgb"].clamp(0, 1), ref["rgb"])[0])
        op = out["opacity"][0, ..., 0] > 0.5
        iou = float((op & (mask > 0)).sum() / (op | (mask > 0)).sum().clamp_min(1))
        outside, frac = [], []
        for k in range(8):
            c2w = cameras.spherical_c2w(15.0, c.ref_azimuth + 22.5 + 45.0 * k, c.ref_distance)
            o = system.render_view(c2w, c.ref_fovy, size, size, normals=False)
            rays_o, rays_d = cameras.get_rays(c2w[None], size, size, c.ref_fovy)
            pts = rays_o[..., None, :] + rays_d[..., None, :] * o["t_samples"][..., None]
            xy, _ = cameras.project(pts.reshape(-1, 3), ref["c2w"][0], c.ref_fovy, size, size)
            col, row = xy[:, 0].floor().long(), xy[:, 1].floor().long()
            inside_img = (col >= 0) & (col < size) & (row >= 0) & (row < size)
            in_hull = torch.zeros_like(inside_img)
            in_hull[inside_img] = hull[row[inside_img], col[inside_img]]
            w = o["weights"].reshape(-1)
            out_mass = (w * (~in_hull).float()).sum()
            outside.append(float(out_mass) / size ** 2)
            frac.append(float(out_mass / w.sum().clamp_min(1e-8)))
    return {"ref_psnr": ref_psnr, "ref_mask_iou": iou, "outside": sum(outside) / 8, "outside_frac": sum(frac) / 8,
            "outside_per_view": outside}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=os.path.dirname(os.path.dirname(HERE)), help="the it3d checkout to run")
    p.add_argument("--method", default="make-it-3d", choices=["make-it-3d", "customize-it-3d"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=64, help="render size of the measurements")
    p.add_argument("--dilate", type=int, default=1, help="silhouette dilation (px) of the visual hull")
    p.add_argument("--skip-train", action="store_true", help="measure an earlier run in --out")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for launch.py")
    a = p.parse_args()
    root = os.path.abspath(a.root)
    stage = os.path.join(a.out, f"tiny-{a.method}", "synthetic", "coarse")
    if not a.skip_train:
        stage = train(root, a.method, a.steps, os.path.abspath(a.out), a.overrides)
    res = measure(root, stage, a.size, a.dilate)
    print(json.dumps({"method": a.method, "steps": a.steps, "root": root, **res}, indent=1))


if __name__ == "__main__":
    main()
