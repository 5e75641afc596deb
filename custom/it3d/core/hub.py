"""Load pretrained components once per process, by hub id or local directory; one precision switch.

``load(UNet2DConditionModel, "stabilityai/stable-diffusion-2-base", subfolder="unet")``

Resolution order for ``id_or_path``:
1. an existing local directory (a diffusers / transformers ``save_pretrained`` folder);
2. ``$IT3D_MODEL_ROOT/<id>`` when that directory exists;
3. the Hugging Face cache (``local_files_only=True``);
4. the hub itself, only when it answers within a few seconds and ``HF_HUB_OFFLINE`` is unset.

When none works, :class:`HubError` says in one line which model is missing and how to
provide it. Loaded objects are cached per (class, path, subfolder, dtype, device), so
two guidance terms naming one model share one UNet; :func:`cached_models` says what the cache
holds, :func:`free_memory` empties it between stages.

Precision: :func:`set_precision` (the run's top-level ``precision: auto|fp32|fp16|bf16``) is what
every ``dtype: auto`` of a component resolves to (``auto``: fp16 on CUDA, fp32 on CPU). Models are
loaded in that dtype, moved to their device (pipelines too) and frozen; a model whose weights did
not all load (a layout whose weight names differ from the class's) is refused, never left on the
meta device. :func:`locate` says where a model would come from without loading it (pre-flight).
"""
from __future__ import annotations

import os
import socket
import threading
from typing import Any, Dict, List, Optional, Tuple
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


PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_precision = "auto"


def set_precision(name: Any) -> None:
    """The run's precision: what every ``dtype: auto`` resolves to (``auto``: fp16 on CUDA, fp32 on CPU)."""
    global _precision
    name = "auto" if name in (None, "") else str(name)
    if name not in PRECISIONS and name not in DTYPES:
        raise HubError(f"precision: unknown value '{name}' (use {', '.join(PRECISIONS)})")
    _precision = name


def get_precision() -> str:
    return _precision


def resolve_dtype(name: Any, device: Any) -> torch.dtype:
    """``auto`` -> the run's precision (:func:`set_precision`; its own ``auto`` is fp16 on CUDA, fp32
    elsewhere); fp16 on CPU falls back to fp32 (CPU has few fp16 kernels; use bf16 there)."""
    if name in (None, "auto"):
        name = _precision
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


def autocast_dtype(device: Any) -> Optional[torch.dtype]:
    """The half dtype that mixed-precision training through the run's frozen models uses, or None (fp32)."""
    dtype = resolve_dtype("auto", device)
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


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


def remedy(id_or_path: str, config_key: Optional[str]) -> str:
    """How to provide a missing model, as commands that work as written."""
    key = f"{config_key}=/path/to/local/dir" if config_key else "a local directory instead of the hub id"
    if _looks_local(id_or_path):
        return f"create that folder (a diffusers/transformers save_pretrained layout) or set {key}"
    return (f"`hf download {id_or_path}` on a machine with internet (then copy its HF cache), "
            f"or set {key}, or put it under $IT3D_MODEL_ROOT/{id_or_path}")


def _looks_local(id_or_path: str) -> bool:
    return (os.sep in id_or_path and id_or_path.count("/") > 1) or id_or_path.startswith((".", "/", "~"))


def _missing(cls_name: str, id_or_path: str, subfolder: Optional[str], why: str, config_key: Optional[str]) -> HubError:
    what = f"{id_or_path}" + (f" [{subfolder}]" if subfolder else "")
    return HubError(f"model '{what}' ({cls_name}) is not available: {why}. Provide it: {remedy(id_or_path, config_key)}")


def load(cls: Any, id_or_path: str, subfolder: Optional[str] = None, dtype: Any = None, device: Any = "cpu",
         config_key: Optional[str] = None, cache: bool = True, **kwargs) -> Any:
    """``cls.from_pretrained`` with offline-safe resolution and per-process caching.

    Models (and pipelines) come back in ``dtype`` (``auto``: the run's precision) on ``device``,
    in eval mode with gradients off.
    """
    if not id_or_path:
        raise HubError(f"no model given for {getattr(cls, '__name__', cls)}" + (f" ({config_key})" if config_key else ""))
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device) if dtype is not None or _accepts_dtype(cls) else None
    key = (getattr(cls, "__qualname__", str(cls)), str(local_dir(id_or_path) or id_or_path), subfolder,
           str(torch_dtype), str(device), tuple(sorted((k, str(v)) for k, v in kwargs.items())))
    with _lock:
        if cache and key in _cache:
            return _cache[key]
        obj = _load_uncached(cls, id_or_path, subfolder, torch_dtype, config_key, **kwargs)
        _check_loaded(obj, cls, id_or_path, subfolder)
        if isinstance(obj, torch.nn.Module):
            obj = obj.to(device)
            obj.eval()
            obj.requires_grad_(False)
            _record_dtypes(obj, id_or_path, subfolder)
        elif _is_pipeline(obj):
            obj.to(device)
            for name, comp in obj.components.items():
                if isinstance(comp, torch.nn.Module):
                    comp.eval()
                    comp.requires_grad_(False)
                    _record_dtypes(comp, id_or_path, name)
        if cache:
            _cache[key] = obj
        return obj


def _is_pipeline(obj: Any) -> bool:
    return hasattr(obj, "components") and hasattr(obj, "to") and not isinstance(obj, torch.nn.Module)


def _check_loaded(obj: Any, cls: Any, id_or_path: str, subfolder: Optional[str]) -> None:
    """Refuse a model some of whose weights were never loaded (left on the meta device)."""
    modules = [obj] if isinstance(obj, torch.nn.Module) else \
        [m for m in getattr(obj, "components", {}).values() if isinstance(m, torch.nn.Module)]
    for m in modules:
        meta = [n for n, p in list(m.named_parameters()) + list(m.named_buffers()) if p.is_meta]
        if meta:
            what = id_or_path + (f" [{subfolder}]" if subfolder else "")
            raise HubError(f"model '{what}' ({getattr(cls, '__name__', cls)}): {len(meta)} weights were not in its "
                           f"files (e.g. '{meta[0]}'): the folder's layout does not match the class that loads it")


def _load_uncached(cls, id_or_path, subfolder, torch_dtype, config_key, **kwargs):
    name = getattr(cls, "__name__", str(cls))
    kw = dict(kwargs)
    if subfolder:
        kw["subfolder"] = subfolder
    if torch_dtype is not None and _accepts_dtype(cls):
        kw["dtype"] = torch_dtype  # transformers 5, diffusers models and pipelines (torch_dtype is deprecated)
    path = local_dir(id_or_path)
    if path is not None:
        try:
            with _quiet_loading():
                return cls.from_pretrained(path, **kw)
        except (OSError, ValueError, EnvironmentError) as e:
            raise HubError(f"cannot load {name} from {path}" + (f" [{subfolder}]" if subfolder else "")
                           + f": {str(e).splitlines()[0]}") from None
    if _looks_local(id_or_path):
        raise _missing(name, id_or_path, subfolder, "no such local directory", config_key)
    try:
        with _quiet_loading():
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
    """Classes whose ``from_pretrained`` takes a dtype: diffusers models and pipelines, transformers models
    (also our own ``ModelMixin`` subclasses, e.g. Zero-1-to-3's camera projection)."""
    if not isinstance(cls, type):
        return False
    if getattr(cls, "__module__", "").startswith("transformers") and cls.__name__.startswith("AutoModel"):
        return True  # transformers' Auto* model factories (not subclasses of PreTrainedModel)
    bases = []
    try:
        from diffusers import DiffusionPipeline, ModelMixin

        bases += [DiffusionPipeline, ModelMixin]
    except ImportError:  # pragma: no cover
        pass
    try:
        from transformers import PreTrainedModel

        bases.append(PreTrainedModel)
    except ImportError:  # pragma: no cover
        pass
    return any(issubclass(cls, b) for b in bases)


class _quiet_loading:
    """Hide diffusers' "Loading pipeline components" bar and load chatter (shown with --verbose)."""

    def __enter__(self):
        self.levels = []
        if logging_verbose():
            return self
        for mod in ("diffusers", "transformers"):
            try:
                lib = __import__(f"{mod}.utils", fromlist=["logging"]).logging
                self.levels.append((lib, lib.get_verbosity()))
                lib.set_verbosity_error()
                if hasattr(lib, "disable_progress_bar"):
                    lib.disable_progress_bar()
            except ImportError:  # pragma: no cover
                pass
        return self

    def __exit__(self, *exc):
        for lib, level in self.levels:
            lib.set_verbosity(level)
        return False


def logging_verbose() -> bool:
    import logging

    return logging.getLogger("it3d").isEnabledFor(logging.DEBUG)


# ----------------------------------------------------------------------------- dtype log (tests, GPU check)
DTYPE_LOG_ENV = "IT3D_DTYPE_LOG"


def _record_dtypes(module: torch.nn.Module, id_or_path: str, subfolder: Optional[str]) -> None:
    """With ``$IT3D_DTYPE_LOG`` set, append one JSON line per model (and per direct child module, since
    ``vae.encode`` / ``generate`` never call the top module's forward) at its first call: the model, the
    dtype of its weights, of its first floating input, and the autocast dtype in force (or null)."""
    path = os.environ.get(DTYPE_LOG_ENV)
    if not path or getattr(module, "_it3d_dtype_hooks", None):
        return
    import json

    hooks = []

    def make_hook(part: str):
        def hook(mod, args, kwargs):
            inputs = [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a) and a.is_floating_point()]
            param = next(mod.parameters(), None)
            dev = param.device.type if param is not None else "cpu"
            rec = {"model": str(id_or_path), "subfolder": subfolder or "", "part": part, "class": type(mod).__name__,
                   "param_dtype": str(param.dtype).replace("torch.", "") if param is not None else None,
                   "input_dtype": str(inputs[0].dtype).replace("torch.", "") if inputs else None,
                   "autocast": str(torch.get_autocast_dtype(dev)).replace("torch.", "")
                   if torch.is_autocast_enabled(dev) else None,
                   "device": str(param.device) if param is not None else None}
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            hooks[idx[part]].remove()
        return hook

    idx: Dict[str, int] = {}
    for part, mod in [("", module)] + [(n, m) for n, m in module.named_children() if next(m.parameters(), None) is not None]:
        idx[part] = len(hooks)
        hooks.append(mod.register_forward_pre_hook(make_hook(part), with_kwargs=True))
    module._it3d_dtype_hooks = hooks


# ----------------------------------------------------------------------------- pre-flight
def hf_cache_snapshot(repo_id: str) -> Optional[str]:
    """The local HF-cache snapshot folder of ``repo_id`` (no network), or None."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError), or a malformed id
        return None


def locate(id_or_path: str) -> Tuple[str, Optional[str]]:
    """Where a model would load from, without loading it: ``(status, path)`` with status one of
    ``local`` (a folder), ``model-root`` ($IT3D_MODEL_ROOT/<id>), ``cache`` (HF cache), ``hub`` (not here,
    but the hub answers: it will be downloaded) or ``missing``."""
    if os.path.isdir(id_or_path):
        return "local", os.path.abspath(id_or_path)
    path = local_dir(id_or_path)
    if path is not None:
        return "model-root", path
    if _looks_local(id_or_path):
        return "missing", None
    snap = hf_cache_snapshot(id_or_path)
    if snap is not None:
        return "cache", snap
    if hub_reachable():
        return "hub", None
    return "missing", None


def clear_cache() -> None:
    """Drop every cached model (the next ``load`` reads it again); frees their memory once unreferenced."""
    with _lock:
        _cache.clear()


def free_memory(device: Any = None) -> None:
    """Between stages (and once the refine point cloud is built): drop the cache, collect what no one
    references any more (Lightning's trainer and module hold reference cycles) and, on a CUDA device,
    hand the allocator's cached blocks back so the next stage starts from an empty GPU."""
    import gc

    clear_cache()
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def cached_models() -> List[str]:
    """What the cache holds, one ``"<class> <model> [<subfolder>] <dtype> <device>"`` line per loaded object
    (empty after :func:`clear_cache`): a check that models were freed can name the one that was not."""
    with _lock:
        return [f"{cls} {path}" + (f" [{sub}]" if sub else "") + f" {dtype} {device}"
                for cls, path, sub, dtype, device, _ in _cache]
