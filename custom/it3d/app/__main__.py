"""``python -m it3d.app``: the web app (Gradio). Binds 127.0.0.1 unless ``--host`` says otherwise; ``--share``
(a public gradio.live link) is off unless asked for.

    PYTHONPATH=custom python -m it3d.app [--host 127.0.0.1] [--port 7860] [--out outputs/app] [--gpus 0,1]
                                         [--examples DIR] [--tiny] [--share]
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys

from ..eval.runner import REPO_ROOT
from . import jobs

DEFAULT_EXAMPLES = [os.path.join(REPO_ROOT, "load", "synthetic", "rgba.png")]
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m it3d.app", description="it3d web app: one photo to a 3D asset",
                                allow_abbrev=False)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                   "0.0.0.0 serves the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--out", default=os.path.join("outputs", "app"), help="where runs live (default outputs/app)")
    p.add_argument("--gpus", default=None, help="GPU ids, one job at a time on each (default: every visible GPU; "
                   "the CPU when there is none)")
    p.add_argument("--examples", default=None, help="folder of example photos (*.png/jpg/webp or <name>/rgba.png)")
    p.add_argument("--tiny", action="store_true", help="offer (and preselect) the 'tiny' preset: tiny random "
                   "models on the CPU, to try the app without a GPU or downloads")
    return p


def gpu_slots(spec):
    if spec:
        return [g.strip() for g in spec.split(",") if g.strip()]
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(i) for i in range(n)] or [None]


def find_examples(folder):
    found = list(DEFAULT_EXAMPLES)
    if folder:
        found += sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.lower().endswith(IMAGE_EXTS))
        found += sorted(glob.glob(os.path.join(folder, "*", "rgba.png")))
    return [os.path.abspath(p) for p in found if os.path.isfile(p)]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s", stream=sys.stderr)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from . import ui

    out = os.path.abspath(args.out)
    os.makedirs(jobs.runs_dir(out), exist_ok=True)
    slots = gpu_slots(args.gpus)
    sched = jobs.Scheduler(out, slots).start()
    examples = find_examples(args.examples)
    logging.getLogger("it3d.app").info(f"runs in {out}; one job at a time on "
                                       + (", ".join(f"GPU {s}" for s in slots) if slots != [None] else "the CPU"))
    demo = ui.build(sched, examples, tiny=args.tiny)
    allowed = [out] + sorted({os.path.dirname(p) for p in examples})
    try:
        demo.queue(default_concurrency_limit=4).launch(
            server_name=args.host, server_port=args.port, share=args.share, allowed_paths=allowed, ssr_mode=False,
            show_error=True, footer_links=[], css=ui.CSS,
            theme=gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],  # no web fonts: works offline
                                    font_mono=["ui-monospace", "monospace"]))
    finally:
        sched.shutdown(kill=True)  # a job never outlives its app unnoticed: it shows as interrupted, resumable
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
