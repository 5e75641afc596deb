"""Out of GPU memory ends in one line naming the stage, the phase and the stage's memory settings with
their values (it3d.runner.oom); other errors are not dressed up as memory errors."""
import os

import pytest
import torch

from it3d.runner.oom import is_oom, oom_message

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_coarse_stage_out_of_memory_names_its_settings(tmp_path, monkeypatch, capsys):
    from launch import main

    import it3d.systems.coarse as coarse

    orig = coarse.CoarseSystem.training_step

    def step(self, batch, batch_idx):
        if self.global_step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 23.65 GiB total)")
        return orig(self, batch, batch_idx)

    monkeypatch.setattr(coarse.CoarseSystem, "training_step", step)
    rc = main(["--config", os.path.join(ROOT, "configs", "tiny", "coarse.yaml"), "--train", f"trial_dir={tmp_path / 't'}",
               "trainer.max_steps=5", "trainer.enable_progress_bar=false", "data.heights=[32]", "data.widths=[32]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    line = err[-1]
    assert line.startswith("error: stage 'coarse' ran out of GPU memory while training; lower one of: "), line
    # the values this run had, most effective first
    assert line.index("data.heights=[32]") < line.index("system.renderer.num_samples_per_ray=24") \
        < line.index("system.renderer.num_importance_samples=8"), line
    assert "rerun the same command to resume" in line and "Tried to allocate 20.00 GiB" in line
    assert not any("Traceback" in ln for ln in err)
    from it3d.core import progress

    assert progress.active() is None  # the failed stage's progress file is no longer the process's active one


def test_messages_by_stage_and_what_counts_as_out_of_memory():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"data": {"resolution": 512}, "system": {"class_batch_size": 4, "optimizer": {"name": "AdamW"},
                                                                    "gradient_checkpointing": True,
                                                                    "train_text_encoder": True}})
    msg = oom_message("dreambooth", "dreambooth", cfg, torch.OutOfMemoryError("CUDA out of memory"), "fp32", "test")
    assert msg.startswith("stage 'dreambooth' ran out of GPU memory while rendering the test views; lower one of: "
                          "data.resolution=512 (the fine-tuning size), system.class_batch_size=4")
    assert "system.optimizer.name=AdamW (AdamW8bit: 8-bit optimiser states)" in msg
    assert msg.count("precision=fp16") == 1  # an fp32 run is told about half precision ...
    assert "precision=fp16" not in oom_message("dreambooth", "dreambooth", cfg, RuntimeError("x"), "auto")  # ... auto is
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("The size of tensor a (9) must match the size of tensor b (3)"))
    assert not is_oom(ValueError("out of memory"))  # only the allocator's errors


def test_other_errors_keep_their_own_message(tmp_path, monkeypatch, capsys):
    from launch import main

    import it3d.systems.coarse as coarse

    def step(self, batch, batch_idx):
        raise RuntimeError("The size of tensor a (9) must match the size of tensor b (3)")

    monkeypatch.setattr(coarse.CoarseSystem, "training_step", step)
    rc = main(["--config", os.path.join(ROOT, "configs", "tiny", "coarse.yaml"), "--train", f"trial_dir={tmp_path / 't'}",
               "trainer.max_steps=2", "trainer.enable_progress_bar=false", "data.heights=[32]", "data.widths=[32]"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and "GPU memory" not in line and "size of tensor a (9)" in line, line
