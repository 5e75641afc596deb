"""Staged pipelines: run a method's stages in order inside one trial dir.

A staged config lists its stages::

    stages:
      - {name: preprocess, run: preprocess}
      - {name: dreambooth, config: stages/dreambooth.yaml}
      - {name: coarse, config: stages/coarse.yaml, overrides: {system: {...}}}
      - {name: refine, config: stages/refine.yaml}

Each stage's config = its own file (paths relative to ``configs/``) <- the root's shared
sections (``data``, ``seed``, ``name``, ``tag``) <- the stage's ``overrides`` <- ``stage.<name>``
(the place for command-line overrides: ``stage.coarse.system.guidance.zero123.weight=0``).
Stages live in ``<trial>/<name>/`` and refer to earlier ones with ``${stage_dirs.<name>}``.

A stage is finished when ``<stage dir>/stats.json`` exists (written last, with its wall time
and peak memory). Re-running on the same trial dir (``trial_dir=...`` or
``resume=<trial dir or a stage checkpoint>``) skips finished stages and resumes the
interrupted one from its ``ckpts/last.ckpt``.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from ..core import io
from ..core.config import ConfigError, load_yaml, parse_structured, validate_experiment
from ..core.errors import It3dError

log = logging.getLogger("it3d")
CONFIG_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))),
                           "configs")
SHARED_KEYS = ("name", "tag", "seed", "exp_root_dir", "use_timestamp", "timestamp", "description", "precision")
RUNS = ("lightning", "preprocess", "text-to-image")


@dataclass
class StageSpec:
    name: str = "???"
    config: Any = None  # a file, or a list of files merged in order (paths relative to configs/)
    run: str = "lightning"
    overrides: dict = field(default_factory=dict)


def stage_specs(cfg: DictConfig) -> List[StageSpec]:
    specs = []
    for i, entry in enumerate(cfg.stages):
        spec = parse_structured(StageSpec, entry, f"stages.{i}")
        if spec.run not in RUNS:
            raise ConfigError(f"stages.{i}.run: unknown run type '{spec.run}' (use one of {', '.join(RUNS)})")
        if spec.run == "lightning" and not spec.config:
            raise ConfigError(f"stages.{i}.config: stage '{spec.name}' needs a config file")
        specs.append(spec)
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"stages: duplicate stage name '{sorted(dup)[0]}'")
    for key in cfg.get("stage", {}) or {}:
        if key not in names:
            from ..core.registry import suggest

            raise ConfigError(f"unknown config key 'stage.{key}': no stage named '{key}'{suggest(key, names)} "
                              f"(stages: {', '.join(names)})")
    for key in ("system", "system_type", "data_type", "trainer", "checkpoint"):
        if cfg.get(key):
            raise ConfigError(f"'{key}' is set at the top of a staged config; address a stage instead, e.g. "
                              f"stage.{names[-1]}.{key}... (stages: {', '.join(names)})")
    return specs


def resolve_config_path(path: str) -> str:
    if os.path.isabs(path) or os.path.isfile(path):
        return path
    cand = os.path.join(CONFIG_ROOT, path)
    if os.path.isfile(cand):
        return cand
    raise ConfigError(f"stage config not found: {path} (looked in . and {CONFIG_ROOT})")


def trial_dir_from_resume(resume: str) -> str:
    """``resume`` may be a staged trial dir or a checkpoint inside one (``<trial>/<stage>/ckpts/x.ckpt``)."""
    if os.path.isdir(resume):
        return resume
    if os.path.isfile(resume):
        return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(resume))))
    raise It3dError(f"resume: not found: {resume}")


def build_stage_config(cfg: DictConfig, spec: StageSpec, trial_dir: str, specs: List[StageSpec]) -> DictConfig:
    files = [] if not spec.config else [spec.config] if isinstance(spec.config, str) else list(spec.config)
    base = OmegaConf.create()
    for f in files:
        base = OmegaConf.merge(base, load_yaml(resolve_config_path(str(f))))
    # the root's own sections resolve against the root (where ${stage_dirs.x} and ${stage.x} live)
    def rooted(node):
        return OmegaConf.create(OmegaConf.to_container(node, resolve=True, throw_on_missing=False))

    shared = {k: cfg[k] for k in SHARED_KEYS if k in cfg}
    layers = [base, OmegaConf.create(shared)]
    if "data" in cfg:
        layers.append(OmegaConf.create({"data": rooted(cfg.data)}))
    layers.append(OmegaConf.create(spec.overrides or {}))
    own = (cfg.get("stage", {}) or {}).get(spec.name)
    if own:
        layers.append(rooted(own))
    scfg = OmegaConf.merge(*layers)
    scfg.trial_dir = os.path.join(trial_dir, spec.name)
    scfg.stage_dirs = {s.name: os.path.join(trial_dir, s.name) for s in specs}
    scfg.resume = None
    scfg.stages = []
    scfg.stage = {}
    return scfg


def own_config(cfg: DictConfig, spec: StageSpec) -> DictConfig:
    """Config of a non-Lightning stage: its ``overrides`` <- ``stage.<name>``."""
    return OmegaConf.merge(OmegaConf.create(spec.overrides or {}),
                           OmegaConf.create((cfg.get("stage", {}) or {}).get(spec.name, {}) or {}))


def prepare_stages(cfg: DictConfig, device: str) -> List[tuple]:
    """Build and validate every stage's config before any work starts."""
    specs = stage_specs(cfg)
    trial_dir = str(cfg.trial_dir)
    out = []
    for spec in specs:
        scfg = build_stage_config(cfg, spec, trial_dir, specs)
        if spec.run == "text-to-image":
            from .text_to_image import TextToImageConfig

            parse_structured(TextToImageConfig, own_config(cfg, spec), f"stage.{spec.name}")
            parsed = None
        elif spec.run == "lightning":
            if "system" in scfg and scfg.system.get("device", "auto") == "auto":
                scfg.system.device = device
            try:
                parsed = validate_experiment(scfg)
            except ConfigError as e:
                raise ConfigError(f"stage '{spec.name}': {e}") from None
        else:
            parsed = None
        out.append((spec, scfg, parsed))
    return out


def is_done(stage_dir: str) -> bool:
    return os.path.isfile(os.path.join(stage_dir, "stats.json"))


def _reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def write_stats(stage_dir: str, wall_s: float) -> Dict[str, Any]:
    """wall time and the stage's peak GPU memory; peak RSS is the process's peak so far (it cannot be reset)."""
    import torch

    stats = {"wall_s": round(wall_s, 3),
             "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
             "peak_gpu_mem_bytes": int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None}
    io.write_text(os.path.join(stage_dir, "stats.json"), json.dumps(stats, indent=2) + "\n")
    return stats


def run_pipeline(cfg: DictConfig, parsed: Any, mode: str, dev: dict, stage: Optional[str] = None) -> str:
    from ..run import run_stage, write_configs

    trial_dir = str(cfg.trial_dir)
    stages = prepare_stages(cfg, dev["device"])
    names = [s.name for s, _, _ in stages]
    if stage is not None and stage not in names:
        from ..core.registry import suggest

        raise It3dError(f"--stage {stage}: no such stage{suggest(stage, names)} (stages: {', '.join(names)})")

    if mode in ("test", "export", "validate"):
        candidates = [t for t in stages if t[0].run == "lightning" and (stage is None or t[0].name == stage)]
        done = [t for t in candidates if os.path.isfile(os.path.join(t[1].trial_dir, "ckpts", "last.ckpt"))]
        if not done:
            raise It3dError(f"--{mode}: no trained stage with a checkpoint in {trial_dir}"
                            + (f" (stage '{stage}')" if stage else "") + "; run --train first")
        spec, scfg, sparsed = done[-1]
        scfg.resume = os.path.join(scfg.trial_dir, "ckpts", "last.ckpt")
        sparsed.resume = scfg.resume
        log.info(f"--{mode} on stage '{spec.name}' ({scfg.trial_dir})")
        return run_stage(scfg, sparsed, mode, dev)

    if mode == "preprocess":
        for spec, scfg, _ in stages:
            if spec.run == "preprocess":
                _run_preprocess(scfg, dev["device"])
        return trial_dir

    write_configs(cfg, trial_dir)
    for spec, scfg, sparsed in stages:
        sdir = str(scfg.trial_dir)
        if is_done(sdir):
            log.info(f"stage '{spec.name}': finished earlier, skipped")
            continue
        start = time.time()
        _reset_peak_memory()
        if spec.run == "preprocess":
            log.info(f"stage '{spec.name}': preprocessing")
            os.makedirs(sdir, exist_ok=True)
            _run_preprocess(scfg, dev["device"])
        elif spec.run == "text-to-image":
            from .text_to_image import generate_reference

            generate_reference(own_config(cfg, spec), sdir, dev["device"], path=f"stage.{spec.name}")
        else:
            last = os.path.join(sdir, "ckpts", "last.ckpt")
            if os.path.isfile(last):
                log.info(f"stage '{spec.name}': resuming from {last}")
                scfg.resume = last
                sparsed.resume = last
            else:
                log.info(f"stage '{spec.name}': training")
            run_stage(scfg, sparsed, "train", dev)
        stats = write_stats(sdir, time.time() - start)
        log.info(f"stage '{spec.name}': done in {stats['wall_s']:.1f} s")
    return trial_dir


def _run_preprocess(scfg: DictConfig, device: str) -> None:
    from ..preprocess.entry import preprocess_from_config

    preprocess_from_config(scfg, device)  # the run's device (--gpu): the estimators run on the GPU too
