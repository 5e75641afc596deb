"""OmegaConf resolvers available in every config: ``${add:a,b}``, ``${stem:path}``, ``${image_tag:path}``,
``${env:NAME,default}`` and more. ``${tiny:sd}`` (a tiny offline test model's folder) is registered by
``it3d.testing`` (imported by the ``it3d`` package) through :func:`register_resolver`: core knows nothing
of testing."""
from __future__ import annotations

import math
import os

from omegaconf import OmegaConf


def _image_tag(path) -> str:
    """A run tag from an image path: its stem, or its folder's name for generic stems (rgba.png, image.png)."""
    path = str(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem.lower() in ("rgba", "image", "img", "input", "rgb") and os.path.basename(os.path.dirname(path)):
        stem = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return stem.replace(" ", "_")


def register_resolver(name: str, fn) -> None:
    """Register ``${name:...}`` once (a second registration of the same name is ignored)."""
    if not OmegaConf.has_resolver(name):
        if hasattr(OmegaConf, "register_resolver"):
            OmegaConf.register_resolver(name, fn, annotation_validation="off")
        else:  # omegaconf < 2.4
            OmegaConf.register_new_resolver(name, fn)


def register_resolvers() -> None:
    def _num(x):
        return float(x) if isinstance(x, str) else x

    resolvers = {
        "add": lambda a, b: _num(a) + _num(b),
        "sub": lambda a, b: _num(a) - _num(b),
        "mul": lambda a, b: _num(a) * _num(b),
        "div": lambda a, b: _num(a) / _num(b),
        "idiv": lambda a, b: int(_num(a)) // int(_num(b)),
        "min": lambda a, b: min(_num(a), _num(b)),
        "max": lambda a, b: max(_num(a), _num(b)),
        "int": lambda a: int(_num(a)),
        "not": lambda a: not a,
        "gt0": lambda a: _num(a) > 0,
        "deg2rad": lambda a: math.radians(_num(a)),
        "basename": lambda p: os.path.basename(str(p)),
        "dirname": lambda p: os.path.dirname(str(p)),
        "stem": lambda p: os.path.splitext(os.path.basename(str(p)))[0],
        "join": lambda *parts: os.path.join(*[str(p) for p in parts]),
        "abspath": lambda p: os.path.abspath(str(p)),
        "rmspace": lambda s, sub="_": str(s).replace(" ", sub),
        "env": lambda name, default="": os.environ.get(str(name), default),
        "image_tag": _image_tag,
    }
    for name, fn in resolvers.items():
        register_resolver(name, fn)


