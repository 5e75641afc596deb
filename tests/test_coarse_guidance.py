"""The tiny coarse config with each guidance alone, SD + Zero123 together, and entries removed from
the command line (``~system.guidance.zero123`` or weight 0): the terms that ran are the ones logged."""
import csv
import os

import pytest

from it3d.runner.cli import import_extensions, prepare_config, run_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = {"accelerator": "cpu", "devices": 1, "device": "cpu"}
SD = "{type: stable-diffusion, pretrained_model_name_or_path: '${tiny:sd}', resolution: 64}"
ENTRIES = {
    "sd": SD,
    "clip_d": "{type: clip-d, pretrained_model_name_or_path: '${tiny:sd}', clip_model_name_or_path: '${tiny:clip}', "
              "resolution: 64, clip_threshold: 1000}",
    "zero123": "{type: zero123, weight: 40, pretrained_model_name_or_path: '${tiny:zero123}', resolution: 64}",
    "dreambooth": "{type: multimodal-dreambooth, pretrained_model_name_or_path: '${tiny:sd}', resolution: 64}",
}


def run(tmp_path, entries, extra=()):
    import_extensions()
    over = [f"exp_root_dir={tmp_path}", "use_timestamp=false", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
            "trainer.val_check_interval=2", "after_train=[]", "system.ref_mode=always", "data.heights=[32]",
            "data.widths=[32]", "system.material.shading_probs={albedo: 0.0, normal: 1.0}", "data.caption=a toy"]
    over += [f"+system.guidance.{name}={ENTRIES[name]}" for name in entries] + list(extra)
    cfg, parsed = prepare_config([os.path.join(ROOT, "configs", "tiny", "coarse.yaml")], over)
    trial = run_stage(cfg, parsed, "train", CPU)
    rows = list(csv.DictReader(open(os.path.join(trial, "logs", "csv", "metrics.csv"))))
    logged = {k[len("train/"):] for r in rows for k, v in r.items() if k.startswith("train/") and v not in ("", None)}
    return {k for k in logged if "/" not in k and k in ENTRIES}, rows


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_each_guidance_alone(tmp_path, name):
    ran, rows = run(tmp_path, [name])
    assert ran == {name}
    vals = [float(r[f"train/{name}"]) for r in rows if r.get(f"train/{name}")]
    assert len(vals) == 2 and all(v == v for v in vals)  # both steps, finite


def test_sd_and_zero123_together_and_removal(tmp_path):
    ran, _ = run(tmp_path / "both", ["sd", "zero123"])
    assert ran == {"sd", "zero123"}
    ran, _ = run(tmp_path / "removed", ["sd", "zero123"], ["~system.guidance.zero123"])
    assert ran == {"sd"}
    ran, _ = run(tmp_path / "zero", ["sd", "zero123"], ["system.guidance.zero123.weight=0"])
    assert ran == {"sd"}  # weight 0: never called
