"""Load pretrained components once per process, by hub id or local directory.

``load(UNet2DConditionModel, "stabilityai/stable-diffusion-2-base", subfolder="unet")``

Resolution order for ``id_or_path``:
1. an existing local directory (a diffusers / transformers ``save_pretrained`` folder);
2. ``$IT3D_MODEL_ROOT/<id>`` when that directory exists;
3. the Hugging Face cache (``local_files_only=True``);
4. the hub itself, only when it answers within a few seconds and ``HF_HUB_OFFLINE`` is unset.

When none works, :class:`HubError` says in one line which model is missing and how to
provide it. Loaded objects are cached per (class, path, subfolder, dtype, device), so
two guidance terms naming one model share one UNet.
"""
from __future__ import annotations

import os
import socket
import threading
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlparse

import torch

from .errors import It3dError

_cache: Dict[Tuple, Any] = {}
_lock = threading.RLock()
_reachable: Optional[bool] = None


class HubError(It3dError, RuntimeError):
    pass


DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def resolve_dtype(name: Any, device: Any) -> torch.dtype:
    """``auto`` -> fp16 on CUDA, fp32 elsewhere; half precision on CPU falls back to fp32."""
    if isinstance(name, torch.dtype):
        dtype = name
    elif name in (None, "auto"):
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    elif name in DTYPES:
        dtype = DTYPES[name]
    else:
        raise HubError(f"unknown dtype '{name}' (use auto, fp32, fp16 or bf16)")
    if torch.device(device).type == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    return dtype


def hub_reachable(timeout: float = 3.0) -> bool:
    global _reachable
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    if _reachable is None:
        try:
            from huggingface_hub import constants

            endpoint = urlparse(constants.ENDPOINT)
            host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
            with socket.create_connection((host, port), timeout=timeout):
                _reachable = True
        except OSError:
            _reachable = False
    return _reachable


def local_dir(id_or_path: str) -> Optional[str]:
    if os.path.isdir(id_or_path):
        return os.path.abspath(id_or_path)
    root = os.environ.get("IT3D_MODEL_ROOT")
    if root and os.path.isdir(os.path.join(root, id_or_path)):
        return os.path.abspath(os.path.join(root, id_or_path))
    return None


def _missing(cls_name: str, id_or_path: str, subfolder: Optional[str], why: str, config_key: Optional[str]) -> HubError:
    what = f"{id_or_path}" + (f" [{subfolder}]" if subfolder else "")
    key = f"set {config_key}=<local dir>" if config_key else "pass a local directory instead of the hub id"
    return HubError(
        f"model '{what}' ({cls_name}) is not available: {why}. Download it on a machine with internet "
        f"(huggingface-cli download {id_or_path}) into the HF cache, or {key}, or put it under $IT3D_MODEL_ROOT/{id_or_path}"
    )


def load(cls: Any, id_or_path: str, subfolder: Optional[str] = None, dtype: Any = None, device: Any = "cpu",
         config_key: Optional[str] = None, cache: bool = True, **kwargs) -> Any:
    """``cls.from_pretrained`` with offline-safe resolution and per-process caching."""
    if not id_or_path:
        raise HubError(f"no model given for {getattr(cls, '__name__', cls)}" + (f" ({config_key})" if config_key else ""))
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device) if dtype is not None else None
    key = (getattr(cls, "__qualname__", str(cls)), str(local_dir(id_or_path) or id_or_path), subfolder,
           str(torch_dtype), str(device), tuple(sorted((k, str(v)) for k, v in kwargs.items())))
    with _lock:
        if cache and key in _cache:
            return _cache[key]
        obj = _load_uncached(cls, id_or_path, subfolder, torch_dtype, config_key, **kwargs)
        if hasattr(obj, "to") and isinstance(obj, torch.nn.Module):
            obj = obj.to(device)
            obj.eval()
            obj.requires_grad_(False)
        if cache:
            _cache[key] = obj
        return obj


def _load_uncached(cls, id_or_path, subfolder, torch_dtype, config_key, **kwargs):
    name = getattr(cls, "__name__", str(cls))
    kw = dict(kwargs)
    if subfolder:
        kw["subfolder"] = subfolder
    if torch_dtype is not None and _accepts_dtype(cls):
        # transformers 5 and diffusers models take `dtype`; diffusers pipelines still `torch_dtype`
        pipeline = getattr(cls, "__module__", "").startswith("diffusers") and cls.__name__.endswith("Pipeline")
        kw["torch_dtype" if pipeline else "dtype"] = torch_dtype
    path = local_dir(id_or_path)
    if path is not None:
        try:
            return cls.from_pretrained(path, **kw)
        except (OSError, ValueError, EnvironmentError) as e:
            raise HubError(f"cannot load {name} from {path}" + (f" [{subfolder}]" if subfolder else "")
                           + f": {str(e).splitlines()[0]}") from None
    if os.sep in id_or_path and id_or_path.count("/") > 1 or id_or_path.startswith((".", "/", "~")):
        raise _missing(name, id_or_path, subfolder, "no such local directory", config_key)
    try:
        return cls.from_pretrained(id_or_path, local_files_only=True, **kw)
    except (OSError, ValueError, EnvironmentError):
        pass
    if not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") else \
            "it is not in the local Hugging Face cache and the hub cannot be reached"
        raise _missing(name, id_or_path, subfolder, why, config_key)
    try:
        return cls.from_pretrained(id_or_path, **kw)
    except Exception as e:  # network or repo errors
        raise _missing(name, id_or_path, subfolder, str(e).splitlines()[0], config_key) from None


def _accepts_dtype(cls) -> bool:
    mod = getattr(cls, "__module__", "")
    return mod.startswith(("diffusers", "transformers")) and not any(
        s in getattr(cls, "__name__", "") for s in ("Tokenizer", "Processor", "Scheduler", "FeatureExtractor"))


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def cached_count() -> int:
    return len(_cache)
