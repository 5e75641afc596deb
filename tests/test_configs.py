"""Every shipped config (full-size ones included) parses and validates without loading any weights."""
import glob
import os
import re

import pytest

from it3d.core.config import ConfigError
from it3d.runner.cli import import_extensions, prepare_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
                 if os.sep + "shrink" + os.sep not in p)
# values only a user can give (an input image, a finished run, a prompt, a fine-tuned model of a run)
USER_KEYS = re.compile(r"(image_path|coarse_stage_dir|pretrained_model_name_or_path|prompt)$")


def test_there_are_configs():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in CONFIGS}
    assert {"make-it-3d.yaml", "customize-it-3d.yaml", "tiny/make-it-3d.yaml", "tiny/customize-it-3d.yaml",
            "stages/coarse.yaml", "stages/refine.yaml", "stages/dreambooth.yaml"} <= names
    assert len([n for n in names if n.startswith("ablations/")]) >= 8


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "configs")))
def test_config_validates(path, tmp_path, monkeypatch):
    import_extensions()
    monkeypatch.chdir(ROOT)
    overrides = [f"exp_root_dir={tmp_path}"]
    filled = []
    for _ in range(6):
        try:
            cfg, parsed = prepare_config([path], overrides)
            break
        except ConfigError as e:
            m = re.search(r"missing required value '([^']+)'", str(e))
            if not m:
                raise
            key = m.group(1)
            st = re.match(r"stage '([^']+)': ", str(e))
            if st:
                key = f"stage.{st.group(1)}.{key}"
            assert USER_KEYS.search(key), f"{path}: '{key}' is required but is not a user-supplied value"
            filled.append(key)
            overrides.append(f"{key}={tmp_path / 'x'}")
    else:
        pytest.fail(f"{path}: still missing values after filling {filled}")
    assert not any(os.scandir(tmp_path)), "validation must not write anything"
