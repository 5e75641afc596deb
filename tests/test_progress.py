"""Progress files (it3d.core.progress) and the Lightning callback that keeps a stage's up to date."""
import json
import os

import lightning.pytorch as pl
import pytest
import torch

from it3d.core import progress
from it3d.runner.progress_callback import ProgressCallback


def test_eta_is_the_rate_of_the_steps_made_here():
    # 20 steps (10 -> 30) in 20 s: 1 step/s, 70 to go; a resumed run does not count the 10 it skipped
    assert progress.eta(30, 100, 10, 20.0) == pytest.approx(70.0)
    assert progress.eta(10, 100, 10, 5.0) is None  # no step made yet
    assert progress.fmt_s(3725) == "1:02:05" and progress.fmt_s(65.4) == "1:05" and progress.fmt_s(None) == "?"


def test_progress_file_phases_throttling_and_tasks(tmp_path, capsys):
    pf = progress.ProgressFile(str(tmp_path / "coarse"), min_interval=3600)
    pf.phase("train", total=100, step=10)
    rec = progress.read(str(tmp_path / "coarse"))
    assert (rec["stage"], rec["phase"], rec["step"], rec["total"], rec["eta_s"]) == ("coarse", "train", 10, 100, None)
    pf.step(20)  # inside the interval: not written
    assert progress.read(str(tmp_path / "coarse"))["step"] == 10
    pf.step(30, force=True)
    assert progress.read(str(tmp_path / "coarse"))["step"] == 30
    pf.min_interval = 0
    with progress.reporting(pf):
        with progress.bar(total=3, desc="building point cloud") as b:
            b.update()
            assert progress.read(str(tmp_path / "coarse"))["task"] == {"desc": "building point cloud", "n": 1,
                                                                       "total": 3}
            for i, _ in enumerate(progress.bar(["a", "b"], desc="inner")):
                assert progress.read(str(tmp_path / "coarse"))["task"] == {"desc": "inner", "n": i, "total": 2}
    assert "task" not in progress.read(str(tmp_path / "coarse"))  # a finished task leaves the record
    assert progress.active() is None
    assert capsys.readouterr().err == ""  # not a TTY: the bars stay silent


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return ((self.w - 1.0) ** 2).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def test_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Watch(pl.Callback):
    """Reads the progress file after ProgressCallback wrote it, at every training step."""

    def __init__(self, stage_dir):
        self.stage_dir, self.seen = stage_dir, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rec = progress.read(self.stage_dir)
        self.seen.append((rec["phase"], rec["step"], rec["total"]))


def test_callback_writes_train_and_test_progress(tmp_path, one_thread):
    stage = str(tmp_path / "refine")
    cb = ProgressCallback(stage)
    cb.file.min_interval = 0
    watch = Watch(stage)
    data = torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1)
    trainer = pl.Trainer(max_steps=5, val_check_interval=2, limit_val_batches=1, callbacks=[cb, watch], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=str(tmp_path))
    trainer.fit(Tiny(), train_dataloaders=data, val_dataloaders=data)
    assert watch.seen == [("train", k, 5) for k in range(1, 6)]
    rec = json.load(open(os.path.join(stage, "logs", "progress.json")))
    assert (rec["stage"], rec["phase"], rec["step"], rec["val_step"], rec["eta_s"]) == ("refine", "train", 5, 4, 0.0)
    trainer.test(Tiny(), dataloaders=torch.utils.data.DataLoader(torch.zeros(3, 1), batch_size=1))
    rec = progress.read(stage)
    assert (rec["phase"], rec["step"], rec["total"]) == ("test", 3, 3)
    assert progress.active() is None  # the stage's file is active only while the trainer runs
