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

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from .core import io
from .core.config import (ConfigError, ExperimentConfig, check_precision, load_config, parse_structured,
                          validate_experiment)
from .core.errors import It3dError

log = logging.getLogger("it3d")
CUSTOM_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="[%(levelname)s] %(message)s", stream=sys.stderr, force=True)
    for noisy in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:  # library chatter that says nothing about the run
        import warnings

        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        warnings.filterwarnings("ignore", message=r".*val_dataloader.* but have no `validation_step`.*")
        warnings.filterwarnings("ignore", message=r".*predict returned None.*")  # --export writes files instead
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover - transformers is a requirement
            pass


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

    ids = [int(g) for g in str(gpu).split(",") if g.strip() != ""]
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
    cfg.n_gpus = n_gpus
    if "system" in cfg and isinstance(cfg.system, DictConfig) and cfg.system.get("device", "auto") == "auto":
        cfg.system.device = device
    if cfg.get("stages") and cfg.get("resume"):
        from .systems.pipeline import trial_dir_from_resume

        cfg.trial_dir = trial_dir_from_resume(str(cfg.resume))
    cfg.trial_dir = make_trial_dir(cfg)
    if cfg.get("stages"):
        from .systems.pipeline import prepare_stages

        cfg.stage_dirs = {str(s.get("name")): os.path.join(str(cfg.trial_dir), str(s.get("name")))
                          for s in cfg.stages if isinstance(s, DictConfig) and s.get("name")}
        parsed = parse_structured(ExperimentConfig, cfg, "")
        check_precision(parsed.precision)
        prepare_stages(cfg, device)  # every stage checked before any work starts
    else:
        parsed = validate_experiment(cfg)
    return cfg, parsed


def run_cli(args, extras: Sequence[str]) -> int:
    setup_logging(args.verbose)
    try:
        import_extensions()
        dev = configure_device(args.gpu)
        mode = next((m for m in ("train", "validate", "test", "export", "preprocess") if getattr(args, m)), "train")
        dry_run = bool(getattr(args, "dry_run", False))
        cfg, parsed = prepare_config(args.config, extras, device=dev["device"],
                                     n_gpus=len(dev["devices"]) if isinstance(dev["devices"], list) else 1)
        from .core import hub
        from .runner.preflight import preflight

        hub.set_precision(parsed.precision)
        if mode in ("train", "preprocess") or dry_run:
            preflight(cfg, parsed, mode, dev["device"], dry_run=dry_run)  # before anything is written
        if dry_run:
            return 0
        if parsed.stages:
            from .systems.pipeline import run_pipeline

            run_pipeline(cfg, parsed, mode, dev, stage=args.stage)
        elif mode == "preprocess":
            from .preprocess.entry import preprocess_from_config

            preprocess_from_config(cfg, dev["device"])
        else:
            run_stage(cfg, parsed, mode, dev)
        return 0
    except It3dError as e:
        for line in getattr(e, "lines", ()):  # details of a multi-item error (the pre-flight's missing models)
            print(line, file=sys.stderr)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
    except OmegaConfBaseException as e:
        print(f"error: {config_error_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


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
    io.write_text(os.path.join(trial_dir, "configs", "parsed.yaml"), OmegaConf.to_yaml(cfg, resolve=True))


def mixed_precision(system: Any, parsed: ExperimentConfig, dev: dict) -> Optional[str]:
    """Lightning's ``precision`` for a system that trains weights through half-precision models
    (``system.trains_pretrained``, e.g. DreamBooth): the run's half dtype as mixed precision, fp32
    master weights. None: leave Lightning's default (fp32), or the trainer config's own choice."""
    from .core import hub

    if not getattr(system, "trains_pretrained", False) or "precision" in (parsed.trainer or {}):
        return None
    import torch

    half = hub.autocast_dtype(dev["device"])
    return {torch.float16: "16-mixed", torch.bfloat16: "bf16-mixed"}.get(half)


def build_trainer(parsed: ExperimentConfig, trial_dir: str, dev: dict, callbacks: Optional[list] = None,
                  precision: Optional[str] = None):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from .core.checkpoint import AtomicCheckpointIO

    ckpt_kwargs = {"save_last": True, "every_n_train_steps": None}
    ckpt_kwargs.update(dict(parsed.checkpoint or {}))
    from .runner.timing import StepTimer

    from .runner.progress_callback import ProgressCallback

    cbs = [ModelCheckpoint(dirpath=os.path.join(trial_dir, "ckpts"), **ckpt_kwargs), StepTimer(trial_dir),
           ProgressCallback(trial_dir)] + list(callbacks or [])
    loggers = [
        TensorBoardLogger(save_dir=trial_dir, name="logs", version="tb", default_hp_metric=False),
        CSVLogger(save_dir=trial_dir, name="logs", version="csv"),
    ]
    # inference_mode=False: normals come from autograd (density gradients) in validation/test too
    tkw = {"max_steps": 1000, "log_every_n_steps": 1, "num_sanity_val_steps": 0, "enable_model_summary": False,
           "inference_mode": False}
    tkw.update(dict(parsed.trainer or {}))
    if precision is not None:
        tkw["precision"] = precision
    tkw.setdefault("accelerator", dev["accelerator"])
    tkw.setdefault("devices", dev["devices"])
    return pl.Trainer(default_root_dir=trial_dir, callbacks=cbs, logger=loggers,
                      plugins=[AtomicCheckpointIO()], **tkw)


def build_components(cfg: DictConfig, parsed: ExperimentConfig, trial_dir: str, resumed: bool, **system_kwargs):
    from .core import registry

    dm = registry.get("datamodule", parsed.data_type)(cfg.get("data", {}), path="data")
    system = registry.get("system", parsed.system_type)(cfg.get("system", {}), resumed=resumed,
                                                        save_dir=os.path.join(trial_dir, "save"), path="system",
                                                        **system_kwargs)
    return dm, system


def run_stage(cfg: DictConfig, parsed: ExperimentConfig, mode: str, dev: dict, **system_kwargs) -> str:
    """One Lightning run (train / validate / test / export) in ``cfg.trial_dir``. Returns the trial dir."""
    import lightning.pytorch as pl

    from .core import hub

    trial_dir = str(cfg.trial_dir)
    hub.set_precision(parsed.precision)
    pl.seed_everything(parsed.seed, workers=True, verbose=False)
    resume = parsed.resume
    if resume is not None and not os.path.isfile(resume):
        raise It3dError(f"resume: checkpoint not found: {resume}")
    if mode in ("validate", "test", "export") and resume is None:
        last = os.path.join(trial_dir, "ckpts", "last.ckpt")
        if os.path.isfile(last):
            resume = last
    if mode == "train":
        write_configs(cfg, trial_dir)
    dm, system = build_components(cfg, parsed, trial_dir, resumed=resume is not None, **system_kwargs)
    trainer = build_trainer(parsed, trial_dir, dev, precision=mixed_precision(system, parsed, dev))
    log.info(f"trial dir: {trial_dir}")
    if mode == "train":
        bad = [m for m in parsed.after_train if m not in ("test", "export")]
        if bad:
            raise ConfigError(f"after_train: unknown mode '{bad[0]}' (use test and/or export)")
        trainer.fit(system, datamodule=dm, ckpt_path=resume)
        for after in parsed.after_train:
            log.info(f"after training: --{after}")
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
    return trial_dir
