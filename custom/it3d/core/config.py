"""Strict, typed configuration.

* Every component has a nested ``@dataclass Config``; :func:`parse_structured`
  turns a dict / DictConfig into that dataclass and refuses unknown keys (naming the
  full dotted path and a close match) and missing ``???`` values (naming the key).
* :func:`validate_component` walks a component's config, following ``*_type``
  fields (declared with :func:`component`) and named term dicts (declared with
  :func:`terms`) into the configs of the sub-components they name, so a whole run
  is checked before any work starts.
* :func:`C` evaluates schedules: a number, ``[start_step, v0, v1, end_step]``, or a
  piecewise list ``[[step, value], [step, value], ...]``.
* :func:`load_config` merges YAML files in order, then ``key=value`` overrides
  (``~key`` deletes, ``+key=value`` adds).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import registry
from .errors import ConfigError, It3dError  # noqa: F401  (ConfigError is re-exported)
from .ranges import check, check_dataclass, check_value, rule_for, unbounded  # noqa: F401  (field helpers)
from .registry import suggest
from .resolvers import register_resolvers
from .schedule import C, check_schedule  # noqa: F401  (re-exported)

register_resolvers()


# ----------------------------------------------------------------------------- field helpers
def component(kind: str, default: str, config_field: Optional[str] = None):
    """A ``*_type`` field naming a registered component of ``kind``.

    The sibling field ``config_field`` (default: the name without ``_type``) holds its config.
    """
    return field(default=default, metadata={"kind": kind, "config_field": config_field})


def terms(kind: str):
    """A dict of named entries ``{type, weight, ...}`` of components of ``kind``.

    ``type`` defaults to the entry's name; ``weight`` is a schedule; the rest is the
    component's own config.
    """
    return field(default_factory=dict, metadata={"terms": kind})


def schedule(default: Any):
    """A float that may also be a schedule (checked by :func:`C`)."""
    return field(default=default, metadata={"schedule": True})


# ----------------------------------------------------------------------------- parsing
def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _to_container(cfg: Any) -> Any:
    if isinstance(cfg, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot resolve config: {e}".splitlines()[0]) from None
    return cfg


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls) -> Dict[str, Any]:
    import typing

    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)}


def _check_keys(cls, raw: Any, path: str) -> None:
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise ConfigError(f"'{path or '<root>'}' must be a mapping of options for {cls.__qualname__}, got {raw!r}")
    types = _field_types(cls)
    for key, val in raw.items():
        if key not in types:
            raise ConfigError(f"unknown config key '{_join(path, key)}'{suggest(key, types)}")
        tp = types[key]
        if _is_dataclass_type(tp) and isinstance(val, dict):
            _check_keys(tp, val, _join(path, key))


def _check_missing(cls, obj: Any, path: str) -> None:
    for f in dataclasses.fields(cls):
        val = getattr(obj, f.name)
        if isinstance(val, str) and val == "???":
            raise ConfigError(
                f"missing required value '{_join(path, f.name)}': set it in the YAML or on the command line "
                f"({_join(path, f.name)}=...)"
            )
        if dataclasses.is_dataclass(val):
            _check_missing(type(val), val, _join(path, f.name))
        if f.metadata.get("schedule"):
            check_schedule(val, _join(path, f.name))


def parse_structured(cls, cfg: Any = None, path: str = "") -> Any:
    """Parse ``cfg`` into an instance of dataclass ``cls``, strictly."""
    if cfg is None:
        cfg = {}
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        if isinstance(cfg, cls):
            return cfg
        cfg = dataclasses.asdict(cfg)
    raw = _to_container(cfg)
    _check_keys(cls, raw, path)
    raw, scheds = _pop_schedules(cls, raw)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), raw)
        obj = _to_dataclass(cls, merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"bad value for '{_join(path, key)}': {msg}") from None
    except TypeError:  # OmegaConf: "Cannot merge incompatible container types" (a list where a section goes)
        raise ConfigError(_shape_error(cls, raw, path)) from None
    _put_schedules(obj, scheds)
    _check_missing(cls, obj, path)
    check_dataclass(cls, obj, path)  # natural ranges (steps >= 0, probabilities in [0, 1], ...)
    return obj


def _shape_error(cls, raw: Any, path: str) -> str:
    """Name the first field whose value is a list where the dataclass expects a section, or the reverse."""
    if isinstance(raw, dict):
        default = OmegaConf.structured(cls)
        for k, v in raw.items():
            want = default.get(k) if k in default else None
            if OmegaConf.is_dict(want) and not isinstance(v, dict) or OmegaConf.is_list(want) and isinstance(v, dict):
                shape = "a section (key: value)" if OmegaConf.is_dict(want) else "a list"
                return f"bad value for '{_join(path, k)}': expected {shape}, got {v!r}"
    return f"bad value for '{path or 'the config'}': a list and a section (key: value) cannot be combined"


def _pop_schedules(cls, raw):
    """Schedule fields may be annotated ``float`` but hold lists: keep them out of OmegaConf's type check."""
    if not isinstance(raw, dict):
        return raw, {}
    raw = dict(raw)
    scheds = {}
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        if f.metadata.get("schedule"):
            scheds[f.name] = raw.pop(f.name)
        elif _is_dataclass_type(types[f.name]) and isinstance(raw[f.name], dict):
            raw[f.name], sub = _pop_schedules(types[f.name], raw[f.name])
            if sub:
                scheds[f.name] = sub
    return raw, scheds


def _put_schedules(obj, scheds) -> None:
    for name, val in scheds.items():
        cur = getattr(obj, name)
        if dataclasses.is_dataclass(cur) and isinstance(val, dict):
            _put_schedules(cur, val)
        else:
            if isinstance(val, list) and len(val) == 1 and not isinstance(val[0], list):
                val = val[0]
            setattr(obj, name, val)


def _to_dataclass(cls, merged: DictConfig):
    # to_object would raise on '???'; keep them as the string so we can name the key
    data = OmegaConf.to_container(merged, resolve=True, throw_on_missing=False)
    return _build(cls, data)


def _build(cls, data: dict):
    types = _field_types(cls)
    kwargs = {}
    for name, val in data.items():
        tp = types.get(name)
        if _is_dataclass_type(tp) and isinstance(val, dict):
            val = _build(tp, val)
        kwargs[name] = val
    return cls(**kwargs)


# checks of config sections that belong to a package above the one declaring the field (``data.preprocess``
# is a datamodule field whose meaning the preprocess package owns): the owner registers the check, the
# declaring class calls :func:`check_section`, and neither imports the other
_SECTION_CHECKS: Dict[str, Any] = {}


def register_section_check(name: str, check_fn: Any) -> None:
    """``check_fn(section_owner_config: dict, path: str)`` raises ConfigError for a bad section ``name``."""
    _SECTION_CHECKS[name] = check_fn


def check_section(name: str, owner_cfg: Any, path: str) -> None:
    """Run the check registered for section ``name`` (none registered: nothing to check)."""
    fn = _SECTION_CHECKS.get(name)
    if fn is not None:
        fn(owner_cfg, path)


def validate_component(kind: str, type_name: str, cfg: Any, path: str) -> Any:
    """Check the config of a registered component and of every sub-component it names."""
    try:
        cls = registry.get(kind, type_name)
    except registry.RegistryError as e:
        raise ConfigError(f"{path}: {e}") from None
    validator = getattr(cls, "validate_config", None)
    if validator is not None:
        return validator(cfg, path)
    return validate_dataclass(cls.Config, cfg, path)


def validate_dataclass(config_cls, cfg: Any, path: str) -> Any:
    parsed = parse_structured(config_cls, cfg, path)
    for f in dataclasses.fields(config_cls):
        kind = f.metadata.get("kind")
        if kind:
            type_name = getattr(parsed, f.name)
            if type_name in (None, "", "none"):
                continue
            sub = f.metadata.get("config_field") or f.name[: -len("_type")]
            validate_component(kind, type_name, getattr(parsed, sub, None), _join(path, sub))
        tkind = f.metadata.get("terms")
        if tkind:
            for name, entry in (getattr(parsed, f.name) or {}).items():
                if entry is None:  # `name: null` removes an inherited entry
                    continue
                type_name, weight, rest = split_term(name, entry, _join(path, f.name))
                check_schedule(weight, _join(path, f"{f.name}.{name}.weight"))
                check_value(weight, rule_for("weight"), _join(path, f"{f.name}.{name}.weight"))  # >= 0
                validate_component(tkind, type_name, rest, _join(path, f"{f.name}.{name}"))
    return parsed


def split_term(name: str, entry: Any, path: str):
    """``{type, weight, ...}`` -> (type, weight, rest)."""
    entry = _to_container(entry)
    if entry is None:
        entry = {}
    if not isinstance(entry, dict):
        raise ConfigError(f"'{_join(path, name)}' must be a mapping like {{type: ..., weight: ...}}, got {entry!r}")
    entry = dict(entry)
    type_name = entry.pop("type", name)
    weight = entry.pop("weight", 1.0)
    return type_name, weight, entry


# ----------------------------------------------------------------------------- root config
@dataclass
class ExperimentConfig:
    name: str = "default"
    description: str = ""
    tag: str = ""
    seed: int = 0
    use_timestamp: bool = True
    timestamp: Optional[str] = None
    exp_root_dir: str = "outputs"
    trial_dir: Optional[str] = None  # set by launch; may be given to reuse a trial dir
    n_gpus: int = 1
    # every pretrained model's dtype (components' `dtype: auto`): auto = fp16 on CUDA, fp32 on CPU
    precision: str = "auto"
    resume: Optional[str] = None
    data_type: str = component("datamodule", "single-image", "data")
    data: dict = field(default_factory=dict)
    system_type: str = component("system", "coarse", "system")
    system: dict = field(default_factory=dict)
    # Lightning Trainer / ModelCheckpoint arguments (checked by it3d.core.lightning_args)
    trainer: dict = field(default_factory=dict, metadata={"opaque": True})
    checkpoint: dict = field(default_factory=dict, metadata={"opaque": True})
    # what --train does once training ends (on the final weights): any of test, export
    after_train: List[str] = field(default_factory=lambda: ["test", "export"])
    # staged pipelines (it3d.runner.pipeline): ordered list of {name, config, run, overrides}
    stages: List[Any] = field(default_factory=list, metadata={"opaque": True})
    # per-stage overrides by name: stage.coarse.system.x=... (checked with each stage's config)
    stage: dict = field(default_factory=dict, metadata={"opaque": True})
    # set by the pipeline: name -> stage dir (for ${stage_dirs.x})
    stage_dirs: dict = field(default_factory=dict, metadata={"opaque": True})


AFTER_TRAIN = ("test", "export")


PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def check_precision(value: Any, path: str = "precision") -> str:
    if value not in PRECISIONS:
        raise ConfigError(f"{path}: unknown precision '{value}'{suggest(str(value), PRECISIONS)} "
                          f"(use {', '.join(PRECISIONS)})")
    return value


def validate_experiment(cfg: Any) -> ExperimentConfig:
    """Parse and check the whole run config (the experiment and every component in it)."""
    from .lightning_args import check_section

    parsed = validate_dataclass(ExperimentConfig, cfg, "")
    check_precision(parsed.precision)
    for section in ("trainer", "checkpoint"):
        check_section(section, parsed.trainer if section == "trainer" else parsed.checkpoint)
    bad = [m for m in parsed.after_train or [] if m not in AFTER_TRAIN]
    if bad:
        raise ConfigError(f"after_train: unknown mode {bad[0]!r} (use any of {', '.join(AFTER_TRAIN)}, or [])")
    return parsed


# ----------------------------------------------------------------------------- loading
def parse_overrides(overrides: Sequence[str]):
    """Split CLI ``key=value`` items into (set dotlist, delete keys)."""
    sets, deletes = [], []
    for item in overrides:
        if item.startswith("~"):
            deletes.append(item[1:].split("=", 1)[0])
            continue
        if item.startswith("+"):
            item = item[1:]
        if "=" not in item:
            raise ConfigError(f"bad override '{item}': expected key=value (or ~key to delete)")
        sets.append(item)
    return sets, deletes


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "msg", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _delete_key(cfg: DictConfig, dotted: str) -> None:
    parts = dotted.split(".")
    if not dotted or "" in parts:
        raise ConfigError(f"cannot delete '{dotted}': not a dotted key")
    node: Any = cfg
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, DictConfig):
            if p not in node:
                raise ConfigError(f"cannot delete '{dotted}': '{p}' not found{suggest(p, [str(k) for k in node.keys()])}")
            if last:
                del node[p]
                return
            node = node._get_node(p)
        elif isinstance(node, ListConfig) and p.lstrip("-").isdigit() and -len(node) <= int(p) < len(node):
            if last:
                del node[int(p)]
                return
            node = node._get_node(int(p))
        else:
            parent = ".".join(parts[:i]) or "<root>"
            raise ConfigError(f"cannot delete '{dotted}': '{parent}' has no entry '{p}'")


def _apply_override(cfg: DictConfig, item: str) -> DictConfig:
    """One ``key=value`` / ``+key=value`` / ``~key``; any failure is a one-line ConfigError naming the item."""
    if item.startswith("~"):
        _delete_key(cfg, item[1:].split("=", 1)[0])
        return cfg
    text = item[1:] if item.startswith("+") else item
    key = text.split("=", 1)[0]
    if not key or "" in key.split(".") or key != key.strip():
        raise ConfigError(f"bad override '{item}': '{key}' is not a dotted key")
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text.split('=', 1)[1]}"]), resolve=False)["v"]
        OmegaConf.update(cfg, key, value, merge=True, force_add=True)  # list items too: stages.1.config=...
    except Exception as e:  # noqa: BLE001 - OmegaConf, YAML and merge errors alike
        raise ConfigError(f"bad override '{item}': {_first_line(e)}") from None
    return cfg


def load_yaml(path: str) -> DictConfig:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.isdir(path):
        raise ConfigError(f"config {path} is a directory, not a YAML file")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"cannot read config {path}: {yaml_error_message(e)}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    # `extends: other.yaml` (relative to this file) is merged underneath
    base = cfg.pop("extends", None)
    if base:
        bases = [base] if isinstance(base, str) else list(base)
        merged = OmegaConf.create()
        for b in bases:
            merged = OmegaConf.merge(merged, load_yaml(os.path.join(os.path.dirname(path), b)))
        cfg = OmegaConf.merge(merged, cfg)
    return cfg


def yaml_error_message(e: Exception) -> str:
    """A YAML syntax error as ``line L, column C: problem`` (1-based, as editors count)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def load_config(*yamls: str, cli_args: Sequence[str] = (), extra: Optional[dict] = None) -> DictConfig:
    """Merge YAML files in order, then ``extra``, then CLI overrides. Not yet resolved."""
    cfg = OmegaConf.create()
    for y in yamls:
        cfg = OmegaConf.merge(cfg, load_yaml(y))
    if extra:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(extra))
    parse_overrides(cli_args)  # check the syntax of all of them first
    for item in cli_args:  # then apply in the order given: `+a.b={...} ~a.b.c` works
        cfg = _apply_override(cfg, item)
    return cfg


def to_yaml(cfg: Any, resolve: bool = False) -> str:
    if dataclasses.is_dataclass(cfg):
        cfg = OmegaConf.structured(cfg)
    if not isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.create(cfg)
    return OmegaConf.to_yaml(cfg, resolve=resolve)
