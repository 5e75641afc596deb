"""Pre-flight and --dry-run: every model a staged run needs is located before any stage runs."""
import os
import subprocess
import sys

import pytest

import launch
from it3d.testing import tiny_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUSTOMIZE_MODELS = {  # what configs/customize-it-3d.yaml loads, and the key each is set by
    "facebook/sam-vit-base": "data.preprocess.mask.pretrained_model_name_or_path",
    "depth-anything/Depth-Anything-V2-Small-hf": "data.preprocess.depth.pretrained_model_name_or_path",
    "Salesforce/blip-image-captioning-large": "data.preprocess.caption_model.pretrained_model_name_or_path",
    "stabilityai/stable-diffusion-2-base": "stage.dreambooth.system.pretrained_model_name_or_path",
    "bennyguo/zero123-xl-diffusers": "stage.coarse.system.guidance.zero123.pretrained_model_name_or_path",
    "facebook/sam-vit-huge": "stage.refine.system.builder.sam.pretrained_model_name_or_path",
}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network, an empty HF cache, an empty $IT3D_MODEL_ROOT."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("IT3D_MODEL_ROOT", str(tmp_path / "models"))
    os.makedirs(tmp_path / "models")
    return tmp_path


def _launch(capsys, *argv):
    rc = launch.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err.strip().splitlines()


def _missing(err_lines):
    return {line.split("`hf download ")[1].split("`")[0]: line for line in err_lines if "`hf download " in line}


def test_full_config_offline_names_every_missing_model_in_one_go(offline):
    """The real CLI, as a user runs it: one message, every model, remedies as written, nothing written."""
    out_dir = offline / "out"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), "--config",
                        os.path.join(ROOT, "configs", "customize-it-3d.yaml"), "--train",
                        f"data.image_path={os.path.join(ROOT, 'load', 'synthetic', 'rgba.png')}",
                        f"exp_root_dir={out_dir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1
    assert lines[-1].startswith("error: 6 pretrained models are not available (HF_HUB_OFFLINE is set)"), lines[-1]
    missing = _missing(lines)
    assert set(missing) == set(CUSTOMIZE_MODELS)
    for mid, key in CUSTOMIZE_MODELS.items():
        assert f"{key}=/path/to/local/dir" in missing[mid] and f"$IT3D_MODEL_ROOT/{mid}" in missing[mid]
    # the DreamBooth stage's output is not "missing": the run makes it
    assert "save/pipeline" not in r.stderr
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr and "huggingface-cli" not in r.stderr
    assert not out_dir.exists()  # nothing of the trial was written


def test_models_found_locally_finished_stages_and_removed_terms_are_not_required(offline, capsys):
    models = offline / "models"
    os.makedirs(models / "bennyguo")
    os.symlink(tiny_model_dir("zero123"), models / "bennyguo" / "zero123-xl-diffusers")  # $IT3D_MODEL_ROOT/<id>
    cfg = os.path.join(ROOT, "configs", "customize-it-3d.yaml")
    image = os.path.join(ROOT, "load", "synthetic", "rgba.png")
    trial = offline / "trial"
    os.makedirs(trial / "preprocess")
    (trial / "preprocess" / "stats.json").write_text("{}")  # finished: its estimators are not needed again
    rc, _, err = _launch(capsys, "--config", cfg, "--train", f"data.image_path={image}", f"trial_dir={trial}",
                         f"stage.refine.system.builder.sam.pretrained_model_name_or_path={tiny_model_dir('sam')}")
    assert rc == 1 and set(_missing(err)) == {"stabilityai/stable-diffusion-2-base"}

    # a constant-zero weight and a removed entry are never built, so never required
    rc, _, err = _launch(capsys, "--config", cfg, "--train", f"data.image_path={image}", f"trial_dir={offline / 't2'}",
                         "stage.coarse.system.guidance.zero123.weight=0", "~stage.refine.system.builder.sam",
                         "stage.refine.system.builder.sam.enabled=false")
    assert "bennyguo/zero123-xl-diffusers" not in _missing(err) and "facebook/sam-vit-huge" not in _missing(err)
    rc, _, err = _launch(capsys, "--config", cfg, "--train", f"data.image_path={image}", f"trial_dir={offline / 't3'}",
                         "~stage.coarse.system.guidance.zero123")
    assert "bennyguo/zero123-xl-diffusers" not in _missing(err)


def test_dry_run_prints_the_plan_and_writes_resolved_configs(offline, capsys):
    trial = offline / "dry"
    rc, out, err = _launch(capsys, "--config", os.path.join(ROOT, "configs", "tiny", "customize-it-3d.yaml"),
                           "--dry-run", f"trial_dir={trial}", "precision=bf16", "stage.coarse.trainer.max_steps=42")
    assert rc == 0, err
    assert f"plan for {trial} (precision bf16):" in out
    assert "3. coarse [coarse] to run: steps 42, resolution 48x48" in out
    assert "guidance zero123 (zero123) weight 40.0 at 64 px" in out
    assert "2. dreambooth [dreambooth] to run: steps 8 (mask 1 + depth 2 + normal 2 + rgb 3)" in out
    assert f"model {trial}/dreambooth/save/pipeline: made by stage dreambooth" in out
    assert f"model {tiny_model_dir('zero123')}: local folder" in out
    files = sorted(os.listdir(trial / "dry-run"))
    assert files == ["coarse.yaml", "dreambooth.yaml", "plan.txt", "preprocess.yaml", "refine.yaml", "root.yaml"]
    coarse = (trial / "dry-run" / "coarse.yaml").read_text()
    assert "max_steps: 42" in coarse and "precision: bf16" in coarse and "${" not in coarse
    assert sorted(os.listdir(trial)) == ["dry-run"]  # nothing trained, no stage dir, no stats
