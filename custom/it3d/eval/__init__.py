from ..core.autoimport import import_submodules

# runner registers nothing and is run as ``python -m it3d.eval.runner``: importing it here would make runpy warn
import_submodules(__name__, __path__, skip=("runner",))
