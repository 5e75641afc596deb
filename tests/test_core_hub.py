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
    TinyNet.loads = 0  # other tests of this module load it too
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
    # each remedy works as written: huggingface_hub 2.x installs `hf`, the key is the full dotted path
    assert "`hf download someone/not-a-real-model`" in msg and "huggingface-cli" not in msg
    assert "system.guidance.sd.pretrained_model_name_or_path=/path/to/local/dir" in msg
    assert "$IT3D_MODEL_ROOT/someone/not-a-real-model" in msg


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


def test_precision_switch_governs_auto(monkeypatch):
    monkeypatch.setattr(hub, "_precision", "auto")
    hub.set_precision("bf16")
    assert hub.resolve_dtype("auto", "cpu") == torch.bfloat16 and hub.resolve_dtype(None, "cuda") == torch.bfloat16
    assert hub.resolve_dtype("fp32", "cpu") == torch.float32  # an explicit dtype still wins
    assert hub.autocast_dtype("cpu") == torch.bfloat16
    hub.set_precision("fp16")
    assert hub.resolve_dtype("auto", "cuda") == torch.float16 and hub.resolve_dtype("auto", "cpu") == torch.float32
    hub.set_precision("auto")
    assert hub.resolve_dtype("auto", "cpu") == torch.float32 and hub.autocast_dtype("cpu") is None
    assert hub.autocast_dtype("cuda") == torch.float16
    with pytest.raises(HubError, match="precision"):
        hub.set_precision("half")


def test_weights_left_on_meta_are_refused(tmp_path):
    """A layout whose weight names differ from the class's must not load silently (weights on meta)."""
    from diffusers import ModelMixin

    from it3d.guidance.zero123 import CCProjection, CLIPCameraProjection

    CLIPCameraProjection(embedding_dim=8, additional_embeddings=4).save_pretrained(tmp_path / "p")
    cfg = tmp_path / "p" / "config.json"
    cfg.write_text('{"_class_name": "CCProjection", "in_channel": 12, "out_channel": 8}')
    # diffusers itself only warns and leaves projection.* on the meta device
    with pytest.raises(HubError, match=r"2 weights were not in its files \(e.g. 'projection.weight'\)"):
        hub.load(CCProjection, str(tmp_path / "p"), dtype="fp32", cache=False)
    assert issubclass(CCProjection, ModelMixin)


def test_locate_without_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("IT3D_MODEL_ROOT", str(tmp_path / "root"))
    os.makedirs(tmp_path / "root" / "org" / "there")
    assert hub.locate(str(tmp_path)) == ("local", str(tmp_path))
    assert hub.locate("org/there") == ("model-root", str(tmp_path / "root" / "org" / "there"))
    assert hub.locate("org/absent") == ("missing", None)
    assert hub.locate("/no/such/dir") == ("missing", None)
    # an HF-cache snapshot (the layout `hf download` writes) is found offline
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    snap = tmp_path / "cache" / "models--org--cached" / "snapshots" / ("a" * 40)
    os.makedirs(snap)
    (snap / "model_index.json").write_text("{}")
    os.makedirs(tmp_path / "cache" / "models--org--cached" / "refs")
    (tmp_path / "cache" / "models--org--cached" / "refs" / "main").write_text("a" * 40)
    status, path = hub.locate("org/cached")
    assert status == "cache" and os.path.samefile(path, snap)


def test_pipelines_are_moved_to_the_device_and_frozen(tmp_path):
    """text-to-image / img2img load diffusers pipelines: hub.load moves them to the run's device (a pipeline is
    not an nn.Module, so `.to` must be called on it) and freezes their models."""

    class FakePipeline:
        moved_to = None

        def __init__(self):
            self.unet = torch.nn.Linear(2, 2)

        @property
        def components(self):
            return {"unet": self.unet, "scheduler": object()}

        def to(self, device):
            FakePipeline.moved_to = torch.device(device)
            return self

        @classmethod
        def from_pretrained(cls, path, **kw):
            return cls()

    pipe = hub.load(FakePipeline, str(tmp_path), device="meta", cache=False)
    assert FakePipeline.moved_to == torch.device("meta")
    assert not pipe.unet.training and not any(p.requires_grad for p in pipe.unet.parameters())
