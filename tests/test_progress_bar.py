"""The training progress display: steps of the whole run (also after a resume), no epoch or v_num noise;
log lines instead of a bar where the output is not a terminal."""
import logging
import os
import re

import pytest

from it3d.runner.cli import CUSTOM_DIR, import_extensions, prepare_config, run_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXT = os.path.join(ROOT, "tests", "extensions")
TOY = os.path.join(EXT, "toy.yaml")
DEV = {"accelerator": "cpu", "devices": 1, "device": "cpu"}


@pytest.fixture(scope="module", autouse=True)
def toy_extension():
    import_extensions([CUSTOM_DIR, EXT])


def train(tmp_path, monkeypatch, tty, *overrides):
    from it3d.core import trainer_parts

    monkeypatch.setattr(trainer_parts, "stdout_is_terminal", lambda: tty)
    cfg, parsed = prepare_config([TOY], [f"exp_root_dir={tmp_path}", "after_train=[]", "trainer.enable_progress_bar=true",
                                         *overrides])
    run_stage(cfg, parsed, "train", DEV)
    return tmp_path / "toy" / "run"


def test_bar_counts_steps_of_the_whole_run(tmp_path, monkeypatch, capsys):
    trial = train(tmp_path, monkeypatch, True, "trainer.max_steps=6")
    first = capsys.readouterr().out
    train(tmp_path, monkeypatch, True, "trainer.max_steps=9", f"resume={trial / 'ckpts' / 'last.ckpt'}")
    resumed = capsys.readouterr().out
    for out, start, total in ((first, 0, 6), (resumed, 6, 9)):
        counts = [(int(n), int(t)) for n, t in re.findall(r"(\d+)/(\d+) \[", out)]
        train_counts = [n for n, t in counts if t == total]
        assert train_counts and all(n <= t for n, t in counts), counts  # never 41/19
        assert min(train_counts) >= start and max(train_counts) == total  # a resume starts at the saved step
        assert "Epoch" not in out and "v_num" not in out and "/-" not in out
        assert "run:" in out  # the bar is labelled with the trial (a stage's name in a pipeline)


def test_log_lines_without_a_terminal(tmp_path, monkeypatch, caplog):
    import torch

    with caplog.at_level(logging.INFO, logger="it3d"):
        trial = train(tmp_path, monkeypatch, False, "trainer.max_steps=20")
        saved = torch.load(trial / "ckpts" / "last.ckpt", weights_only=False)["global_step"]
        train(tmp_path, monkeypatch, False, "trainer.max_steps=30", f"resume={trial / 'ckpts' / 'last.ckpt'}")
    steps = [(int(m.group(1)), int(m.group(2))) for m in
             (re.match(r"run: step (\d+)/(\d+) \(\d+ s\)$", r.getMessage()) for r in caplog.records) if m]
    # the first step of each run, then every tenth of the run (2 of 20, 3 of 30) and the last
    assert steps == [(1, 20)] + [(k, 20) for k in range(2, 21, 2)] + \
        [(saved + 1, 30)] + [(k, 30) for k in range(3, 31, 3) if k > saved + 1]


def test_bar_reads_the_logged_values_only_every_log_every_n_steps(tmp_path, monkeypatch):
    """Each read of the progress-bar metrics is a host sync on a GPU (the logged losses are device tensors)."""
    from it3d.core.trainer_parts import StepProgressBar

    reads, in_step = [], []
    get, end = StepProgressBar.get_metrics, StepProgressBar.on_train_batch_end

    def on_end(self, trainer, *a):
        in_step.append(1)
        end(self, trainer, *a)
        in_step.pop()

    monkeypatch.setattr(StepProgressBar, "on_train_batch_end", on_end)
    monkeypatch.setattr(StepProgressBar, "get_metrics",
                        lambda self, t, m: (reads.append(t.global_step) if in_step else None) or get(self, t, m))
    train(tmp_path, monkeypatch, True, "trainer.max_steps=9", "trainer.log_every_n_steps=4")
    assert reads == [4, 8, 9]  # after training steps: every 4th and the last, not every step
