"""Refine stage (Make-It-3D sec 3.3 + B.2, Customize-It-3D sec 3.3 + A.2): a point cloud with
neural descriptors, rendered by the deferred point renderer and trained with

* the guidance terms (``guidance``: ``{name: {type, weight, ...}}``) on novel views
  (``batch["random"]``);
* the registered loss terms of ``loss`` (``{name: {type, weight, view, ...}}``, as the coarse system's;
  the stage config spells the papers' four): a reference-view L1 against the masked reference (the
  reference image composited on white, over the whole image: ``ref_rgb``, type ``ref-rgb`` with
  ``masked: false``, 1000); the colour regulariser -- mean squared distance of each descriptor's RGB
  channels to the point's initial colour -- over reference points (``color_ref``, type ``color-reg``,
  1e5) and novel points (``color_novel``, 1e3); the white-background regulariser -- L1 distance to white
  of the pixels outside the rasterizer's occupancy mask, averaged over all pixels, in the reference and
  the novel views (``white_bg``, type ``white-bg``, 1000).

A term's ``view`` says which part of the step computes it: ``ref`` terms with the reference render
(``color-reg`` reads the geometry, not the render: it is a ``ref`` term), ``random`` terms with the novel
render (only when a guidance term is on), ``any`` terms with both, averaged over the step's renders. A
term whose weight is 0 at the step is never computed. A step (manual optimisation) back-propagates the
reference part before it renders the novel view, so one 800 px render graph is alive at a time instead
of two (same gradients; Lightning's ``trainer.gradient_clip_val`` / ``accumulate_grad_batches`` do not
apply to manual optimisation).

Start-up (``fit`` without a checkpoint): the coarse stage (``coarse_stage_dir``, or
``coarse_config`` + ``coarse_ckpt``) is loaded, the builder turns it and the datamodule's
reference into the point cloud, which is saved as ``save/points_init.ply``. On resume (or with
``weights``) the point cloud comes from the checkpoint instead.

``--test`` renders the orbit to ``save/test/rgb/%04d.png`` (frame 0 = reference) and
``save/test/turntable.mp4``; ``--export`` runs the point-cloud and mesh exporters.
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from ..core import hub, io, registry
from ..core.base import ExportParts
from ..core.config import ConfigError, component, terms
from ..core.errors import It3dError
from ..core.layout import TURNTABLE
from ..core.typing import Float, Tensor
from ..losses import weighted_terms
from .base import BaseSystem

log = logging.getLogger("it3d")

# the loss keys of configs written before the refine losses became registered terms -> the entry that replaces each
LEGACY_LOSS_KEYS = {
    "lambda_ref_rgb": "ref_rgb: {type: ref-rgb, weight: <w>, masked: false}",
    "lambda_white_bg": "white_bg: {type: white-bg, weight: <w>, view: any}",
    "lambda_color_ref": "color_ref: {type: color-reg, weight: <w>, points: ref}",
    "lambda_color_novel": "color_novel: {type: color-reg, weight: <w>, points: novel}",
}


def load_coarse(stage_dir: Optional[str], config: Optional[str], ckpt: Optional[str], device: torch.device):
    """The coarse stage as ``it3d.systems.loading.load_stage`` returns it, or None when none is configured."""
    if not (stage_dir or config or ckpt):
        return None
    from . import loading

    if stage_dir:
        if not os.path.isdir(stage_dir):
            raise It3dError(f"system.coarse_stage_dir: not a directory: {stage_dir}")
        return loading.load_stage(stage_dir, device, datamodule=False)
    if config or ckpt:
        if not (config and ckpt):
            raise ConfigError("system.coarse_config and system.coarse_ckpt must be given together "
                              "(or give system.coarse_stage_dir)")
        return loading.load_stage(None, device, config_path=config, ckpt_path=ckpt, datamodule=False)


@registry.register("refine", kind="system")
class RefineSystem(BaseSystem):
    @dataclass
    class Config(BaseSystem.Config):
        coarse_stage_dir: Optional[str] = None
        coarse_config: Optional[str] = None  # with coarse_ckpt: instead of coarse_stage_dir
        coarse_ckpt: Optional[str] = None
        builder_type: str = component("builder", "depth-unprojection")
        builder: dict = field(default_factory=dict)
        geometry_type: str = component("geometry", "point-cloud")
        geometry: dict = field(default_factory=dict)
        renderer_type: str = component("renderer", "point-deferred")
        renderer: dict = field(default_factory=dict)
        guidance: dict = terms("guidance")
        loss: dict = terms("loss")
        point_exporter_type: str = component("exporter", "refined-point-cloud")
        point_exporter: dict = field(default_factory=dict)
        mesh_exporter_type: str = component("exporter", "refined-mesh")
        mesh_exporter: dict = field(default_factory=dict)
        video_fps: int = 30

    cfg: Config

    @classmethod
    def validate_config(cls, cfg: Any, path: str) -> Any:
        loss = cfg.get("loss") if hasattr(cfg, "get") else None
        old = [k for k in loss.keys() if k in LEGACY_LOSS_KEYS] if hasattr(loss, "keys") else []
        if old:
            raise ConfigError(f"{path}.loss.{old[0]}: the refine losses are registered loss terms now; write "
                              + "; ".join(LEGACY_LOSS_KEYS[k] for k in old) + f" under {path}.loss "
                              "(configs/stages/refine.yaml has the papers' values)")
        return super().validate_config(cfg, path)

    def configure(self, coarse: Any = None, build_guidance: bool = True, **kwargs) -> None:
        """``coarse``: an already loaded coarse system (the pipeline may share its load; tests pass a stand-in);
        ``build_guidance=False`` (load_stage): no guidance models, for rendering and export only."""
        self.build_parts()  # geometry, renderer
        self.build_losses(geometry=self.geometry)
        self.build_guidance(build_guidance)
        self._coarse = [coarse]  # a list: the coarse system must not become a sub-module (checkpoint)
        self.automatic_optimization = False  # training_step back-propagates the reference view first

    # ------------------------------------------------------------------ coarse stage / start-up
    @property
    def coarse(self):
        """The coarse stage (loaded on first use)."""
        if self._coarse[0] is None:
            loaded = load_coarse(self.cfg.coarse_stage_dir, self.cfg.coarse_config, self.cfg.coarse_ckpt,
                                 self.run_device)
            self._coarse[0] = loaded[0] if isinstance(loaded, tuple) else loaded  # load_stage: (system, dm)
        return self._coarse[0]

    def reference(self) -> Dict[str, Any]:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "reference"):
            raise It3dError("the refine system needs a datamodule with a reference view (single-image)")
        return {**dm.reference, "caption": getattr(dm, "caption", "")}

    def build_point_cloud(self, reference: Dict[str, Any]) -> None:
        builder = self.build_part("builder", "builder", device=self.run_device)
        coarse = self.coarse
        if coarse is None and getattr(builder, "needs_coarse", True):
            raise ConfigError(f"builder '{self.cfg.builder_type}' needs the coarse stage: set system.coarse_stage_dir "
                              "(or system.coarse_config + system.coarse_ckpt)")
        try:
            pts = builder.build(coarse, reference)
        finally:  # the builder's own models (SAM, the img2img pipeline) are not needed for training
            builder.release()
            del builder
            hub.free_memory(self.run_device)
        for key in ("positions", "colors", "is_ref"):
            if key not in pts:
                raise It3dError(f"builder '{self.cfg.builder_type}' returned no '{key}' (got {sorted(pts)})")
        dev = self.geometry.positions.device
        self.geometry.set_points(pts["positions"].to(dev), pts["colors"].to(dev), pts["is_ref"].to(dev))
        io.save_ply(self.get_save_path("points_init.ply"), pts["positions"], pts["colors"])
        log.info(f"refine: built {self.geometry.num_points} points "
                 f"({int(pts['is_ref'].sum())} from the reference view) -> save/points_init.ply")

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.geometry.num_points == 0 and not self.resumed:
            self.build_point_cloud(self.reference())

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        for g in self.guidance.values():
            g.set_prompt(getattr(dm, "caption", "") or "")
            g.set_reference(dm.reference)

    def _check_points(self) -> None:
        if self.geometry.num_points == 0:
            raise It3dError("refine: the point cloud is empty: train first, or give a checkpoint (resume=...)")

    # ------------------------------------------------------------------ rendering
    def render_batch(self, batch: Dict[str, Any], bg_color: Optional[Tensor] = None) -> Dict[str, Any]:
        return self.renderer(batch["c2w"].to(self.device), batch["fovy"].to(self.device), int(batch["height"]),
                             int(batch["width"]), bg_color=bg_color)

    def render_view(self, c2w: Float[Tensor, "4 4"], fovy_deg: float, height: int, width: int,
                    bg_color: Optional[Tensor] = None, **kwargs: Any) -> Dict[str, Any]:
        """One view (1 H W C outputs), as the coarse system's ``render_view``."""
        fovy = torch.as_tensor(fovy_deg, dtype=torch.float32, device=self.device).reshape(1)
        return self.renderer(c2w.reshape(1, 4, 4).to(self.device).float(), fovy, int(height), int(width),
                             bg_color=bg_color)

    # ------------------------------------------------------------------ losses
    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> Tensor:
        """One optimiser step (manual optimisation): the reference view's losses are back-propagated
        before the novel view is rendered, so only one 800 px render graph is alive at a time."""
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        total = self.step_losses(batch, backward=self.manual_backward)
        opt.step()
        for cfg in self.trainer.lr_scheduler_configs:
            if cfg.interval == "step":
                cfg.scheduler.step()
        return total

    def on_train_epoch_end(self) -> None:
        for cfg in self.trainer.lr_scheduler_configs:
            if cfg.interval == "epoch":
                cfg.scheduler.step()

    def _loss_terms(self, out: Dict[str, Any], ref: Dict[str, Any], view: str, n_views: int,
                    seen: Dict[str, list]) -> Optional[Tensor]:
        """``sum weight * term`` over the loss terms computed with ``view``'s render; an ``any`` term enters as its
        value / ``n_views`` (the mean over the step's renders); every value is appended (detached) to ``seen[name]``."""
        def call(name, term):
            value = term(out, ref)
            if value is None:
                return None
            seen.setdefault(name, []).append(value.detach())
            return value / n_views if term.cfg.view == "any" else value

        total, _ = weighted_terms(self.losses, self.loss_weights, self.true_global_step, call,
                                  skip=lambda n, m: not m.applies_to(view))
        return total

    def step_losses(self, batch: Dict[str, Any], backward: Optional[Any] = None) -> Tensor:
        """The step's weighted loss, logged as the coarse system logs: ``train/<term>`` for every loss term
        (an ``any`` term: its mean over the step's renders) and guidance entry, guidance extras as
        ``train/<name>/<key>``, the weighted sum as ``train/loss``.

        Without ``backward``: the total with its graph. With it (``manual_backward``): the reference
        part (the ``ref`` terms -- reference L1, the colour regularisers -- and the reference view's share
        of the ``any`` terms -- white background) is back-propagated and its graph freed before the novel
        view is rendered and the novel part (guidance, ``random`` terms, the novel view's share of the
        ``any`` terms) back-propagated; the detached total is returned. The gradients are the same sum
        either way."""
        step = self.true_global_step
        ref = batch["ref"]
        active = {k: g for k, g in self.guidance.items() if self.C(self.guidance_weights[k]) != 0}
        n_views = 2 if active else 1  # the renders of the step: an `any` term is their mean
        seen: Dict[str, list] = {}
        logs: Dict[str, Tensor] = {}
        out = self.render_batch(ref)
        total = self._loss_terms(out, dict(ref, rgb=ref["rgb"].to(self.device)), "ref", n_views, seen)
        del out  # with ``backward``, nothing of the reference render outlives its backward
        if backward is not None and total is not None:
            backward(total)
            total = total.detach()
        if active:
            rnd = batch["random"]
            out_n = self.render_batch(rnd)

            def call(name, g):
                res = g(out_n["comp_rgb"], rnd, step)
                for k, v in res.items():  # as the coarse system: train/<term>/<extra>
                    if k != "loss" and torch.is_tensor(v) and v.numel() == 1:
                        logs[f"{name}/{k}"] = v.float()
                return res["loss"]

            gtotal, gvals = weighted_terms(active, self.guidance_weights, step, call)
            ltotal = self._loss_terms(out_n, ref, "random", n_views, seen)
            part = gtotal if ltotal is None else (ltotal if gtotal is None else gtotal + ltotal)
            if backward is not None and part is not None:
                backward(part)
                part = part.detach()
            total = part if total is None else (total if part is None else total + part)
            logs.update(gvals)
        for name, values in seen.items():  # an `any` term: the mean over the step's renders
            logs[name] = sum(values) / n_views if self.losses[name].cfg.view == "any" else values[0]
        total = total if total is not None else torch.zeros((), device=self.device)
        self.log_terms(logs, total)  # train/<term>, train/<name>/<key>, train/loss
        return total

    # ------------------------------------------------------------------ validation / test
    @torch.no_grad()
    def reference_psnr(self) -> float:
        from ..core.metrics import psnr

        ref = self.reference()
        out = self.render_batch(ref)
        return float(psnr(out["comp_rgb"].clamp(0, 1), ref["rgb"].to(self.device))[0])

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        out = self.render_batch(batch)
        self.save_image_grid(f"it{self.true_global_step}-{int(batch['index'])}.png", [
            {"type": "rgb", "img": out["comp_rgb"][0]},
            {"type": "mask", "img": out["opacity"][0]},
            {"type": "rgb", "img": out["features"][0][0, ..., :3]},
        ])

    def on_validation_epoch_end(self) -> None:
        value = self.reference_psnr()
        self.log("val/ref_psnr", value)
        log.info(f"refine step {self.true_global_step}: reference-view PSNR {value:.2f} dB")

    def on_test_epoch_start(self) -> None:
        self._check_points()

    def test_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        out = self.render_batch(batch)
        self.save_image(f"test/rgb/{int(batch['index']):04d}.png", out["comp_rgb"][0])

    def on_test_epoch_end(self) -> None:
        from PIL import Image
        import numpy as np

        paths = sorted(glob.glob(os.path.join(self.save_dir, "test", "rgb", "*.png")))
        frames = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
        if frames:
            self.save_video(TURNTABLE, frames, fps=self.cfg.video_fps)

    # ------------------------------------------------------------------ export
    def predict_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        return None

    def on_predict_epoch_end(self) -> None:
        self._check_points()
        self.export()

    def export_parts(self, with_surface: bool = False) -> ExportParts:
        """What an exporter gets of this stage (never the system): the point cloud, its renderer, ``render_view``,
        the reference view and, ``with_surface``, the coarse stage's geometry (the surface the refined mesh
        re-textures; the coarse stage is loaded only then)."""
        reference = self.reference()
        coarse = self.coarse if with_surface else None
        return ExportParts(geometry=self.geometry, renderer=self.renderer, render_view=self.render_view,
                           device=self.device, reference=reference, surface=None if coarse is None else coarse.geometry)

    def export(self) -> Dict[str, str]:
        """Run the configured exporters (``none`` skips one); returns the written paths."""
        written: Dict[str, str] = {}
        for type_field, cfg_field, target in (("point_exporter_type", "point_exporter", "export/points.ply"),
                                              ("mesh_exporter_type", "mesh_exporter", "export/mesh")):
            name = getattr(self.cfg, type_field)
            if name in (None, "", "none"):
                continue
            exporter = self.build_part("exporter", cfg_field)
            parts = self.export_parts(with_surface=cfg_field == "mesh_exporter")
            for k, p in exporter.export(parts, self.get_save_path(target)).items():
                written[f"{cfg_field}.{k}"] = p
                log.info(f"export: {p}")
        return written
