"""What the app's method and preset choices mean: the config files a job launches with.

``paper`` is the method config as published (``configs/<method>.yaml``); ``preview`` merges
``configs/presets/<method>-preview.yaml`` over it (fewer steps, the schedules scaled to match);
``tiny`` (offered with ``--tiny``) is ``configs/tiny/<method>.yaml``: tiny random offline models on the
CPU, for trying the app without a GPU or downloads -- the result is noise.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from ..eval.runner import REPO_ROOT

CONFIGS = os.path.join(REPO_ROOT, "configs")
METHODS: Dict[str, str] = {"Make-It-3D": "make-it-3d", "Customize-It-3D": "customize-it-3d"}
PRESETS: Dict[str, str] = {
    "preview": "fewer steps: a look at the result in minutes on one GPU",
    "paper": "the paper's settings (tens of minutes on one GPU)",
    "tiny": "CPU smoke test with tiny random models (no downloads; the result is noise)",
}


def preset_names(tiny: bool) -> List[str]:
    return [p for p in PRESETS if tiny or p != "tiny"]


def config_files(method: str, preset: str) -> List[str]:
    if method not in METHODS.values():
        raise ValueError(f"unknown method '{method}' (known: {', '.join(METHODS.values())})")
    if preset == "paper":
        return [os.path.join(CONFIGS, f"{method}.yaml")]
    if preset == "preview":
        return [os.path.join(CONFIGS, f"{method}.yaml"), os.path.join(CONFIGS, "presets", f"{method}-preview.yaml")]
    if preset == "tiny":
        return [os.path.join(CONFIGS, "tiny", f"{method}.yaml")]
    raise ValueError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")


def eval_models(preset: str) -> Tuple[str, str]:
    """(LPIPS, CLIP) for the trial's report: the tiny fixtures for ``tiny``, else the defaults."""
    from ..eval.lpips import DEFAULT_ID
    from ..eval.metrics import DEFAULT_CLIP

    if preset == "tiny":
        from ..testing import tiny_model_dir

        return tiny_model_dir("lpips"), tiny_model_dir("clip")
    return DEFAULT_ID, DEFAULT_CLIP
