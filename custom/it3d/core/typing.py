"""Shape-annotated tensor aliases used across the package (checked with --typecheck)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Literal, NamedTuple, NewType, Optional, Sized, Tuple, Type, TypeVar, Union

from jaxtyping import Bool, Float, Int, Integer, Num, Shaped, UInt8
from torch import Tensor

__all__ = [
    "Any", "Callable", "Dict", "List", "Literal", "NamedTuple", "NewType", "Optional", "Sized",
    "Tuple", "Type", "TypeVar", "Union", "Bool", "Float", "Int", "Integer", "Num", "Shaped", "UInt8", "Tensor",
]
