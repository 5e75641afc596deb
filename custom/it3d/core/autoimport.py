"""Import every module of a package so its components register (used by package __init__ files)."""
from __future__ import annotations

import importlib
import pkgutil


def import_submodules(package_name: str, package_path, skip=()) -> None:
    """``skip``: modules left to explicit imports (e.g. one run as ``python -m``, which runpy warns about when
    the package's __init__ has imported it already)."""
    for info in sorted(pkgutil.iter_modules(package_path), key=lambda i: (i.name != "base", i.name)):
        if info.name.startswith("_") or info.name in skip:
            continue
        importlib.import_module(f"{package_name}.{info.name}")
