"""Schedules: any weight may be a number, ``[start_step, v0, v1, end_step]`` or ``[[step, v], ...]``."""
from __future__ import annotations

from typing import Any

from omegaconf import ListConfig, OmegaConf

from .errors import ConfigError


def C(value: Any, step: int, epoch: int = 0) -> float:
    """Evaluate a schedulable value at ``step``.

    * a number -> itself
    * ``[start_step, v0, v1, end_step]`` -> v0 before start, v1 after end, linear between
    * ``[[s0, v0], [s1, v1], ...]`` -> piecewise linear through the points, constant outside
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, (ListConfig,)):
        value = OmegaConf.to_container(value)
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or len(value) == 0:
        raise ConfigError(f"not a schedule: {value!r} (expected a number, [start, v0, v1, end] or [[step, v], ...])")
    if all(isinstance(p, (list, tuple, ListConfig)) for p in value):
        pts = [(float(p[0]), float(p[1])) for p in value]
        if any(len(p) != 2 for p in value):
            raise ConfigError(f"piecewise schedule points must be [step, value] pairs: {value!r}")
        if any(b[0] < a[0] for a, b in zip(pts, pts[1:])):
            raise ConfigError(f"piecewise schedule steps must be non-decreasing: {value!r}")
        # right-continuous: at a repeated step (a jump) the later point's value holds
        if step < pts[0][0]:
            return pts[0][1]
        for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
            if s0 <= step < s1:
                return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
        return pts[-1][1]
    if len(value) == 4:
        start, v0, v1, end = value
        if step <= start:
            return v0
        if step >= end:
            return v1
        return v0 + (v1 - v0) * (step - start) / (end - start)
    raise ConfigError(f"not a schedule: {value!r} (expected a number, [start, v0, v1, end] or [[step, v], ...])")


def check_schedule(value: Any, path: str) -> None:
    try:
        C(value, 0)
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None

