"""A user extension used by the launch tests: a toy system that fits y = a*x + b.

It is registered from outside custom/it3d (via IT3D_CUSTOM_DIRS), exactly as a user's
extension package dropped into custom/ would be.
"""
import os
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from it3d import register
from it3d.core.config import schedule
from it3d.data.base import BaseDataModule
from it3d.systems.base import BaseSystem


class _Steps(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.rand(16, generator=g)
        return {"x": x, "y": 3.0 * x - 1.0, "index": i}


@register("toy-data", kind="datamodule")
class ToyData(BaseDataModule):
    @dataclass
    class Config:
        n_train: int = 100000
        n_val: int = 2

    def train_dataloader(self):
        return DataLoader(_Steps(self.cfg.n_train), batch_size=None)

    def val_dataloader(self):
        return DataLoader(_Steps(self.cfg.n_val), batch_size=None)

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self):
        return self.val_dataloader()


@register("toy", kind="system")
class ToySystem(BaseSystem):
    @dataclass
    class Config(BaseSystem.Config):
        init: float = 0.0
        loss_weight: float = schedule(1.0)

    def configure(self):
        self.a = torch.nn.Parameter(torch.tensor(self.cfg.init))
        self.b = torch.nn.Parameter(torch.tensor(self.cfg.init))
        self.seen_steps = []

    def on_fit_start(self):
        with open(self.get_save_path("start.txt"), "a") as f:  # one line per (re)start
            f.write(f"{float(self.a):.6f} {float(self.b):.6f}\n")

    def training_step(self, batch, batch_idx):
        self.seen_steps.append(self.true_global_step)
        sleep_s = float(os.environ.get("IT3D_TOY_SLEEP_S", "0"))  # slows training so tests can interrupt it
        if sleep_s:
            import time

            time.sleep(sleep_s)
        with open(self.get_save_path("steps.log"), "a") as f:
            f.write(f"{self.true_global_step}\n")
        loss = self.C(self.cfg.loss_weight) * ((self.a * batch["x"] + self.b - batch["y"]) ** 2).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.save_image(f"it{self.true_global_step}-val/{batch['index']}.png", batch["x"].reshape(4, 4, 1))

    def test_step(self, batch, batch_idx):
        self.save_image(f"test/{batch['index']}.png", batch["x"].reshape(4, 4, 1))

    def predict_step(self, batch, batch_idx):
        from it3d.core import io

        io.write_text(self.get_save_path("export/params.txt"), f"{float(self.a):.6f} {float(self.b):.6f}\n")
