"""The trial-dir layout is known in one place: it3d.core.layout. No other module spells a trial's file
names as path literals (docstrings, comments and error messages may describe them), and the names on
disk are the ones users and the README see."""
import ast
import os

from it3d.core.layout import StageDir, TrialDir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "custom", "it3d")
NAMES = {"parsed.yaml", "stats.json", "stage.json", "last.ckpt", "run.lock", "metrics.csv", "progress.json",
         "step_times.json", "turntable.mp4", "dry-run", "ckpts"}


def _literals(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
            yield n.lineno, n.value


def test_only_the_layout_module_spells_trial_file_names():
    found = []
    for folder, _, files in os.walk(PKG):
        for f in files:
            path = os.path.join(folder, f)
            if not f.endswith(".py") or path == os.path.join(PKG, "core", "layout.py"):
                continue
            for line, text in _literals(path):
                hits = [n for n in NAMES if n in text and not any(c.isspace() for c in text)]  # not a message
                if hits:
                    found.append(f"{os.path.relpath(path, PKG)}:{line}: {text!r}")
    assert not found, "trial file names outside it3d/core/layout.py:\n" + "\n".join(found)


def test_the_names_on_disk():
    t = TrialDir("/r")
    s = t.stage("coarse")
    assert (t.parsed_config, s.path) == ("/r/configs/parsed.yaml", "/r/coarse")
    assert (s.last_ckpt, s.stats, s.state, s.lock) == ("/r/coarse/ckpts/last.ckpt", "/r/coarse/stats.json",
                                                       "/r/coarse/stage.json", "/r/coarse/run.lock")
    assert (s.turntable, s.export_dir) == ("/r/coarse/save/test/turntable.mp4", "/r/coarse/save/export")
    assert (s.metrics_csv, s.progress, s.step_times) == ("/r/coarse/logs/csv/metrics.csv", "/r/coarse/logs/progress.json",
                                                         "/r/coarse/logs/step_times.json")
    assert os.fspath(StageDir("/r/x")) == "/r/x" and t.dry_run == "/r/dry-run"
