"""``python -m it3d.preprocess IMAGE [--cache-dir D] [--mask-model ID] ...``: preprocess one photo."""
from __future__ import annotations

import argparse
import logging
import sys

from ..core.errors import It3dError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m it3d.preprocess",
                                description="Mask, recentre, depth, normal and caption of a photo (cached).")
    p.add_argument("image")
    p.add_argument("--cache-dir", default=None, help="where the outputs go (default: beside the image)")
    p.add_argument("--size", type=int, default=None, help="side of the recentred square")
    p.add_argument("--border-ratio", type=float, default=None)
    p.add_argument("--mask", default=None, help="a mask for the photo (skips mask estimation)")
    p.add_argument("--mask-model", default=None, help="SAM model id or dir")
    p.add_argument("--depth-model", default=None, help="depth model id or dir")
    p.add_argument("--caption-model", default=None, help="BLIP model id or dir")
    p.add_argument("--caption", default=None, help="use this caption instead of estimating one")
    p.add_argument("--no-normal", action="store_true")
    p.add_argument("--no-caption", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s", stream=sys.stderr)
    cfg = {"cache_dir": a.cache_dir, "overwrite": a.overwrite, "dtype": a.dtype}
    for key, val in (("size", a.size), ("border_ratio", a.border_ratio), ("mask_path", a.mask),
                     ("caption", a.caption)):
        if val is not None:
            cfg[key] = val
    for key, val in (("mask", a.mask_model), ("depth", a.depth_model), ("caption_model", a.caption_model)):
        if val:
            cfg[key] = {"pretrained_model_name_or_path": val}
    if a.depth_model:
        cfg["normal"] = {"depth": {"pretrained_model_name_or_path": a.depth_model}}
    if a.no_normal:
        cfg["normal_type"] = "none"
    if a.no_caption:
        cfg["caption_type"] = "none"
    try:
        import it3d  # noqa: F401  (registers the estimators)
        from .entry import ensure_preprocessed

        out = ensure_preprocessed(a.image, cfg, a.device)
    except It3dError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    import dataclasses

    for key, val in dataclasses.asdict(out).items():
        if val not in (None, ""):
            print(f"{key}: {val}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
