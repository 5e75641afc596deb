"""--typecheck: jaxtyping shape annotations are enforced by beartype at run time."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SNIPPET = """
import sys
sys.path.insert(0, {custom!r})
from jaxtyping import install_import_hook
install_import_hook("it3d", "beartype.beartype")
import torch
from it3d.core.image import recentre
recentre(torch.ones(4, 8, 8), torch.ones(8, 8), 0.2)  # right shapes: fine
try:
    recentre(torch.ones(8, 8), torch.ones(8, 8), 0.2)  # planes must be C H W
except Exception as e:
    print("caught", type(e).__name__)
"""


def test_shape_violation_is_caught_under_the_hook():
    r = subprocess.run([sys.executable, "-c", SNIPPET.format(custom=os.path.join(ROOT, "custom"))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "caught TypeCheckError" in r.stdout or "caught BeartypeCallHintParamViolation" in r.stdout, r.stdout


def test_tiny_coarse_trains_with_typecheck(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), "--config",
                        os.path.join(ROOT, "configs", "tiny", "coarse.yaml"), "--train", "--typecheck",
                        f"exp_root_dir={tmp_path}", "use_timestamp=false", "trainer.max_steps=3",
                        "trainer.val_check_interval=3", "after_train=[test]", "data.n_test_views=2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "tiny-coarse" / "synthetic" / "save" / "test" / "turntable.mp4").is_file()
