"""``--dry-run``: the stage plan of a run -- what each stage will do and with which models -- and
each stage's fully resolved config, written to ``<trial>/dry-run/`` without training anything."""
from __future__ import annotations

import os
from typing import Any, Dict, List

from omegaconf import OmegaConf

from ..core import io
from ..core.config import split_term
from ..core.layout import StageDir
from .preflight import ModelRef

STATUS = {"local": "local folder", "model-root": "$IT3D_MODEL_ROOT", "cache": "HF cache", "hub": "will download",
          "missing": "MISSING"}


def _get(node: Any, dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if node is None or part not in node:
            return default
        node = node[part]
    return node


def _steps(scfg: Any) -> str:
    if _get(scfg, "data_type") == "dreambooth":
        mods = _get(scfg, "data.modalities", []) or []
        scale = float(_get(scfg, "data.step_scale", 1.0) or 1.0)
        from ..data.dreambooth_data import scaled_steps

        parts = [(m.get("modality"), scaled_steps(m.get("steps", 0), scale)) for m in mods]
        return f"{sum(n for _, n in parts)} (" + " + ".join(f"{mod} {n}" for mod, n in parts) + ")"
    steps = _get(scfg, "trainer.max_steps")
    return "-" if steps is None else str(steps)


def _resolution(scfg: Any) -> str:
    if _get(scfg, "data_type") == "dreambooth":
        return f"{_get(scfg, 'data.resolution')} px"
    hs, ws = _get(scfg, "data.heights"), _get(scfg, "data.widths")
    if not hs:
        return "-"
    sizes = [f"{h}x{w}" for h, w in zip(hs, ws or hs)]
    miles = list(_get(scfg, "data.resolution_milestones", []) or [])
    if len(sizes) > 1 and miles:
        return ", ".join([sizes[0]] + [f"{s} from step {m}" for s, m in zip(sizes[1:], miles)])
    return sizes[0]


def _guidance(scfg: Any) -> List[str]:
    out = []
    for name, entry in (_get(scfg, "system.guidance", {}) or {}).items():
        if entry is None:
            continue
        type_name, weight, rest = split_term(name, entry, "system.guidance")
        res = rest.get("resolution")
        out.append(f"{name} ({type_name}) weight {weight}" + (f" at {res} px" if res else ""))
    return out


def stage_plan(spec: Any, scfg: Any, refs: List[ModelRef], done: bool) -> Dict[str, Any]:
    return {"name": spec.name, "run": spec.run, "status": "finished, skipped" if done else "to run",
            "system": _get(scfg, "system_type", "-") if spec.run == "lightning" else spec.run,
            "steps": _steps(scfg) if spec.run == "lightning" else "-",
            "resolution": _resolution(scfg) if spec.run == "lightning" else "-",
            "guidance": _guidance(scfg) if spec.run == "lightning" else [],
            "models": [(r.id, STATUS.get(r.status, r.status.replace("stage:", "made by stage "))) for r in refs
                       if spec.name in r.stages]}


def format_plan(trial_dir: str, precision: str, plans: List[Dict[str, Any]]) -> str:
    lines = [f"plan for {trial_dir} (precision {precision}):"]
    for i, p in enumerate(plans, 1):
        lines.append(f"{i}. {p['name']} [{p['system']}] {p['status']}: steps {p['steps']}, resolution {p['resolution']}")
        for g in p["guidance"]:
            lines.append(f"     guidance {g}")
        for mid, status in p["models"]:
            lines.append(f"     model {mid}: {status}")
    return "\n".join(lines)


def write_dry_run(root_cfg: Any, stages: List[tuple], trial_dir: str, text: str) -> str:
    """``<trial>/dry-run/plan.txt``, ``root.yaml`` and ``<stage>.yaml`` (fully resolved); returns the folder."""
    out = StageDir(trial_dir).dry_run
    os.makedirs(out, exist_ok=True)
    io.write_text(os.path.join(out, "plan.txt"), text + "\n")
    io.write_text(os.path.join(out, "root.yaml"), OmegaConf.to_yaml(root_cfg, resolve=True))
    for spec, scfg, _ in stages:
        io.write_text(os.path.join(out, f"{spec.name}.yaml"), OmegaConf.to_yaml(scfg, resolve=True))
    return out
