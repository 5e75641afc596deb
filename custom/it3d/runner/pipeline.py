"""Staged pipelines: run a method's stages in order inside one trial dir.

A staged config lists its stages::

    stages:
      - {name: preprocess, run: preprocess}
      - {name: dreambooth, config: stages/dreambooth.yaml}
      - {name: coarse, config: stages/coarse.yaml, overrides: {system: {...}}}
      - {name: refine, config: stages/refine.yaml}

Each stage's config = its own file (paths relative to ``configs/``) <- the root's shared
sections (``data``, ``seed``, ``name``, ``tag``, ``precision``, ``after_train``) <- the stage's
``overrides`` <- ``stage.<name>`` (the place for command-line overrides:
``stage.coarse.system.guidance.zero123.weight=0``). ``after_train`` (test orbit and export after
training) is the final stage's: the stages before it end with none (the final stage supersedes
their outputs) unless ``stage.<name>.after_train`` asks for them.

After each stage every model it loaded is freed (:func:`it3d.core.hub.free_memory`: the hub cache
is cleared, garbage collected and, on CUDA, the allocator's cache emptied), so the next stage starts
from an empty GPU.
Stages live in ``<trial>/<name>/`` and refer to earlier ones with ``${stage_dirs.<name>}``.

Preprocessing happens once, in the ``run: preprocess`` stage: it writes its record
(``<trial>/<preprocess>/prepared.json``, :class:`it3d.core.prepared.PreparedImage`) and every later
stage whose datamodule takes one gets ``data.prepared`` pointing at it, so no stage preprocesses again.

A stage is finished when ``<stage dir>/stats.json`` exists (written last, with its wall time over
every attempt and its peak memory; see :mod:`.stage_state`). Re-running on the same trial dir
(``trial_dir=...`` or ``resume=<trial dir>``) skips finished stages and resumes the interrupted one
from its newest readable checkpoint; ``resume=<trial>/<stage>/ckpts/<name>.ckpt`` resumes that
stage from that very checkpoint. A stage started or finished with another config is never
continued with this one: the run stops and names the keys that differ.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..core import hub
from ..core.checkpoint import newest_readable, require_readable
from ..core.config import ConfigError, load_yaml, parse_structured, validate_experiment
from ..core.errors import It3dError
from ..core.layout import StageDir
from .stage_state import Attempt, check_unchanged, fingerprint, is_done, reset_peak_memory, stage_config

log = logging.getLogger("it3d")
CONFIG_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))),
                           "configs")
SHARED_KEYS = ("name", "tag", "seed", "exp_root_dir", "use_timestamp", "timestamp", "description", "after_train",
               "precision")
RUNS = ("lightning", "preprocess", "text-to-image")


@dataclass
class StageSpec:
    name: str = "???"
    config: Any = None  # a file, or a list of files merged in order (paths relative to configs/)
    run: str = "lightning"
    overrides: dict = field(default_factory=dict)


def stage_specs(cfg: DictConfig) -> List[StageSpec]:
    if not isinstance(cfg.stages, ListConfig):
        raise ConfigError(f"stages must be a list of {{name, config, run, overrides}} entries, got {cfg.stages!r}")
    for key, val in (cfg.get("stage") or {}).items() if isinstance(cfg.get("stage"), DictConfig) else ():
        if val is not None and not isinstance(val, DictConfig):
            raise ConfigError(f"stage.{key} must be a mapping of that stage's config keys, got {val!r}")
    if cfg.get("stage") is not None and not isinstance(cfg.get("stage"), DictConfig):
        raise ConfigError(f"stage must be a mapping by stage name (stage.<name>.<key>=...), got {cfg.stage!r}")
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


def _is_trial(folder: str) -> bool:
    return StageDir(folder).is_trial()


def resume_target(resume: str, stage_names: List[str]) -> Tuple[str, Optional[str]]:
    """``resume=`` of a staged run -> (trial dir, the checkpoint it names or None).

    ``resume`` is a trial dir, one of its stage dirs, or a checkpoint ``<trial>/<stage>/ckpts/<name>.ckpt``
    (checked readable). Anything else stops here, before a folder is made anywhere.
    """
    path = os.path.abspath(str(resume))
    if os.path.isdir(path):
        if _is_trial(path):
            return path, None
        if os.path.basename(path) in stage_names and _is_trial(os.path.dirname(path)):
            return os.path.dirname(path), None
        raise ConfigError(f"resume: {resume} is not the trial dir of a staged run (it has no configs/parsed.yaml)")
    if not os.path.exists(path):
        raise ConfigError(f"resume: not found: {resume}")
    ckpts = os.path.dirname(path)
    stage_dir = os.path.dirname(ckpts)
    trial = os.path.dirname(stage_dir)
    if ckpts != StageDir(stage_dir).ckpts or os.path.basename(stage_dir) not in stage_names or not _is_trial(trial):
        raise ConfigError(f"resume: {resume} is not inside a trial dir of this config (expected "
                          f"<trial>/<stage>/ckpts/<name>.ckpt with <stage> one of {', '.join(stage_names)}, "
                          f"or the trial dir itself)")
    require_readable(path, "resume")
    return trial, path


def build_stage_config(cfg: DictConfig, spec: StageSpec, trial_dir: str, specs: List[StageSpec]) -> DictConfig:
    files = [] if not spec.config else [spec.config] if isinstance(spec.config, str) else list(spec.config)
    base = OmegaConf.create()
    for f in files:
        base = OmegaConf.merge(base, load_yaml(resolve_config_path(str(f))))
    # the root's own sections resolve against the root (where ${stage_dirs.x} and ${stage.x} live)
    def rooted(node):
        return OmegaConf.create(OmegaConf.to_container(node, resolve=True, throw_on_missing=False))

    shared = {k: cfg[k] for k in SHARED_KEYS if k in cfg}
    trained = [s.name for s in specs if s.run == "lightning"]
    if spec.run == "lightning" and spec.name != trained[-1]:
        # an intermediate stage (dreambooth, coarse): the final stage's test orbit and export supersede its
        # own; stage.<name>.after_train=[test, export] (or the stage's overrides) asks for them
        shared["after_train"] = []
    layers = [base, OmegaConf.create(shared)]
    if "data" in cfg:
        layers.append(OmegaConf.create({"data": rooted(cfg.data)}))
    layers.append(OmegaConf.create(spec.overrides or {}))
    own = (cfg.get("stage", {}) or {}).get(spec.name)
    if own:
        layers.append(rooted(own))
    try:
        scfg = OmegaConf.merge(*layers)
    except Exception as e:  # noqa: BLE001 - e.g. stage.coarse.data=[1] over a mapping
        raise ConfigError(f"stage '{spec.name}': its config files and overrides do not combine: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    scfg.trial_dir = os.path.join(trial_dir, spec.name)
    scfg.stage_dirs = {s.name: os.path.join(trial_dir, s.name) for s in specs}
    prepared_by = [s.name for s in specs[:specs.index(spec)] if s.run == "preprocess"]
    if spec.run == "lightning" and prepared_by and not OmegaConf.select(scfg, "data.prepared", default=None):
        from .cli import datamodule_has_field

        if datamodule_has_field(scfg, "prepared"):  # the stage loads the preprocess stage's record
            scfg.data.prepared = StageDir(os.path.join(trial_dir, prepared_by[-1])).prepared
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
    from .cli import fill_device

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
            fill_device(scfg, device)
            try:
                parsed = validate_experiment(scfg)
            except ConfigError as e:
                raise ConfigError(f"stage '{spec.name}': {e}") from None
        else:
            parsed = None
        out.append((spec, scfg, parsed))
    return out


def run_pipeline(cfg: DictConfig, parsed: Any, mode: str, dev: dict, stage: Optional[str] = None) -> str:
    trial_dir = str(cfg.trial_dir)
    stages = prepare_stages(cfg, dev["device"])
    names = [s.name for s, _, _ in stages]
    if stage is not None and stage not in names:
        from ..core.registry import suggest

        raise It3dError(f"--stage {stage}: no such stage{suggest(stage, names)} (stages: {', '.join(names)})")
    if mode in ("test", "export", "validate"):
        return _evaluate(stages, mode, dev, stage, trial_dir)
    if mode == "preprocess":
        for spec, scfg, _ in stages:
            if spec.run == "preprocess":
                _run_preprocess(scfg, dev["device"])
        return trial_dir
    return _train(cfg, stages, dev, trial_dir)


def _evaluate(stages: List[tuple], mode: str, dev: dict, stage: Optional[str], trial_dir: str) -> str:
    """--test / --export / --validate on the last trained stage (or ``--stage``), from its newest readable checkpoint."""
    from .cli import run_stage

    candidates = [t for t in stages if t[0].run == "lightning" and (stage is None or t[0].name == stage)]
    for spec, scfg, sparsed in reversed(candidates):
        ckpt = newest_readable(StageDir(str(scfg.trial_dir)).ckpts)
        if ckpt is None:
            continue
        scfg.resume = sparsed.resume = ckpt
        log.info(f"--{mode} on stage '{spec.name}' ({scfg.trial_dir})")
        return run_stage(scfg, sparsed, mode, dev)
    raise It3dError(f"--{mode}: no trained stage with a checkpoint in {trial_dir}"
                    + (f" (stage '{stage}')" if stage else "") + "; run --train first")


def _stage_configs(stages: List[tuple], trial_dir: str) -> List[dict]:
    """Each stage's fingerprinted config; a stage's includes the fingerprint of the stage before it."""
    out, previous = [], None
    for _, scfg, _ in stages:
        flat = stage_config(scfg, trial_dir, previous)
        previous = fingerprint(flat)
        out.append(flat)
    return out


def _named_checkpoint(cfg: DictConfig, stages: List[tuple]) -> Tuple[Optional[str], Optional[str]]:
    """``resume=<trial>/<stage>/ckpts/<name>.ckpt``: (that stage, that checkpoint); a finished stage is refused."""
    resume = cfg.get("resume")
    if not resume or not os.path.isfile(str(resume)):
        return None, None
    stage_dir = os.path.dirname(os.path.dirname(os.path.abspath(str(resume))))
    name = os.path.basename(stage_dir)
    if is_done(stage_dir):
        raise ConfigError(f"resume: stage '{name}' has finished, so it is not trained again from {resume}; "
                          f"resume={os.path.dirname(stage_dir)} continues the run, a new trial dir trains anew")
    return name, os.path.abspath(str(resume))


def _train(cfg: DictConfig, stages: List[tuple], dev: dict, trial_dir: str) -> str:
    from .cli import write_configs

    named_stage, named_ckpt = _named_checkpoint(cfg, stages)
    flats = _stage_configs(stages, trial_dir)
    for (spec, scfg, _), flat in zip(stages, flats):  # nothing is written before every stage is checked
        check_unchanged(str(scfg.trial_dir), spec.name, flat)
    write_configs(cfg, trial_dir)
    for (spec, scfg, sparsed), flat in zip(stages, flats):
        sdir = str(scfg.trial_dir)
        if is_done(sdir):
            log.info(f"stage '{spec.name}': finished earlier, skipped")
            continue
        attempt = Attempt(sdir, flat)
        reset_peak_memory()
        _run_stage(cfg, spec, scfg, sparsed, dev, attempt, named_ckpt if spec.name == named_stage else None)
        stats = attempt.finish()
        hub.free_memory(dev["device"])  # the next stage loads its own models: none of this one's stay on the GPU
        log.info(f"stage '{spec.name}': done in {stats['wall_s']:.1f} s"
                 + (f" over {stats['attempts']} attempts" if stats["attempts"] > 1 else ""))
    return trial_dir


def _run_stage(cfg: DictConfig, spec: StageSpec, scfg: DictConfig, sparsed: Any, dev: dict, attempt: Attempt,
               ckpt: Optional[str]) -> None:
    from .cli import run_stage

    sdir = str(scfg.trial_dir)
    if spec.run == "preprocess":
        log.info(f"stage '{spec.name}': preprocessing")
        os.makedirs(sdir, exist_ok=True)
        _run_preprocess(scfg, dev["device"])
    elif spec.run == "text-to-image":
        from .text_to_image import generate_reference

        generate_reference(own_config(cfg, spec), sdir, dev["device"], path=f"stage.{spec.name}")
    else:
        ckpt = ckpt or newest_readable(StageDir(sdir).ckpts)
        if ckpt:
            log.info(f"stage '{spec.name}': resuming from {ckpt}")
            scfg.resume = sparsed.resume = ckpt
        else:
            log.info(f"stage '{spec.name}': training")
        run_stage(scfg, sparsed, "train", dev, callbacks=[attempt.callback()])


def _run_preprocess(scfg: DictConfig, device: str) -> None:
    from ..preprocess.entry import preprocess_from_config

    preprocess_from_config(scfg, device)  # the run's device (--gpu): the estimators run on the GPU too
