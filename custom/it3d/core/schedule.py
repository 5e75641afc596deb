"""Schedules: any weight may be a number, ``[start_step, v0, v1, end_step]`` or ``[[step, v], ...]``."""
from __future__ import annotations

from typing import Any, List

from omegaconf import ListConfig, OmegaConf

from .errors import ConfigError

_HOW = "expected a number, [start, v0, v1, end] or [[step, v], ...]"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_list(value: Any) -> Any:
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value)
    if isinstance(value, tuple):
        value = list(value)
    return value


def _points(value: list) -> List[tuple]:
    """``[[step, v], ...]`` -> [(step, v)], checked: pairs of numbers, steps >= 0 and non-decreasing."""
    if any(len(p) != 2 or not all(_is_num(x) for x in p) for p in value):
        raise ConfigError(f"piecewise schedule points must be [step, value] pairs of numbers: {value!r}")
    pts = [(float(p[0]), float(p[1])) for p in value]
    if pts[0][0] < 0:
        raise ConfigError(f"schedule steps must be >= 0: {value!r}")
    if any(b[0] < a[0] for a, b in zip(pts, pts[1:])):
        raise ConfigError(f"piecewise schedule steps must be non-decreasing: {value!r}")
    return pts


def _linear(value: list) -> tuple:
    """``[start, v0, v1, end]``, checked: numbers, 0 <= start <= end."""
    if len(value) != 4 or not all(_is_num(x) for x in value):
        raise ConfigError(f"not a schedule: {value!r} ({_HOW})")
    start, v0, v1, end = value
    if start < 0 or end < start:
        raise ConfigError(f"schedule [start, v0, v1, end] needs 0 <= start <= end: {value!r}")
    return start, v0, v1, end


def C(value: Any, step: int, epoch: int = 0) -> float:
    """Evaluate a schedulable value at ``step``.

    * a number -> itself
    * ``[start_step, v0, v1, end_step]`` -> v0 before start, v1 after end, linear between
    * ``[[s0, v0], [s1, v1], ...]`` -> piecewise linear through the points, constant outside
    """
    if _is_num(value):
        return value
    value = _as_list(value)
    if not isinstance(value, list) or len(value) == 0:
        raise ConfigError(f"not a schedule: {value!r} ({_HOW})")
    if all(isinstance(p, (list, tuple, ListConfig)) for p in value):
        pts = _points([list(p) for p in value])
        # right-continuous: at a repeated step (a jump) the later point's value holds
        if step < pts[0][0]:
            return pts[0][1]
        for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
            if s0 <= step < s1:
                return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
        return pts[-1][1]
    start, v0, v1, end = _linear(value)
    if step <= start:
        return v0
    if step >= end:
        return v1
    return v0 + (v1 - v0) * (step - start) / (end - start)


def schedule_values(value: Any) -> list:
    """The values a (well-formed) schedule takes at its points."""
    value = _as_list(value)
    if _is_num(value):
        return [value]
    if all(isinstance(p, (list, tuple)) for p in value):
        return [p[1] for p in value]
    return [value[1], value[2]]


def check_schedule(value: Any, path: str) -> None:
    try:
        C(value, 0)
    except (ConfigError, TypeError, ValueError, IndexError) as e:
        raise ConfigError(f"{path}: {e}") from None
