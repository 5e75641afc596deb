"""``python -m it3d.eval ...`` = ``python -m it3d.eval.runner ...`` (the benchmark runner)."""
from .runner import main

raise SystemExit(main())
