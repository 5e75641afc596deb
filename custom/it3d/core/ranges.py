"""Natural ranges of config values, checked when a config is parsed (before any work starts).

A numeric field gets its range from, in order:

1. its own metadata: ``x: float = check(0.2, ge=0, lt=1)`` (or ``unbounded(0.0)`` for "any number");
2. the naming conventions in :data:`RULES`, matched on the field's name (``*_steps`` >= 0,
   ``*_prob`` in [0, 1], ``heights`` > 0, ``*_range`` a well-formed ``[lo, hi]`` pair, ...).

A value may be a number, a list of numbers (every element is checked) or a schedule (its values
are checked, its steps must be >= 0 and in order). Free-form dicts (``pos_encoding``,
``optimizer.args``, ``shading_probs``) are checked key by key with the same conventions.
``tests/test_core_ranges.py`` lists every numeric field of every registered component and
fails when one has neither a range nor an explicit ``unbounded``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple, Union

from .errors import ConfigError

_MISSING = dataclasses.MISSING


Number = Union[int, float]


@dataclass(frozen=True)
class Range:
    ge: Optional[Number] = None
    gt: Optional[Number] = None
    le: Optional[Number] = None
    lt: Optional[Number] = None
    pair: bool = False  # a [lo, hi] list: exactly two values, lo <= hi
    integer: bool = False  # whole numbers only (counts, seeds)

    def describe(self) -> str:
        lo = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        hi = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f"{'>=' if self.ge is not None else '>'} {_num(self.ge if self.ge is not None else self.gt)}"
        if hi:
            return f"{'<=' if self.le is not None else '<'} {_num(self.le if self.le is not None else self.lt)}"
        return "a number"

    def ok(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.integer and v != int(v):
            return False
        return not ((self.ge is not None and v < self.ge) or (self.gt is not None and v <= self.gt)
                    or (self.le is not None and v > self.le) or (self.lt is not None and v >= self.lt))


ANY = Range()


def _num(v: Number) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def check(default: Any = _MISSING, *, default_factory: Any = _MISSING, ge=None, gt=None, le=None, lt=None,
          pair: bool = False, integer: bool = False, choices: Optional[Tuple] = None):
    """A dataclass field with an explicit range (``ge``/``gt``/``le``/``lt``) and/or allowed ``choices``."""
    meta = {"range": Range(ge, gt, le, lt, pair, integer)}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if default_factory is not _MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def unbounded(default: Any = _MISSING, *, default_factory: Any = _MISSING):
    """A numeric field with no natural range (an azimuth, a raw feature value)."""
    if default_factory is not _MISSING:
        return field(default_factory=default_factory, metadata={"range": ANY})
    return field(default=default, metadata={"range": ANY})


UNIT = Range(ge=0, le=1)
NONNEG = Range(ge=0)
POS = Range(gt=0)
# naming conventions: (regex on the field name, range); the first match wins
RULES: List[Tuple[str, Range]] = [
    (r"(^|_)probs?$|_percent$|^strength|(^|_)(opacity|mask)_threshold$|(^|_)(min|max)_area$|fraction$"
     r"|(^|_)colou?rs?$|^bg_init$", UNIT),
    (r"(^|_)ratio$", Range(ge=0, lt=1)),
    (r"^seed$|_seed$", Range(ge=0, le=2**32 - 1, integer=True)),
    (r"elevation_range$", Range(ge=-90, le=90, pair=True)),
    (r"(^|_)elevations?$", Range(ge=-90, le=90)),
    (r"^fovy_range$", Range(gt=0, lt=180, pair=True)),
    (r"^fovy$", Range(ge=0, lt=180)),  # 0: the default field of view
    (r"fovy(_deg)?$", Range(gt=0, lt=180)),
    (r"distance_range$", Range(gt=0, pair=True)),
    (r"azimuth(_warmup)?_range$", Range(pair=True)),
    (r"azimuths?$", ANY),  # degrees: any turn
    (r"score_threshold$", ANY),  # on a model's predicted IoU, which is not confined to [0, 1]
    (r"(^|_)(height|width)$", NONNEG),  # 0: the datamodule's size
    (r"(heights|widths|_height|_width|size|side|resolution|channels|neurons|_dims?|fps|per_pixel|scales"
     r"|supersample|features_per_level|beams)$", POS),
    (r"(^|_)steps$|milestones$|^(n|num)_|iterations$|layers$|_images$|^max_(points|new_tokens|samples)$|ray_batch$",
     Range(ge=0, integer=True)),  # max_samples: 0 = no cap
    (r"_faces$|_every$|ssaa$", Range(gt=0, integer=True)),  # target_faces (None: no decimation), resize_every
    (r"eps$|^lr$", POS),
    (r"(^|_)(distance|radius|tol|std|scale|clip|perturb|slope|relief|power|margin|plane|threshold|angle|weight"
     r"|decay)$|^lambda_|^max_slope$", NONNEG),
]
_COMPILED = [(re.compile(p), r) for p, r in RULES]


def rule_for(name: str) -> Optional[Range]:
    for pat, rng in _COMPILED:
        if pat.search(str(name)):
            return rng
    return None


def range_of(f: dataclasses.Field) -> Optional[Range]:
    if "range" in f.metadata:
        return f.metadata["range"]
    return rule_for(f.name)


# ----------------------------------------------------------------------------- values
def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_schedule(value: list) -> bool:
    return bool(value) and (all(isinstance(p, (list, tuple)) for p in value)
                            or (len(value) == 4 and all(_is_num(v) for v in value)))


def check_value(value: Any, rng: Range, path: str, schedules: bool = True) -> None:
    """A number, a list of numbers, a ``[lo, hi]`` pair or (``schedules``) a schedule against ``rng``."""
    if value is None or isinstance(value, (str, bool)):
        return
    if _is_num(value):
        if not rng.ok(float(value)):
            what = ("a whole number " if rng.integer else "") + rng.describe()
            raise ConfigError(f"{path} must be {what}, got {value!r}")
        return
    if isinstance(value, dict):
        for k, v in value.items():  # e.g. shading_probs: {albedo: 1.0, normal: [[0, 0.0], [20, 1.0]]}
            check_value(v, rng, f"{path}.{k}")
        return
    if not isinstance(value, (list, tuple)):
        return
    if rng.pair:
        if len(value) != 2 or not all(_is_num(v) for v in value):
            raise ConfigError(f"{path} must be a [low, high] pair of numbers, got {list(value)!r}")
        if value[0] > value[1]:
            raise ConfigError(f"{path} must be a [low, high] pair with low <= high, got {list(value)!r}")
    values = list(value)
    if schedules and not rng.pair and _is_schedule(values):
        from .schedule import check_schedule, schedule_values

        check_schedule(values, path)
        values = schedule_values(values)
    for i, v in enumerate(values):
        if _is_num(v) and not rng.ok(float(v)):
            raise ConfigError(f"{path} must be {rng.describe()} (every value), got {list(value)!r}")
        if isinstance(v, (list, tuple, dict)):
            check_value(v, rng, f"{path}.{i}", schedules)


# ----------------------------------------------------------------------------- dataclasses
def check_dataclass(cls, obj: Any, path: str) -> None:
    """Check the range and choices of every field of ``obj`` (an instance of dataclass ``cls``)."""
    component_dicts = _component_dicts(cls)
    list_fields = _list_fields(cls)
    for f in dataclasses.fields(cls):
        val = getattr(obj, f.name)
        p = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(val):
            check_dataclass(type(val), val, p)
            continue
        choices = f.metadata.get("choices")
        if choices is not None and val not in choices:
            raise ConfigError(f"{p} must be one of {', '.join(map(str, choices))}, got {val!r}")
        if f.metadata.get("opaque") or f.name in component_dicts:
            continue  # checked elsewhere (a component's own config, Lightning's trainer arguments)
        if f.name in list_fields:
            check_elements(val, list_fields[f.name], p)
        rng = range_of(f)
        if rng is not None:
            check_value(val, rng, p, schedules=f.name not in list_fields)
        elif isinstance(val, dict):
            check_mapping(val, p)
        elif isinstance(val, (list, tuple)):
            for i, item in enumerate(val):  # e.g. modalities: [{modality: mask, steps: 25}, ...]
                if isinstance(item, dict):
                    check_mapping(item, f"{p}.{i}")


def check_mapping(mapping: dict, path: str) -> None:
    """A free-form dict (``pos_encoding``, ``optimizer``): its keys follow the naming conventions."""
    for k, v in mapping.items():
        p = f"{path}.{k}"
        rng = rule_for(str(k))
        if rng is not None:
            check_value(v, rng, p)
        elif isinstance(v, dict):
            check_mapping(v, p)


def _list_fields(cls) -> dict:
    """Fields annotated as lists (their values are elements, never schedules) -> the element type."""
    import typing

    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        hints = {}
    out = {}
    for name, tp in hints.items():
        if tp is list or typing.get_origin(tp) in (list, List):
            args = typing.get_args(tp)
            out[name] = args[0] if args else Any
    return out


_ELEMENT = {int: ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
            float: ("a number", _is_num), str: ("a string", lambda v: isinstance(v, str)),
            bool: ("true or false", lambda v: isinstance(v, bool))}


def check_elements(value: Any, element: Any, path: str) -> None:
    """``List[int]`` and friends: OmegaConf lets ``[1, [2]]`` through; every element must have the type."""
    if element not in _ELEMENT or not isinstance(value, (list, tuple)):
        return
    what, ok = _ELEMENT[element]
    for i, v in enumerate(value):
        if not ok(v):
            raise ConfigError(f"{path}.{i} must be {what}, got {v!r}")


def _component_dicts(cls) -> set:
    """Fields that hold a sub-component's config (validated against that component's own dataclass)."""
    out = set()
    for f in dataclasses.fields(cls):
        if f.metadata.get("kind"):
            out.add(f.metadata.get("config_field") or f.name[: -len("_type")])
        if f.metadata.get("terms"):
            out.add(f.name)
    return out
