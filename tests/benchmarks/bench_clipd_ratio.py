"""Gradient of the CLIP-D branch vs the SDS branch on the rendered image (calibrates ``clip_weight``).

The ``clip-d`` guidance gives a sample the CLIP loss when t < ``clip_threshold`` and the SDS loss
otherwise, so the two halves of the coarse stage are pulled by gradients of unrelated sizes. This
script builds the guidance exactly as configs/tiny/make-it-3d.yaml does (tiny Stable Diffusion,
tiny CLIP, 64 x 64, guidance scale 11, t in [200, 600]) with ``clip_weight: 1``, feeds it the
synthetic scene's reference view seen from a novel azimuth (the tiny coarse stage's first renders
look like it) and, for ``--draws`` timesteps of each branch, records the norm of the gradient that
reaches the rendered image. The ratio of the means is the ``clip_weight`` that makes the branches
move the NeRF equally:

    python tests/benchmarks/bench_clipd_ratio.py [--draws 64] [--size 64]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "custom"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--azimuth", type=float, default=60.0, help="view of the rendered image (not a back view)")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import it3d  # noqa: F401
    from it3d.core import registry
    from it3d.core import cameras
    from it3d.testing import tiny_model_dir
    from it3d.testing.scene import reference_camera, render_view

    torch.manual_seed(0)
    g = registry.get("guidance", "clip-d")({
        "pretrained_model_name_or_path": tiny_model_dir("sd"), "clip_model_name_or_path": tiny_model_dir("clip"),
        "resolution": 64, "guidance_scale": 11.0, "min_step_percent": 0.2, "max_step_percent": 0.6,
        "clip_threshold": 400, "clip_weight": 1.0, "skip_back_views": False, "seed": 0,
        "prompt_processor": {"cache_dir": "", "view_dependent_prompting": False}}, path="clip_d", device="cpu")
    ref_c2w = reference_camera()
    def on_white(view):
        rgba = view["rgba"]
        return (rgba[..., :3] * rgba[..., 3:] + 1.0 - rgba[..., 3:])[None]

    ref = on_white(render_view(ref_c2w, 60.0, 256, 256))
    g.set_prompt("a striped egg on an orange box")
    g.set_reference({"rgb": ref, "azimuth": torch.tensor([0.0])})
    c2w = cameras.spherical_c2w(10.0, a.azimuth, 1.0)
    img = on_white(render_view(c2w, 60.0, a.size, a.size))
    batch = {"elevation": torch.tensor([10.0]), "azimuth": torch.tensor([a.azimuth]),
             "camera_distances": torch.tensor([1.0])}
    gen = torch.Generator().manual_seed(1)
    norms = {"sds": [], "clip": []}
    for branch, (lo, hi) in (("sds", (400, 600)), ("clip", (200, 399))):
        for _ in range(a.draws):
            rgb = img.clone().requires_grad_(True)
            t = torch.randint(lo, hi + 1, (1,), generator=gen)
            out = g(rgb, batch, 0, t=t)
            assert (float(out["clip_fraction"]) == 1.0) == (branch == "clip")
            out["loss"].backward()
            norms[branch].append(float(rgb.grad.norm()))
    sds = sum(norms["sds"]) / a.draws
    clip = sum(norms["clip"]) / a.draws
    print(f"mean |dL/d rgb| over {a.draws} draws at {a.size}x{a.size}: SDS (t in [400, 600]) {sds:.4g}, "
          f"CLIP-D at clip_weight 1 (t in [200, 400)) {clip:.4g}; ratio SDS / CLIP-D = {sds / clip:.1f}")


if __name__ == "__main__":
    main()
