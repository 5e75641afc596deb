"""``python -m it3d.eval ...`` = ``python -m it3d.batch ...`` (the benchmark runner; an entry script)."""
from it3d.batch.cli import main

raise SystemExit(main(prog="python -m it3d.eval"))
