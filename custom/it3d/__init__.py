"""it3d: one image to a 3D asset (Make-It-3D and Customize-It-3D as configs over shared components).

Importing the package imports every component module so that it registers itself.
"""
import importlib
import logging

__version__ = "0.1.0"

logger = logging.getLogger("it3d")
# bitsandbytes (imported by diffusers / transformers once installed) warns on CPUs with AVX512-BF16 that an
# optional kernels package for 4-bit layers is missing; we use only its 8-bit optimisers (--verbose shows it)
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from .core import registry  # noqa: E402
from .core.registry import register  # noqa: E402
from . import losses  # noqa: E402,F401
from . import testing  # noqa: E402,F401  (registers the ${tiny:...} config resolver; light: builds nothing)

# component packages; each package's __init__ imports all of its modules ("base" first)
_PACKAGES = [
    "data", "encodings", "geometry", "materials", "background", "renderers", "prompts", "guidance",
    "preprocess", "builders", "systems", "exporters", "eval",
]
for _p in _PACKAGES:
    importlib.import_module(f"{__name__}.{_p}")
