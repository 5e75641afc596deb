"""Load a finished stage for the next one: ``load_stage(stage_dir)`` -> (system, datamodule).

Reads ``<stage_dir>/configs/parsed.yaml`` and the stage's newest readable checkpoint
(``ckpts/last.ckpt``, else the one before it, with a warning); the system is
built without its guidance models (they are not in checkpoints and are not needed to render),
put in eval mode on ``device``; the datamodule is prepared (``dm.reference``, ``dm.caption``).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from omegaconf import OmegaConf

from ..core import registry
from ..core.checkpoint import newest_readable, require_readable
from ..core.config import validate_experiment
from ..core.errors import It3dError
from ..core.layout import StageDir
from ..core.prepared import use_stage_record


def load_stage(stage_dir: Optional[str] = None, device="cpu", config_path: Optional[str] = None,
               ckpt_path: Optional[str] = None, build_guidance: bool = False,
               datamodule: bool = True) -> Tuple[object, object]:
    """``stage_dir`` (its configs/parsed.yaml + newest readable checkpoint), or explicit ``config_path`` + ``ckpt_path``.
    ``datamodule=False``: the system only (``(system, None)``), as the refine stage loads the coarse one: it takes
    its reference from its own datamodule, so the coarse stage's is never built."""
    if stage_dir is None and not (config_path and ckpt_path):
        raise It3dError("load_stage: give a stage dir, or both config_path and ckpt_path")
    cfg_path = config_path or StageDir(stage_dir).parsed_config
    if stage_dir is None:
        stage_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path)))
    if not os.path.isfile(cfg_path):
        raise It3dError(f"load_stage: {cfg_path} not found: is {stage_dir} a trained stage's trial dir?")
    if ckpt_path:
        require_readable(ckpt_path, "load_stage")
    else:
        ckpt_path = newest_readable(StageDir(stage_dir).ckpts)
    if not ckpt_path:
        raise It3dError(f"load_stage: no checkpoint in {stage_dir}/ckpts: train the stage first")
    import it3d  # noqa: F401  (registers every component)

    cfg = OmegaConf.load(cfg_path)
    device = torch.device(device)
    cfg.system.device = str(device)
    parsed = validate_experiment(cfg)
    dm = registry.get("datamodule", parsed.data_type)(cfg.get("data", {}), path="data") if datamodule else None
    system = registry.get("system", parsed.system_type)(cfg.get("system", {}), resumed=True,
                                                        save_dir=os.path.join(stage_dir, "save"), path="system",
                                                        **({} if build_guidance else {"build_guidance": False}))
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    missing, unexpected = system.load_state_dict(state.get("state_dict", state), strict=False)
    if unexpected or [k for k in missing if not k.startswith("guidance")]:
        raise It3dError(f"load_stage: {ckpt_path} does not match the config's system "
                        f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    system.set_step(int(state.get("global_step", 0)))
    system.do_update_step(0, system.resumed_step, on_load_weights=True)
    system.to(device).eval()
    use_stage_record(dm, stage_dir)
    if hasattr(dm, "prepare"):
        dm.prepare()
    return system, dm
