"""Base system: a LightningModule built from a strict Config. What every system shares lives here:

* the device, resolved once (:attr:`BaseSystem.run_device`: ``device: auto`` = CUDA when available,
  else the CPU) -- where pretrained models are loaded;
* building the parts the subclass's Config declares: ``<part>_type`` + ``<part>`` fields
  (:meth:`BaseSystem.build_part`, :meth:`BaseSystem.build_parts` for geometry / material / background
  / renderer), the ``guidance`` terms (:meth:`BaseSystem.build_guidance`, kept in a plain dict so
  pretrained models stay out of checkpoints) and the registered ``loss`` terms
  (:meth:`BaseSystem.build_losses`), each a dict of ``{name: {type, weight, ...}}`` summed as
  ``weight * term`` by :func:`it3d.losses.weighted_terms` (a term whose weight is 0 is never computed;
  one whose weight is the constant 0 is not even built);
* one log-key scheme (:meth:`BaseSystem.log_terms`): ``train/<term>`` for every term's unweighted value,
  ``train/<term>/<key>`` for a term's extras, ``train/loss`` for the weighted sum;
* the step: :attr:`BaseSystem.true_global_step` is the trainer's step in a fit, else
  :attr:`BaseSystem.resumed_step` (the loaded checkpoint's step, or what :meth:`BaseSystem.set_step` set);
* saving helpers, step updates for every Updateable child, the optimizer from config."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
import torch

from ..core import io, registry
from ..core.base import Configurable, Updateable, build
from ..core.config import C, ConfigError, parse_structured, split_term, validate_dataclass
from ..core.errors import It3dError
from ..core.typing import Tensor


# 8-bit optimiser states (bitsandbytes, CPU and CUDA): the states of tensors with >= 4096 elements are kept
# blockwise-quantised in 8 bits (2 bytes per parameter instead of 8 for Adam's two moments)
EIGHT_BIT = {"AdamW8bit": "AdamW8bit", "Adam8bit": "Adam8bit"}


def optimizer_class(name: str):
    """``system.optimizer.name`` -> the class: a ``torch.optim`` name, or AdamW8bit / Adam8bit (bitsandbytes)."""
    if hasattr(torch.optim, name):
        return getattr(torch.optim, name)
    if name in EIGHT_BIT:
        try:
            import bitsandbytes
        except ImportError as e:
            raise ConfigError(f"system.optimizer.name: {name} needs bitsandbytes ({e}); pip install -r requirements.txt") \
                from None
        return getattr(bitsandbytes.optim, EIGHT_BIT[name])
    known = dir(torch.optim) + list(EIGHT_BIT)
    raise ConfigError(f"system.optimizer.name: unknown optimizer '{name}'{registry.suggest(name, known)}")


def resolve_device(name: Optional[str]) -> torch.device:
    """``system.device`` -> a device: ``auto`` (or empty) = CUDA when available, else the CPU."""
    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# the parts a system may declare (``<part>_type`` + ``<part>`` in its Config), in the order they are built;
# the renderer is given the others that were built
PARTS = ("geometry", "material", "background", "renderer")


class BaseSystem(pl.LightningModule, Configurable, Updateable):
    @dataclass
    class Config:
        weights: Optional[str] = None  # load only model weights from this checkpoint
        weights_ignore_modules: List[str] = field(default_factory=list)
        optimizer: dict = field(default_factory=lambda: {"name": "Adam", "args": {"lr": 1e-3}})
        scheduler: Optional[dict] = None
        device: str = "auto"  # filled by launch from --gpu; components read it for model loading

    def __init__(self, cfg: Any = None, resumed: bool = False, save_dir: Optional[str] = None, path: str = "system",
                 **kwargs) -> None:
        super().__init__()
        self.cfg = parse_structured(self.Config, cfg, path)
        self._save_dir = save_dir
        self.resumed = resumed  # built to continue a checkpoint (resume, load_stage): don't initialise from scratch
        self.resumed_step = 0  # the step outside a fit: the loaded checkpoint's global_step (set_step)
        self.configure(**kwargs)
        if self.cfg.weights is not None and not resumed:
            self.load_weights(self.cfg.weights, self.cfg.weights_ignore_modules)

    @classmethod
    def validate_config(cls, cfg: Any, path: str) -> Any:
        return validate_dataclass(cls.Config, cfg, path)

    def configure(self, **kwargs) -> None:
        pass

    # ------------------------------------------------------------------ device / parts
    @property
    def run_device(self) -> torch.device:
        """Where the system runs and its pretrained models load (``system.device``; ``auto``: CUDA if available)."""
        return resolve_device(self.cfg.device)

    def declares(self, part: str) -> bool:
        """Whether the Config has a ``<part>_type`` field (a system without a renderer has none)."""
        return hasattr(self.cfg, f"{part}_type")

    def build_part(self, kind: str, part: str, **kwargs) -> Any:
        """The registered ``kind`` named by ``cfg.<part>_type``, configured by ``cfg.<part>`` (``system.<part>``)."""
        return build(kind, getattr(self.cfg, f"{part}_type"), getattr(self.cfg, part), path=f"system.{part}", **kwargs)

    def build_parts(self) -> Dict[str, Any]:
        """Geometry, material, background and renderer -- those the Config declares, in that order, set as
        attributes of the same names; the renderer is built with the others (``geometry=``, ...)."""
        parts: Dict[str, Any] = {}
        for part in PARTS:
            if self.declares(part):
                parts[part] = self.build_part(part, part, **(parts if part == "renderer" else {}))
                setattr(self, part, parts[part])
        return parts

    def build_guidance(self, enabled: bool = True) -> None:
        """``self.guidance`` (name -> module, a plain dict: frozen pretrained models stay out of the module tree
        and the checkpoints) and ``self.guidance_weights`` from ``cfg.guidance``, loaded on :attr:`run_device`;
        ``enabled=False`` (rendering / export only): none."""
        mods, self.guidance_weights = self.build_terms("guidance", self.cfg.guidance if enabled else {},
                                                       "system.guidance", device=self.run_device)
        self.__dict__["guidance"] = dict(mods)

    def build_losses(self, **kwargs) -> None:
        """``self.losses`` (a ModuleDict of registered ``loss`` terms) and ``self.loss_weights`` from ``cfg.loss``;
        ``kwargs`` go to every term (``geometry=``)."""
        self.losses, self.loss_weights = self.build_terms("loss", self.cfg.loss, "system.loss", **kwargs)

    # ------------------------------------------------------------------ weights / step
    def load_weights(self, path: str, ignore_modules: Optional[List[str]] = None) -> None:
        if not os.path.isfile(path):
            raise It3dError(f"system.weights: checkpoint not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=False)
        state = state.get("state_dict", state)
        ignore = tuple(m + "." for m in (ignore_modules or []))
        state = {k: v for k, v in state.items() if not k.startswith(ignore)}
        self.load_state_dict(state, strict=False)
        self.do_update_step(0, 0, on_load_weights=True)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.do_update_step(self.current_epoch, self.global_step)

    def on_validation_batch_start(self, batch, batch_idx, dataloader_idx=0) -> None:
        self.do_update_step(self.current_epoch, self.global_step)

    def on_test_batch_start(self, batch, batch_idx, dataloader_idx=0) -> None:
        self.do_update_step(self.current_epoch, self.global_step)

    def on_predict_batch_start(self, batch, batch_idx, dataloader_idx=0) -> None:
        self.do_update_step(self.current_epoch, self.global_step)

    def device_scalar(self, value: Any) -> Tensor:
        """A value to ``self.log``, as a tensor on the module's device: Lightning turns a Python number into
        one with ``torch.tensor(v, device=...)`` (a blocking upload per call on CUDA); ``torch.full`` is a
        kernel launch with the number as its argument."""
        if torch.is_tensor(value):
            return value.detach()
        return torch.full((), float(value), device=self.device)

    def log_terms(self, values: Dict[str, Any], total: Optional[Any] = None) -> None:
        """A training step's logs in the key scheme every system shares: ``train/<term>`` (a term's unweighted
        value), ``train/<term>/<key>`` (a term's extras), then ``train/loss`` (the weighted sum, on the progress
        bar). Values stay device tensors (:meth:`device_scalar`: no host sync)."""
        for key, value in values.items():
            self.log(f"train/{key}", self.device_scalar(value), batch_size=1)
        if total is not None:
            self.log("train/loss", self.device_scalar(total), prog_bar=True, batch_size=1)

    def C(self, value: Any) -> float:
        return C(value, self.true_global_step)

    @property
    def true_global_step(self) -> int:
        """The trainer's global step during a fit / validate / test / predict, else :attr:`resumed_step`."""
        try:
            return int(self.trainer.global_step)
        except RuntimeError:
            return int(self.resumed_step)

    def set_step(self, step: int) -> None:
        """The step schedules are read at outside a trainer (a stage loaded from its checkpoint, a test)."""
        self.resumed_step = int(step)

    # ------------------------------------------------------------------ optimizer
    def optimizer_defaults(self, optimizer_cls) -> Dict[str, Any]:
        """Arguments the system gives ``optimizer_cls`` unless ``system.optimizer.args`` sets them."""
        return {}

    def optimizer_groups(self, params: List[Tensor], optimizer_cls, args: Dict[str, Any]) -> list:
        """The trained tensors (no ``system.optimizer.params`` groups given) as ``optimizer_cls`` gets them:
        one group by default."""
        return params

    def configure_optimizers(self):
        ocfg = dict(self.cfg.optimizer)
        name = ocfg.get("name", "Adam")
        optimizer_cls = optimizer_class(name)
        given = dict(ocfg.get("args", {}))
        defaults = self.optimizer_defaults(optimizer_cls)
        if given.get("fused"):  # torch refuses fused with foreach: a fused optimizer asked for drops that default
            defaults.pop("foreach", None)
        args = {**defaults, **given}
        groups = ocfg.get("params")
        if groups:
            params = []
            for mod_name, gargs in groups.items():
                mod = self
                for part in mod_name.split("."):
                    if not hasattr(mod, part):
                        raise ConfigError(f"system.optimizer.params.{mod_name}: the system has no module '{mod_name}'")
                    mod = getattr(mod, part)
                ps = [p for p in (mod.parameters() if isinstance(mod, torch.nn.Module) else [mod]) if p.requires_grad]
                if ps:
                    params.append({"params": ps, **dict(gargs or {})})
        else:
            params = self.optimizer_groups([p for p in self.parameters() if p.requires_grad], optimizer_cls, args)
        opt = optimizer_cls(params, **args)
        if not self.cfg.scheduler:
            return opt
        scfg = dict(self.cfg.scheduler)
        sname = scfg.get("name")
        sargs = dict(scfg.get("args", {}))
        if sname == "decay":  # lr * factor ** min(step / steps, 1) (the official Make-It-3D refine schedule)
            factor, steps = float(sargs.pop("factor", 0.1)), float(sargs.pop("steps", 1000))
            if sargs or steps <= 0:
                raise ConfigError(f"system.scheduler: 'decay' takes args factor and steps > 0, got {dict(scfg.get('args'))}")
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: factor ** min(it / steps, 1.0))
        elif hasattr(torch.optim.lr_scheduler, str(sname)):
            sched = getattr(torch.optim.lr_scheduler, sname)(opt, **sargs)
        else:
            raise ConfigError(f"system.scheduler.name: unknown scheduler '{sname}' (decay, or a torch.optim.lr_scheduler "
                              f"class){registry.suggest(str(sname), dir(torch.optim.lr_scheduler))}")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": scfg.get("interval", "step")}}

    # ------------------------------------------------------------------ saving
    @property
    def save_dir(self) -> str:
        if self._save_dir is None:
            raise It3dError("the system has no save dir (launch.py sets it to <trial_dir>/save)")
        return self._save_dir

    def get_save_path(self, filename: str) -> str:
        path = os.path.join(self.save_dir, filename)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def save_image(self, filename: str, img, **kw) -> str:
        return io.save_image(self.get_save_path(filename), img, **kw)

    def save_image_grid(self, filename: str, items) -> str:
        return io.save_image_grid(self.get_save_path(filename), items)

    def save_video(self, filename: str, frames, fps: int = 30) -> str:
        return io.save_video(self.get_save_path(filename), frames, fps=fps)

    # ------------------------------------------------------------------ terms
    def build_terms(self, kind: str, entries: Any, path: str, **kwargs) -> Any:
        """Instantiate a named dict of ``{type, weight, ...}`` entries; returns name -> (module, weight)."""
        modules = torch.nn.ModuleDict()
        weights = {}
        for name, entry in (entries or {}).items():
            if entry is None:  # `name: null` removes an inherited entry
                continue
            type_name, weight, rest = split_term(name, entry, path)
            if isinstance(weight, (int, float)) and not isinstance(weight, bool) and float(weight) == 0.0:
                continue  # a constant-zero term is never computed: don't build it (nor load its models)
            cls = registry.get(kind, type_name)
            modules[name] = cls(rest, path=f"{path}.{name}", **kwargs)
            weights[name] = weight
        return modules, weights


registry.declare_base("system", BaseSystem)
