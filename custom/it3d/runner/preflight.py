"""Pre-flight: every pretrained model a run will load, found (or not) before any stage starts.

:func:`required_models` walks each stage's *parsed* config -- the component tree the stage will
build: ``*_type`` sub-components, named guidance / loss terms, nested option dataclasses -- and
collects every ``*model_name_or_path`` value with the full key that sets it
(``stage.coarse.system.guidance.zero123.pretrained_model_name_or_path``). It skips what will not be
loaded: finished stages, entries set to ``null``, terms whose weight is a constant 0, option blocks
with ``enabled: false``, estimators of type ``none``, and folders an earlier stage of the run writes
(``${stage_dirs.dreambooth}/save/pipeline``). :func:`check` locates each model (local folder,
``$IT3D_MODEL_ROOT``, HF cache, or a reachable hub) without loading it and raises one
:class:`PreflightError` that lists every missing one with remedies that work as written.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..core import hub, registry
from ..core.config import parse_structured, split_term
from ..core.errors import It3dError


class PreflightError(It3dError):
    """Missing models; ``lines`` holds one line per model (printed above the final ``error:`` line)."""

    def __init__(self, message: str, lines: List[str]) -> None:
        super().__init__(message)
        self.lines = lines


@dataclass
class ModelRef:
    id: str
    keys: List[str] = field(default_factory=list)  # every config key that names it
    stages: List[str] = field(default_factory=list)
    status: str = ""  # local | model-root | cache | hub | missing | stage:<name>
    path: Optional[str] = None


# ----------------------------------------------------------------------------- walking a config
def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _constant_zero(weight: Any) -> bool:
    return isinstance(weight, (int, float)) and not isinstance(weight, bool) and float(weight) == 0.0


def walk_models(config_cls: Any, raw: Any, path: str) -> Iterator[Tuple[str, str]]:
    """``(dotted key, model id)`` for every ``*model_name_or_path`` the component tree of ``config_cls``
    (parsed from ``raw``) will load."""
    parsed = raw if dataclasses.is_dataclass(raw) and not isinstance(raw, type) else \
        parse_structured(config_cls, raw, path)
    yield from _walk_parsed(type(parsed), parsed, path)


def _walk_parsed(config_cls: Any, parsed: Any, path: str) -> Iterator[Tuple[str, str]]:
    if getattr(parsed, "enabled", True) is False:
        return
    handled = set()
    fields = dataclasses.fields(config_cls)
    for f in fields:
        kind = f.metadata.get("kind")
        if kind:
            sub = f.metadata.get("config_field") or f.name[: -len("_type")]
            handled.add(sub)
            type_name = getattr(parsed, f.name)
            if type_name in (None, "", "none"):
                continue
            cls = registry.get(kind, type_name)
            yield from walk_models(cls.Config, getattr(parsed, sub, None) or {}, _join(path, sub))
        tkind = f.metadata.get("terms")
        if tkind:
            handled.add(f.name)
            for name, entry in (getattr(parsed, f.name) or {}).items():
                if entry is None:
                    continue
                type_name, weight, rest = split_term(name, entry, _join(path, f.name))
                if _constant_zero(weight):
                    continue  # never built (BaseSystem.build_terms skips constant-zero terms)
                cls = registry.get(tkind, type_name)
                yield from walk_models(cls.Config, rest, _join(path, f"{f.name}.{name}"))
    for f in fields:
        if f.name in handled or f.metadata.get("kind") or f.metadata.get("terms"):
            continue
        val = getattr(parsed, f.name)
        if dataclasses.is_dataclass(val):
            yield from _walk_parsed(type(val), val, _join(path, f.name))
        elif f.name.endswith("model_name_or_path") and isinstance(val, str) and val not in ("", "???"):
            yield _join(path, f.name), val


# ----------------------------------------------------------------------------- stages
def stage_models(spec: Any, scfg: Any, root_cfg: Any, staged: bool) -> Iterator[Tuple[str, str]]:
    """Models one stage loads, keyed as a user sets them (``stage.<name>.`` in a staged config)."""
    from omegaconf import OmegaConf

    if spec.run == "preprocess":
        from ..preprocess.config import PreprocessConfig

        data = OmegaConf.to_container(scfg.get("data", {}), resolve=True) or {}
        pre = parse_structured(PreprocessConfig, data.get("preprocess", {}) or {}, "data.preprocess")
        # normals are computed from the depth map whenever there is one (estimated or given): the normal
        # estimator's own depth model is then never loaded
        has_depth = pre.depth_type not in (None, "", "none") or pre.depth_path
        for key, mid in walk_models(PreprocessConfig, pre, "data.preprocess"):  # set at the top: data.preprocess.*
            if not (has_depth and key.startswith("data.preprocess.normal.depth.")):
                yield key, mid
        return
    prefix = f"stage.{spec.name}." if staged else ""
    if spec.run == "text-to-image":
        from .pipeline import own_config
        from .text_to_image import TextToImageConfig

        for key, mid in walk_models(TextToImageConfig, own_config(root_cfg, spec), ""):
            yield prefix + key, mid
        return
    from ..core.config import ExperimentConfig

    raw = OmegaConf.to_container(scfg, resolve=True)
    for key in ("stages", "stage", "stage_dirs"):
        raw.pop(key, None)
    for key, mid in walk_models(ExperimentConfig, raw, ""):
        yield prefix + key, mid


def required_models(root_cfg: Any, stages: List[tuple], staged: bool = True) -> List[ModelRef]:
    """Every model the not-yet-finished stages will load, each with its status (see :func:`hub.locate`)."""
    from .pipeline import is_done

    stage_dirs = {spec.name: os.path.abspath(str(scfg.trial_dir)) for spec, scfg, _ in stages}
    refs: Dict[str, ModelRef] = {}
    for i, (spec, scfg, _) in enumerate(stages):
        if is_done(str(scfg.trial_dir)):
            continue
        for key, mid in stage_models(spec, scfg, root_cfg, staged):
            ref = refs.setdefault(mid, ModelRef(mid))
            if key not in ref.keys:
                ref.keys.append(key)
            if spec.name not in ref.stages:
                ref.stages.append(spec.name)
    earlier = {s.name: stage_dirs[s.name] for s, _, _ in stages}
    for ref in refs.values():
        made_by = [n for n, d in earlier.items() if os.path.abspath(ref.id).startswith(d + os.sep)]
        if made_by:
            ref.status, ref.path = f"stage:{made_by[0]}", ref.id
        else:
            ref.status, ref.path = hub.locate(ref.id)
    return list(refs.values())


def missing_lines(refs: List[ModelRef]) -> List[str]:
    lines = []
    for r in refs:
        if r.status != "missing":
            continue
        keys = " / ".join(r.keys)
        if os.path.isabs(r.id) or r.id.startswith((".", "~")):
            lines.append(f"  - {r.id}: no such folder (set by {keys}); point the key at a model folder, "
                         f"e.g. {r.keys[0]}=/models/<name>")
        else:
            lines.append(f"  - {r.id} (used by {', '.join(r.stages)}): `hf download {r.id}`, "
                         f"or {r.keys[0]}=/path/to/local/dir, or put it under $IT3D_MODEL_ROOT/{r.id}"
                         + (f" (also set by {', '.join(r.keys[1:])})" if len(r.keys) > 1 else ""))
    return lines


def check(refs: List[ModelRef]) -> None:
    """Raise one :class:`PreflightError` naming every missing model."""
    lines = missing_lines(refs)
    if lines:
        n = len(lines)
        why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") else \
            "not in the local Hugging Face cache and the hub cannot be reached"
        raise PreflightError(f"{n} pretrained model{'s are' if n > 1 else ' is'} not available ({why}); nothing "
                             "was run. Provide each as listed above, then run the same command again", lines)


def plan_stages(cfg: Any, parsed: Any, device: str) -> List[tuple]:
    """``(spec, stage config, parsed)`` of every stage (a single-stage config is one stage named after it)."""
    if parsed.stages:
        from .pipeline import prepare_stages

        return prepare_stages(cfg, device)
    from .pipeline import StageSpec

    run = "preprocess" if cfg.get("data", {}) and not cfg.get("system_type") and not cfg.get("system") else "lightning"
    return [(StageSpec(name=str(parsed.name), run=run), cfg, parsed)]


def preflight(cfg: Any, parsed: Any, mode: str, device: str, dry_run: bool = False) -> None:
    """Before ``--train`` / ``--preprocess`` (and for ``--dry-run``): every model the run needs, located;
    one :class:`PreflightError` for all the missing ones. ``--dry-run`` also prints the stage plan and
    writes the resolved configs to ``<trial>/dry-run/``."""
    import logging

    from .pipeline import is_done

    stages = plan_stages(cfg, parsed, device)
    if mode == "preprocess":
        stages = [t for t in stages if t[0].run == "preprocess"]
    refs = required_models(cfg, stages, staged=bool(parsed.stages))
    if dry_run:
        from .plan import format_plan, stage_plan, write_dry_run

        plans = [stage_plan(spec, scfg, refs, is_done(str(scfg.trial_dir))) for spec, scfg, _ in stages]
        text = format_plan(str(cfg.trial_dir), str(parsed.precision), plans)
        print(text)
        out = write_dry_run(cfg, stages, str(cfg.trial_dir), text)
        logging.getLogger("it3d").info(f"dry run: plan and resolved configs in {out}")
    check(refs)
