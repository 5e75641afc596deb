"""``python -m it3d.batch --config ... --inputs DIR --out DIR [--address auto] [key=value ...]``."""
from .cli import main

raise SystemExit(main())
