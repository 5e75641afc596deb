import os

import pytest
import torch

from it3d.core import hub
from it3d.core.hub import HubError


class TinyNet(torch.nn.Module):
    """Stands in for a diffusers/transformers class: from_pretrained(dir) loads a state dict."""

    loads = 0

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    @classmethod
    def from_pretrained(cls, path, subfolder=None, **kw):
        if kw.get("local_files_only") or not os.path.isdir(path):
            raise OSError(f"{path} not found")
        cls.loads += 1
        m = cls()
        m.load_state_dict(torch.load(os.path.join(path, subfolder or "", "w.pt")))
        return m


def test_local_dir_loads_once_and_is_shared(tmp_path):
    os.makedirs(tmp_path / "unet")
    torch.save(TinyNet().state_dict(), tmp_path / "unet" / "w.pt")
    hub.clear_cache()
    a = hub.load(TinyNet, str(tmp_path), subfolder="unet")
    b = hub.load(TinyNet, str(tmp_path), subfolder="unet")
    assert a is b and TinyNet.loads == 1
    assert not any(p.requires_grad for p in a.parameters())


def test_offline_missing_model_fails_fast_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as e:
        hub.load(TinyNet, "someone/not-a-real-model", config_key="system.guidance.sd.pretrained_model_name_or_path")
    msg = str(e.value)
    assert "\n" not in msg
    assert "someone/not-a-real-model" in msg and "HF_HUB_OFFLINE" in msg
    assert "system.guidance.sd.pretrained_model_name_or_path=<local dir>" in msg


def test_model_root_env(tmp_path, monkeypatch):
    d = tmp_path / "org" / "model"
    os.makedirs(d)
    torch.save(TinyNet().state_dict(), d / "w.pt")
    monkeypatch.setenv("IT3D_MODEL_ROOT", str(tmp_path))
    assert isinstance(hub.load(TinyNet, "org/model", cache=False), TinyNet)


def test_dtype_resolution():
    assert hub.resolve_dtype("auto", "cpu") == torch.float32
    assert hub.resolve_dtype("auto", "cuda") == torch.float16
    assert hub.resolve_dtype("fp16", "cpu") == torch.float32  # no fp16 kernels on CPU
    assert hub.resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(HubError, match="unknown dtype"):
        hub.resolve_dtype("fp8", "cpu")
