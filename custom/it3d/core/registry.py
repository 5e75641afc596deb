"""Typed registry: one namespace per component kind, each with a base class.

``@register("zero123", kind="guidance")`` adds a class to the ``guidance``
namespace.  Registering under an unknown kind, with a class that does not derive
from the kind's base class, or under a name that is already taken fails at import.
Looking up an unknown name fails with the kind, the name, the known names and a
close match.
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Type, TypeVar

from .errors import It3dError

KINDS = (
    "system",
    "datamodule",
    "geometry",
    "material",
    "background",
    "renderer",
    "guidance",
    "prompt-processor",
    "estimator",
    "exporter",
    "loss",
    "builder",
)

_bases: Dict[str, type] = {}
_namespaces: Dict[str, Dict[str, type]] = {k: {} for k in KINDS}

T = TypeVar("T", bound=type)


class RegistryError(It3dError, ValueError):
    """A registration or lookup problem; the message is meant for people."""


def suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_kind(kind: str) -> None:
    if kind not in _namespaces:
        raise RegistryError(
            f"unknown component kind '{kind}'; known kinds: {', '.join(KINDS)}{suggest(kind, KINDS)}"
        )


def declare_base(kind: str, base: type) -> None:
    """Set the base class every class registered under ``kind`` must derive from."""
    _check_kind(kind)
    if kind in _bases and _bases[kind] is not base:
        raise RegistryError(f"kind '{kind}' already has base class {_bases[kind].__name__}")
    _bases[kind] = base


def base_of(kind: str) -> type:
    _check_kind(kind)
    if kind not in _bases:
        raise RegistryError(f"kind '{kind}' has no base class declared yet")
    return _bases[kind]


def register(name: str, kind: str) -> Callable[[T], T]:
    _check_kind(kind)

    def deco(cls: T) -> T:
        base = _bases.get(kind)
        if base is None:
            raise RegistryError(f"cannot register '{name}': kind '{kind}' has no base class declared")
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise RegistryError(
                f"cannot register {getattr(cls, '__qualname__', cls)} as {kind} '{name}': "
                f"it is not a subclass of {base.__name__}"
            )
        ns = _namespaces[kind]
        if name in ns and ns[name] is not cls:
            other = ns[name]
            raise RegistryError(
                f"duplicate {kind} '{name}': already registered by {other.__module__}.{other.__qualname__}"
            )
        ns[name] = cls
        cls.registered_name = name
        cls.registered_kind = kind
        return cls

    return deco


def get(kind: str, name: str) -> type:
    _check_kind(kind)
    ns = _namespaces[kind]
    if not isinstance(name, str):  # e.g. ``type=[]`` from the command line
        raise RegistryError(f"{kind} type must be a name, got {name!r} (known: {', '.join(sorted(ns)) or '(none)'})")
    if name not in ns:
        known = ", ".join(sorted(ns)) or "(none)"
        raise RegistryError(f"{kind} '{name}' not found{suggest(name, ns)} (known: {known})")
    return ns[name]


def names(kind: str) -> list:
    _check_kind(kind)
    return sorted(_namespaces[kind])


def unregister(kind: str, name: str) -> None:
    """Remove an entry (used by tests that register throw-away classes)."""
    _namespaces[kind].pop(name, None)
