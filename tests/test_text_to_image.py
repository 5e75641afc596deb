"""Text-to-3D's first stage: the reference image generated from a prompt (tiny offline SD)."""
import os

import numpy as np
import pytest
from PIL import Image

from it3d.core.config import ConfigError
from it3d.runner.text_to_image import generate_reference
from it3d.testing import tiny_model_dir


def test_generates_then_skips(tmp_path, one_thread):
    cfg = {"prompt": "a red teapot", "pretrained_model_name_or_path": tiny_model_dir("sd"), "height": 64, "width": 64,
           "num_inference_steps": 2}
    path = generate_reference(cfg, str(tmp_path))
    img = np.asarray(Image.open(path))
    assert img.shape == (64, 64, 3) and img.std() > 0
    assert (tmp_path / "prompt.txt").read_text().strip() == "a red teapot"
    mtime = os.path.getmtime(path)
    assert generate_reference(cfg, str(tmp_path)) == path and os.path.getmtime(path) == mtime  # cached


def test_prompt_is_required(tmp_path):
    with pytest.raises(ConfigError, match="missing required value 'stage.text2image.prompt'"):
        generate_reference({}, str(tmp_path), path="stage.text2image")
