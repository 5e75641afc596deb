"""Offline test helpers: tiny randomly initialised pretrained models and synthetic scenes.

Tiny models are built with the real architecture classes, saved in the hub's on-disk
formats, and loaded back by the real loading code (``it3d.core.hub``). They are built
once into a cache folder (``$IT3D_TINY_DIR``, default ``<repo>/.it3d_cache/tiny``) and
reused; each builder is deterministic (fixed seed).

``tiny_model_dir("sd")`` returns the folder of the tiny Stable Diffusion pipeline,
building it first when needed. Builders register themselves with :func:`tiny_builder`; each
takes ``(out_dir, size="tiny")`` and writes the published hub layout of the model it imitates
(``size="full"``: the published architecture with random weights, see :func:`model_dir`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, Dict

_BUILDERS: Dict[str, Callable[[str], None]] = {}
_VERSION = "2"  # bump when a builder changes what it writes
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def tiny_root() -> str:
    return os.environ.get("IT3D_TINY_DIR", os.path.join(REPO_ROOT, ".it3d_cache", "tiny"))


def tiny_builder(name: str):
    """Register ``fn(out_dir, size="tiny")`` that builds model ``name`` into ``out_dir``."""

    def deco(fn):
        if name in _BUILDERS and _BUILDERS[name] is not fn:
            raise ValueError(f"duplicate tiny model builder '{name}'")
        _BUILDERS[name] = fn
        return fn

    return deco


def _load_builders() -> None:
    import importlib

    for mod in ("tiny_sd", "tiny_vision", "tiny_eval"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise


def tiny_model_names():
    _load_builders()
    return sorted(_BUILDERS)


def tiny_model_dir(name: str, rebuild: bool = False) -> str:
    """Folder holding tiny model ``name`` (built on first use; atomic: built in a temp dir, then renamed)."""
    return model_dir(name, "tiny", tiny_root(), rebuild)


def model_dir(name: str, size: str = "tiny", root: str = "", rebuild: bool = False) -> str:
    """Folder ``<root>/<name>-v<N>`` (``-full`` for full size) holding model ``name`` in its published
    layout, built on first use (atomic: built in a temp dir, then renamed)."""
    _load_builders()
    if name not in _BUILDERS:
        from ..core.registry import suggest

        raise KeyError(f"no tiny model '{name}'{suggest(name, _BUILDERS)} (known: {', '.join(sorted(_BUILDERS))})")
    root = root or tiny_root()
    out = os.path.join(root, f"{name}-v{_VERSION}" + ("" if size == "tiny" else f"-{size}"))
    if rebuild and os.path.isdir(out):
        shutil.rmtree(out)
    if not os.path.isdir(out):
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=root)
        try:
            _BUILDERS[name](tmp, size=size) if size != "tiny" else _BUILDERS[name](tmp)
            try:
                os.replace(tmp, out)
            except OSError:  # another process won the race
                if not os.path.isdir(out):
                    raise
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def _tiny_dir(name) -> str:
    """``${tiny:sd}``: folder of a tiny offline test model (built on first use); for configs/tiny only."""
    return tiny_model_dir(str(name))


def realfusion15_dir() -> str:
    """The RealFusion15 inputs: ``$IT3D_REALFUSION15``, else ``../shared/data/realfusion15`` beside the repo."""
    return os.environ.get("IT3D_REALFUSION15",
                          os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "realfusion15"))


def _register_tiny_resolver() -> None:
    from ..core.resolvers import register_resolver

    register_resolver("tiny", _tiny_dir)


_register_tiny_resolver()  # ``${tiny:sd}`` in configs/tiny: the ``it3d`` package imports this module
