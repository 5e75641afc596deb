"""Shared test fixtures."""
import contextlib
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never touches the network
# Without CUDA, Triton kernels (the hash-grid backend) run in Triton's CPU interpreter; Triton reads
# this when it is first imported, before any test module loads
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relpath: str, name: str):
    """A script of the repo that is not a package module (a benchmark, the GPU check), imported by its path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def registered(kind, name, cls):
    """``cls`` registered as ``name`` of ``kind`` for the block (a test-only component), unregistered after."""
    from it3d.core import registry

    registry.register(name, kind=kind)(cls)
    try:
        yield cls
    finally:
        registry.unregister(kind, name)


@pytest.fixture(autouse=True)
def _run_precision_restored():
    """A run's ``precision`` is process-wide (``hub.set_precision``, set by every in-process stage): a bf16
    run must not leave later tests' ``dtype: auto`` models in bf16."""
    from it3d.core import hub

    before = hub.get_precision()
    yield
    hub.set_precision(before)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and tiny tensors: a second intra-op thread only adds synchronisation cost."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hand_converted_zero123(dst):
    """The kxic/zero123-xl (``cc_projection``) fixture, re-laid out *by hand* -- plain file edits, none of
    it3d's builders -- as bennyguo/zero123-xl-diffusers' ``clip_camera_projection`` folder: folder renamed,
    weights re-keyed ``projection.*`` -> ``proj.*`` into fp16 safetensors, config.json and the
    model_index.json entry rewritten as the published ones read. Returns ``dst``."""
    import json
    import shutil

    from safetensors.torch import save_file

    from it3d.testing import tiny_model_dir

    shutil.copytree(tiny_model_dir("zero123-cc"), dst)
    sub = os.path.join(dst, "clip_camera_projection")
    os.rename(os.path.join(dst, "cc_projection"), sub)
    state = torch.load(os.path.join(sub, "diffusion_pytorch_model.bin"), weights_only=True)
    os.remove(os.path.join(sub, "diffusion_pytorch_model.bin"))
    save_file({"proj.weight": state["projection.weight"].half().contiguous(),
               "proj.bias": state["projection.bias"].half().contiguous()},
              os.path.join(sub, "diffusion_pytorch_model.safetensors"))
    out_dim, in_dim = state["projection.weight"].shape
    with open(os.path.join(sub, "config.json"), "w") as f:
        json.dump({"_class_name": "CLIPCameraProjection", "_diffusers_version": "0.22.2",
                   "additional_embeddings": int(in_dim - out_dim), "embedding_dim": int(out_dim)}, f)
    with open(os.path.join(dst, "model_index.json")) as f:
        index = json.load(f)
    del index["cc_projection"]
    index.update(_class_name="Zero123Pipeline", clip_camera_projection=["zero123", "CLIPCameraProjection"])
    with open(os.path.join(dst, "model_index.json"), "w") as f:
        json.dump(index, f)
    return str(dst)


def rgb_photo(path):
    """The synthetic scene's photo (load/synthetic/rgba.png) composited on white, without alpha and without
    sibling maps: every preprocessing estimator must run on it."""
    import numpy as np
    from PIL import Image

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rgba = np.asarray(Image.open(os.path.join(root, "load", "synthetic", "rgba.png"))).astype(np.float32) / 255.0
    rgb = rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])
    Image.fromarray((rgb * 255 + 0.5).astype(np.uint8)).save(path)
    return str(path)
