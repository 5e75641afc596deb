"""Import every module of a package so its components register (used by package __init__ files)."""
from __future__ import annotations

import importlib
import pkgutil


def import_submodules(package_name: str, package_path) -> None:
    for info in sorted(pkgutil.iter_modules(package_path), key=lambda i: (i.name != "base", i.name)):
        if info.name.startswith("_"):
            continue
        importlib.import_module(f"{package_name}.{info.name}")
