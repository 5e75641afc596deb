"""What launch.py does after parsing flags: load and check the config, make the
trial dir, build data + system, and drive Lightning (or the stage pipeline)."""
from __future__ import annotations

import datetime
import importlib
import logging
import os
import sys
import traceback
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ..core import io
from ..core.config import (ConfigError, ExperimentConfig, check_precision, load_config, parse_structured,
                          validate_experiment)
from ..core.errors import It3dError
from ..core.layout import StageDir

log = logging.getLogger("it3d")
CUSTOM_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="[%(levelname)s] %(message)s", stream=sys.stderr, force=True)
    for noisy in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.DEBUG if verbose else logging.ERROR)  # see it3d/__init__
    if not verbose:
        quiet_libraries()


# library chatter that says nothing about the run (shown with --verbose)
QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*val_dataloader.* but have no `validation_step`.*",
    r".*predict returned None.*",  # --export writes files instead
    r".*`torch_dtype` is deprecated.*",  # diffusers 0.3x/0.4x while models are loaded with dtype=
    r".*Checkpoint directory .* exists and is not empty.*",
    # refine optimises manually: a checkpoint at step N holds the weights after N optimiser steps, as with
    # automatic optimisation, which is what a resume at step N expects
    r"Using ModelCheckpoint with manual optimization.*",  # resumes write beside the earlier checkpoints
    # it3d's training batches are a function of the step, so a mid-epoch resume continues exactly
    r".*resuming from a checkpoint that ended before the epoch ended.*",
)


def quiet_libraries() -> None:
    """Hide library warnings and loading bars: transformers' and diffusers' loggers at error level, their
    progress bars ("Loading pipeline components", "Loading weights") off, and known harmless warnings."""
    import warnings

    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for module in ("transformers.utils", "diffusers.utils"):
        try:
            lib_logging = importlib.import_module(module).logging
        except (ImportError, AttributeError):  # pragma: no cover - both are requirements
            continue
        lib_logging.set_verbosity_error()
        lib_logging.disable_progress_bar()


def extension_dirs() -> List[str]:
    """custom/ plus the folders listed in $IT3D_CUSTOM_DIRS (os.pathsep-separated)."""
    extra = [d for d in os.environ.get("IT3D_CUSTOM_DIRS", "").split(os.pathsep) if d]
    return [CUSTOM_DIR] + [os.path.abspath(d) for d in extra]


def import_extensions(dirs: Optional[Sequence[str]] = None) -> List[str]:
    """Import every package in custom/ (it3d first) and in $IT3D_CUSTOM_DIRS so its components register."""
    names = ["it3d"]
    for custom_dir in dirs or extension_dirs():
        if not os.path.isdir(custom_dir):
            raise It3dError(f"extension folder not found: {custom_dir} (check IT3D_CUSTOM_DIRS)")
        if custom_dir not in sys.path:
            sys.path.insert(0, custom_dir)
        names += sorted(
            d for d in os.listdir(custom_dir)
            if d != "it3d" and d not in names and not d.startswith((".", "_"))
            and os.path.isfile(os.path.join(custom_dir, d, "__init__.py"))
        )
    for name in names:
        try:
            mod = importlib.import_module(name)
        except It3dError as e:
            raise It3dError(f"extension '{name}' failed to import: {e}") from None
        except Exception as e:
            detail = traceback.format_exception_only(type(e), e)[-1].strip()
            raise It3dError(f"extension '{name}' failed to import: {detail}") from None
    return names


def configure_device(gpu: str) -> dict:
    """Trainer accelerator/devices from --gpu; CPU (with one log line) when CUDA is absent."""
    import torch

    try:
        ids = [int(g) for g in str(gpu).split(",") if g.strip() != ""]
    except ValueError:
        raise It3dError(f"--gpu {gpu}: expected GPU indices such as 0 or 0,1") from None
    if any(i < 0 for i in ids):
        raise It3dError(f"--gpu {gpu}: GPU indices start at 0")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        bad = [i for i in ids if i >= n]
        if bad:
            raise It3dError(f"--gpu {gpu}: GPU {bad[0]} does not exist (this machine has {n})")
        return {"accelerator": "gpu", "devices": ids or [0], "device": f"cuda:{(ids or [0])[0]}"}
    log.info("CUDA is not available: running on CPU")
    return {"accelerator": "cpu", "devices": 1, "device": "cpu"}


def make_trial_dir(cfg: DictConfig) -> str:
    if cfg.get("trial_dir"):
        return str(cfg.trial_dir)
    if cfg.get("use_timestamp", True):
        if not cfg.get("timestamp"):
            cfg.timestamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        trial = f"{cfg.get('tag', '')}@{cfg.timestamp}"
    else:
        trial = cfg.get("tag") or "default"
    return os.path.join(str(cfg.get("exp_root_dir", "outputs")), str(cfg.get("name", "default")), trial)


def prepare_config(config_files: Sequence[str], overrides: Sequence[str], device: str = "cpu", n_gpus: int = 1):
    """Load + merge + validate. Returns (DictConfig with trial_dir set, parsed ExperimentConfig)."""
    try:
        return _prepare_config(config_files, overrides, device, n_gpus)
    except OmegaConfBaseException as e:
        raise ConfigError(config_error_message(e)) from None


def _prepare_config(config_files: Sequence[str], overrides: Sequence[str], device: str, n_gpus: int):
    cfg = load_config(*config_files, cli_args=overrides)
    if cfg.get("stages") is not None and not isinstance(cfg.stages, ListConfig):
        raise ConfigError(f"stages must be a list of {{name, config, run, overrides}} entries, got {cfg.stages!r}")
    cfg.n_gpus = n_gpus
    if not cfg.get("stages"):  # a staged run's root holds shared keys; each stage is filled on its own
        fill_device(cfg, device)
    if cfg.get("stages") and cfg.get("resume"):
        from .pipeline import resume_target

        names = [str(s.get("name")) for s in cfg.stages if isinstance(s, DictConfig)]
        cfg.trial_dir, _ = resume_target(str(cfg.resume), names)
    cfg.trial_dir = make_trial_dir(cfg)
    if cfg.get("stages"):
        from .pipeline import prepare_stages

        cfg.stage_dirs = {str(s.get("name")): os.path.join(str(cfg.trial_dir), str(s.get("name")))
                          for s in cfg.stages if isinstance(s, DictConfig) and s.get("name")}
        parsed = parse_structured(ExperimentConfig, cfg, "")
        check_precision(parsed.precision)
        prepare_stages(cfg, device)  # every stage checked before any work starts
    else:
        parsed = validate_experiment(cfg)
        if parsed.resume is not None:
            parsed.resume = cfg.resume = resume_checkpoint(parsed.resume)
    return cfg, parsed


def fill_device(cfg: DictConfig, device: str) -> None:
    """The run's device (from --gpu) into ``system.device`` and, for data modules that preprocess
    (a ``device`` field), ``data.device`` where they say ``auto``: the estimators run there too."""
    node = cfg.get("system")
    if isinstance(node, DictConfig) and node.get("device", "auto") == "auto":
        node.device = device
    node = cfg.get("data")
    if isinstance(node, DictConfig) and node.get("device", "auto") == "auto" and datamodule_has_field(cfg, "device"):
        node.device = device


def datamodule_has_field(cfg: DictConfig, name: str) -> bool:
    """Whether the config's datamodule type declares ``data.<name>`` (single-image ones: device, prepared)."""
    import dataclasses

    from ..core import registry

    try:
        cls = registry.get("datamodule", str(cfg.get("data_type") or "single-image"))
    except Exception:  # noqa: BLE001 - an unknown type fails validation with its own message
        return False
    config = getattr(cls, "Config", None)
    return dataclasses.is_dataclass(config) and any(f.name == name for f in dataclasses.fields(config))


def resume_checkpoint(resume: str) -> str:
    """``resume=`` of a single-stage run: a checkpoint (checked readable) or a trial dir (its newest readable one)."""
    from ..core.checkpoint import newest_readable, require_readable

    if os.path.isdir(resume):
        ckpt = newest_readable(StageDir(resume).ckpts)
        if ckpt is None:
            raise ConfigError(f"resume: {resume} holds no checkpoint (ckpts/*.ckpt)")
        return ckpt
    require_readable(resume, "resume")
    return resume


def check_inputs(cfg: DictConfig) -> None:
    """Before any work: the input files the config names can be read (photo, maps, model weights)."""
    from ..core.checkpoint import require_readable
    from ..preprocess.entry import check_inputs as check_data

    trial = str(cfg.trial_dir)
    check_data(cfg.get("data"), produced_under=trial)
    layers = [("", cfg)] + [(f"stage '{k}': ", v) for k, v in (cfg.get("stage") or {}).items()]
    for prefix, node in layers:
        weights = OmegaConf.select(node, "system.weights", default=None) if isinstance(node, DictConfig) else None
        if isinstance(weights, str) and not os.path.abspath(weights).startswith(os.path.abspath(trial) + os.sep):
            try:
                require_readable(weights, "system.weights")
            except It3dError as e:
                raise ConfigError(f"{prefix}{e}") from None


MODES = ("train", "validate", "test", "export", "preprocess")


def run_cli(args, extras: Sequence[str]) -> int:
    """Run one launch.py command; every failure ends in one ``error:`` line (its traceback with --verbose)."""
    setup_logging(args.verbose)
    try:
        return _run_cli(args, extras)
    except KeyboardInterrupt:
        return _fail("interrupted", args.verbose, 130)
    except It3dError as e:
        for line in getattr(e, "lines", ()):  # details of a multi-item error (the pre-flight's missing models)
            print(line, file=sys.stderr)
        return _fail(str(e), args.verbose)
    except OmegaConfBaseException as e:
        return _fail(config_error_message(e), args.verbose)
    except Exception as e:  # a bug: still one line; --verbose shows where
        detail = traceback.format_exception_only(type(e), e)[-1].strip()
        return _fail(f"internal error: {detail} (rerun with --verbose for the traceback, and please report it)",
                     args.verbose)


def _fail(message: str, verbose: bool, code: int = 1) -> int:
    if verbose:
        traceback.print_exc()
    line = message.splitlines()[0] if message.strip() else "failed"
    print(f"error: {line}", file=sys.stderr, flush=True)
    return code


def _run_cli(args, extras: Sequence[str]) -> int:
    import_extensions()
    dev = configure_device(args.gpu)
    mode = next((m for m in MODES if getattr(args, m)), "train")
    dry_run = bool(getattr(args, "dry_run", False))
    cfg, parsed = prepare_config(args.config, extras, device=dev["device"],
                                 n_gpus=len(dev["devices"]) if isinstance(dev["devices"], list) else 1)
    check_inputs(cfg)
    from ..core import hub
    from ..core.lock import TrialLock
    from .preflight import preflight

    hub.set_precision(parsed.precision)
    if mode in ("train", "preprocess") or dry_run:
        preflight(cfg, parsed, mode, dev["device"], dry_run=dry_run)  # before anything is written
    if dry_run:
        return 0

    with TrialLock(str(cfg.trial_dir)):
        dispatch(cfg, parsed, mode, dev, args.stage)
    return 0


def dispatch(cfg: DictConfig, parsed: ExperimentConfig, mode: str, dev: dict, stage: Optional[str] = None) -> None:
    if parsed.stages:
        from .pipeline import run_pipeline

        run_pipeline(cfg, parsed, mode, dev, stage=stage)
    elif mode == "preprocess":
        from ..preprocess.entry import preprocess_from_config

        preprocess_from_config(cfg, dev["device"])
    else:
        run_stage(cfg, parsed, mode, dev)


def config_error_message(e: OmegaConfBaseException) -> str:
    """One line for an OmegaConf error that escaped validation (e.g. an interpolation of a ``???`` value)."""
    text = (getattr(e, "msg", None) or str(e) or type(e).__name__).splitlines()[0]
    import re

    m = re.search(r"[Mm]issing mandatory value: ?([\w.\[\]]+)", text) or \
        re.search(r"to missing value '([\w.\[\]]+)'", text)
    if m or isinstance(e, MissingMandatoryValue):
        key = m.group(1) if m else getattr(e, "full_key", "?")
        return f"missing required value '{key}': set it in the YAML or on the command line ({key}=...)"
    key = getattr(e, "full_key", None)
    return f"config{f' key {key!r}' if key else ''}: {text}"


def write_configs(cfg: DictConfig, trial_dir: str) -> None:
    os.makedirs(os.path.join(trial_dir, "configs"), exist_ok=True)
    io.write_text(os.path.join(trial_dir, "configs", "raw.yaml"), OmegaConf.to_yaml(cfg, resolve=False))
    io.write_text(StageDir(trial_dir).parsed_config, OmegaConf.to_yaml(cfg, resolve=True))


def mixed_precision(system: Any, parsed: ExperimentConfig, dev: dict) -> Optional[str]:
    """Lightning's ``precision`` for a system that trains weights through half-precision models
    (``system.trains_pretrained``, e.g. DreamBooth): the run's half dtype as mixed precision, fp32
    master weights. None: leave Lightning's default (fp32), or the trainer config's own choice."""
    from ..core import hub

    if not getattr(system, "trains_pretrained", False) or "precision" in (parsed.trainer or {}):
        return None
    import torch

    half = hub.autocast_dtype(dev["device"])
    return {torch.float16: "16-mixed", torch.bfloat16: "bf16-mixed"}.get(half)


def build_trainer(parsed: ExperimentConfig, trial_dir: str, dev: dict, callbacks: Optional[list] = None,
                  precision: Optional[str] = None):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from ..core.checkpoint import AtomicCheckpointIO
    from ..core.trainer_parts import AppendingCSVLogger

    loggers = [
        TensorBoardLogger(save_dir=trial_dir, name="logs", version="tb", default_hp_metric=False),
        AppendingCSVLogger(save_dir=trial_dir, name="logs", version="csv"),
    ]
    # inference_mode=False: normals come from autograd (density gradients) in validation/test too
    tkw = {"max_steps": 1000, "log_every_n_steps": 1, "num_sanity_val_steps": 0, "enable_model_summary": False,
           "inference_mode": False, "enable_progress_bar": True}
    tkw.update(dict(parsed.trainer or {}))
    if precision is not None:
        tkw["precision"] = precision
    tkw.setdefault("accelerator", dev["accelerator"])
    tkw.setdefault("devices", dev["devices"])
    from .progress_callback import ProgressCallback
    from .timing import StepTimer

    cbs = [checkpoint_callback(parsed, trial_dir), StepTimer(trial_dir), ProgressCallback(trial_dir)] + list(callbacks or [])
    if tkw["enable_progress_bar"]:
        from ..core.trainer_parts import StepProgressBar

        cbs.append(StepProgressBar(label=os.path.basename(os.path.normpath(trial_dir))))
    return pl.Trainer(default_root_dir=trial_dir, callbacks=cbs, logger=loggers,
                      plugins=[AtomicCheckpointIO()], **tkw)


def checkpoint_callback(parsed: ExperimentConfig, trial_dir: str):
    """``ckpts/last.ckpt`` plus the last two ``epoch=*-step=*.ckpt`` (a fallback when the newest is unreadable)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt_kwargs = {"save_last": True, "every_n_train_steps": None, "monitor": "step", "mode": "max", "save_top_k": 2}
    ckpt_kwargs.update(dict(parsed.checkpoint or {}))
    return ModelCheckpoint(dirpath=StageDir(trial_dir).ckpts, **ckpt_kwargs)


def build_components(cfg: DictConfig, parsed: ExperimentConfig, trial_dir: str, resumed: bool,
                     reuse_prepared: bool = False, **system_kwargs):
    """The stage's datamodule (with its preprocessing record, see :func:`attach_prepared`) and system."""
    from ..core import registry

    dm = registry.get("datamodule", parsed.data_type)(cfg.get("data", {}), path="data")
    attach_prepared(dm, cfg, trial_dir, reuse=reuse_prepared or resumed)
    system = registry.get("system", parsed.system_type)(cfg.get("system", {}), resumed=resumed,
                                                        save_dir=os.path.join(trial_dir, "save"), path="system",
                                                        **system_kwargs)
    return dm, system


def attach_prepared(dm: Any, cfg: DictConfig, trial_dir: str, reuse: bool) -> None:
    """Preprocessing for a single-image datamodule happens here, in the runner, at most once per stage.

    A staged run's stages load the preprocess stage's record (``data.prepared``, filled by the pipeline);
    otherwise, when the given files lack something (no alpha and no mask, a required map, the caption),
    preprocessing runs now and its record is kept as ``<trial_dir>/prepared.json`` (``reuse``: a resumed
    run, --test and --export load that file instead)."""
    if not hasattr(dm, "image_inputs") or dm.cfg.prepared:
        return
    from ..preprocess.entry import prepare_for_stage

    dm.prepared_image = prepare_for_stage(dm.image_inputs(), cfg.get("data"), trial_dir, reuse)


def run_stage(cfg: DictConfig, parsed: ExperimentConfig, mode: str, dev: dict, callbacks: Optional[list] = None,
              **system_kwargs) -> str:
    """One Lightning run (train / validate / test / export) in ``cfg.trial_dir``. Returns the trial dir."""
    import lightning.pytorch as pl

    from ..core import hub

    trial_dir = str(cfg.trial_dir)
    hub.set_precision(parsed.precision)
    pl.seed_everything(parsed.seed, workers=True, verbose=False)
    resume = _checkpoint_for(parsed, mode, trial_dir)
    if mode == "train":
        check_weights(parsed, resumed=resume is not None)
        write_configs(cfg, trial_dir)
    dm, system = build_components(cfg, parsed, trial_dir, resumed=resume is not None,
                                  reuse_prepared=mode != "train", **system_kwargs)
    trainer = build_trainer(parsed, trial_dir, dev, callbacks, precision=mixed_precision(system, parsed, dev))
    log.info(f"trial dir: {trial_dir}")
    phase = mode
    try:
        if mode == "train":
            trainer.fit(system, datamodule=dm, ckpt_path=resume)
            for after in parsed.after_train:
                log.info(f"after training: --{after}")
                phase = after
                if after == "test":
                    trainer.test(system, datamodule=dm)
                else:
                    trainer.predict(system, datamodule=dm, return_predictions=False)
        elif mode == "validate":
            trainer.validate(system, datamodule=dm, ckpt_path=resume)
        elif mode == "test":
            trainer.test(system, datamodule=dm, ckpt_path=resume)
        elif mode == "export":
            trainer.predict(system, datamodule=dm, ckpt_path=resume, return_predictions=False)
    except Exception as e:  # out of memory: one line naming the stage and the settings to lower
        from .oom import is_oom, oom_message

        if not is_oom(e):
            raise
        # a staged run's stage dir is named after the stage; a single-stage run is named by its system
        stage = os.path.basename(os.path.normpath(trial_dir)) if cfg.get("stage_dirs") else parsed.system_type
        raise It3dError(oom_message(stage, parsed.system_type, cfg, e, parsed.precision, phase)) from None
    return trial_dir


def _checkpoint_for(parsed: ExperimentConfig, mode: str, trial_dir: str) -> Optional[str]:
    """The checkpoint a run starts from: ``resume=`` (checked when the config was prepared), else for
    --test/--export/--validate the trial's newest readable one."""
    from ..core.checkpoint import newest_readable

    if parsed.resume is not None:
        return parsed.resume
    if mode in ("validate", "test", "export"):
        return newest_readable(StageDir(trial_dir).ckpts)
    return None


def check_weights(parsed: ExperimentConfig, resumed: bool) -> None:
    """``system.weights`` (model weights only, loaded when not resuming) must be a readable checkpoint."""
    from ..core.checkpoint import require_readable

    weights = (parsed.system or {}).get("weights") if isinstance(parsed.system, dict) else None
    if weights and not resumed:
        require_readable(str(weights), "system.weights")
