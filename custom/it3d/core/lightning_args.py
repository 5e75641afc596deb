"""The ``trainer`` and ``checkpoint`` sections: Lightning ``Trainer`` / ``ModelCheckpoint`` arguments,
checked at parse time by name (with a suggestion), by the type in Lightning's own signature and by a
natural range, so ``trainer.max_steps=abc`` or ``-5`` stops before any work with the dotted key."""
from __future__ import annotations

import inspect
import typing
from typing import Any, Dict, Optional

from .errors import ConfigError
from .ranges import Range, check_value
from .registry import suggest

# it3d sets these itself (trial dir, loggers, callbacks, atomic checkpoint IO)
RESERVED = {"trainer": ("logger", "callbacks", "plugins", "default_root_dir"), "checkpoint": ("dirpath",)}
RANGES: Dict[str, Dict[str, Range]] = {
    "trainer": {
        "max_steps": Range(ge=0), "min_steps": Range(ge=0), "max_epochs": Range(ge=-1), "min_epochs": Range(ge=0),
        "num_sanity_val_steps": Range(ge=-1), "log_every_n_steps": Range(ge=1),
        "check_val_every_n_epoch": Range(ge=1), "accumulate_grad_batches": Range(ge=1),
        "gradient_clip_val": Range(ge=0), "num_nodes": Range(ge=1), "reload_dataloaders_every_n_epochs": Range(ge=0),
    },
    "checkpoint": {"every_n_train_steps": Range(ge=0), "every_n_epochs": Range(ge=0), "save_top_k": Range(ge=-1)},
}
FRACTION_OR_COUNT = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                     "val_check_interval", "overfit_batches")


def _signature(section: str):
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    fn = Trainer.__init__ if section == "trainer" else ModelCheckpoint.__init__
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # pragma: no cover - unresolvable annotations: names only
        hints = {}
    names = [p for p in inspect.signature(fn).parameters if p not in ("self", "args", "kwargs")]
    return names, hints


def _matches(value: Any, tp: Any) -> bool:
    """Whether a YAML value (None, bool, int, float, str, list, dict) fits a typing annotation."""
    if tp is Any:
        return True
    if tp is type(None) or tp is None:
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (list, typing.List):
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin in (dict, typing.Dict):
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return isinstance(tp, type) and isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        parts = [_describe(a) for a in args if a is not type(None)]
        parts = [p for p in parts if p]
        return " or ".join(dict.fromkeys(parts)) + (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        return " / ".join(repr(a) for a in args)
    if origin in (list, typing.List):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin in (dict, typing.Dict):
        return "a mapping"
    names = {bool: "true/false", int: "an int", float: "a number", str: "a string"}
    return names.get(tp, "")  # Lightning objects: not expressible in YAML


def check_section(section: str, values: Optional[dict]) -> None:
    """Check ``trainer`` / ``checkpoint``: known names, Lightning's types, natural ranges."""
    if not values:
        return
    names, hints = _signature(section)
    for key, value in values.items():
        path = f"{section}.{key}"
        if key in RESERVED[section]:
            raise ConfigError(f"{path} is set by it3d itself and cannot be given in a config")
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{suggest(key, names)}")
        tp = hints.get(key)
        if tp is not None and not _matches(value, tp):
            raise ConfigError(f"{path}: expected {_describe(tp) or 'a value Lightning accepts'}, got {value!r}")
        rng = RANGES[section].get(key)
        if rng is not None:
            check_value(value, rng, path, schedules=False)
        if key in FRACTION_OR_COUNT and isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise ConfigError(f"{path}: a float is a fraction in [0, 1] (an int counts batches), got {value!r}")
        if key in FRACTION_OR_COUNT and isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{path} must be >= 0, got {value!r}")
