"""``coarse`` system: the NeRF stage of Make-It-3D / Customize-It-3D.

Training step (batch from ``single-image``): when the step is a reference step (``batch["use_ref"]``,
or every step with ``ref_mode: always``, or every step when there is no guidance), the reference
view is rendered (``ref_shading``) and the loss terms whose ``view`` is ``ref`` / ``any`` are
applied; on novel steps (``not use_ref``, or every step with ``ref_mode: always``; only when
guidance terms exist) the random views are rendered with a shading drawn from the material's
schedule, the ``random`` / ``any`` loss terms are applied, and every guidance term gets
``(comp_rgb, batch["random"] + {"shading"}, step)``. Every term is logged as ``train/<name>``
(loss terms on novel views as ``train/<name>_novel``; guidance extras as ``train/<name>/<key>``)
and their weighted sum as ``train/loss``. A term whose weight is 0 at the step is never computed.

Backgrounds. ``ref_bg_color: null`` renders the reference view over the background component
(``random-color``: a random colour per step in training, Make-It-3D B.1's background jitter) and
re-composites the reference image on the very colour the renderer used (``comp_rgb_bg``), so the
reference loss compares like with like; a colour list fixes it instead. Novel views use the
background component, except ``normal``-shaded renders: they are the camera-space normal map
``(R^T n + 1) / 2`` composited on :data:`it3d.data.dreambooth_data.NORMAL_BACKGROUND` by
:func:`it3d.data.dreambooth_data.normal_image` -- the encoding the multi-modal DreamBooth model
was trained on for "normal map" prompts.

Loss terms are built with ``geometry=`` (``normal-smooth-3d`` evaluates normals at perturbed
points); terms with ``needs_normals`` make the renderer return normals while their weight is
non-zero, terms with ``needs_positions`` get ``sample_positions`` (B H W S*3) in the outputs.

Normals and their gradient. Gradients flow through the rendered normals only while a term with
``normal_loss`` (orient, normal-smooth, normal-smooth-3d) has a non-zero weight at the step, or on
shaded renders with ``shading_normal_grad: true``; otherwise shaded renders use the normals as
constants of the step (they still train the albedo, and the density through the weights). With the
geometry's ``normal_type: analytic`` that is what decides whether the second-order graph (a double
backward; the hash grid keeps only the sample points for it) is built; ``finite_difference`` normals (six shifted
density evaluations, first-order graph, the official code's choice) never need one.

Outputs: validation grids ``save/it{step}-val/{index}.png`` (rgb | depth | normal | opacity);
``--test`` ``save/test/{rgb,normal,depth}/%04d.png`` and ``save/test/turntable.mp4`` (frame 0 =
reference view); ``--export`` ``save/export/mesh.{obj,mtl,glb}`` + ``mesh_texture.png``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..core import cameras
from ..core import io, registry
from ..core.base import ExportParts, Updateable
from ..core.config import ConfigError, component, terms
from ..core.layout import TURNTABLE
from ..core.typing import Float, Tensor
from ..data.dreambooth_data import NORMAL_BACKGROUND, normal_image
from ..losses import weighted_terms
from ..materials.diffuse_light import NEEDS_NORMAL
from .base import BaseSystem


def subsample_rays(view: Dict, n: int, seed: int) -> Dict:
    """``n`` random pixels of a 1 H W C view as a 1 x 1 x n "image" (same for every per-pixel key).
    Image-space terms that need neighbouring pixels (normal-smooth) are then meaningless."""
    h, w = int(view["height"]), int(view["width"])
    if n >= h * w:
        return view
    idx = torch.randperm(h * w, generator=torch.Generator().manual_seed(int(seed)))[:n].to(view["rays_o"].device)
    out = dict(view)
    for k, v in view.items():
        if torch.is_tensor(v) and v.dim() == 4 and v.shape[1:3] == (h, w):
            out[k] = v.reshape(v.shape[0], h * w, -1)[:, idx].reshape(v.shape[0], 1, n, -1)
    out["height"], out["width"] = 1, n
    return out


def composite_reference(ref: Dict, bg: Float[Tensor, "B H W 3"]) -> Dict:
    """The reference view with its image (``rgb``, on white) re-composited over ``bg`` using ``mask``."""
    a = ref["mask"]
    fg = ref["rgb"] - (1.0 - a)  # the premultiplied foreground
    return dict(ref, rgb=(fg + (1.0 - a) * bg.to(fg)).clamp(0.0, 1.0))


@registry.register("coarse", kind="system")
class CoarseSystem(BaseSystem):
    @dataclass
    class Config(BaseSystem.Config):
        geometry_type: str = component("geometry", "implicit-volume")
        geometry: dict = field(default_factory=dict)
        material_type: str = component("material", "diffuse-light")
        material: dict = field(default_factory=dict)
        background_type: str = component("background", "solid-color")
        background: dict = field(default_factory=dict)
        renderer_type: str = component("renderer", "volume")
        renderer: dict = field(default_factory=dict)
        exporter_type: str = component("exporter", "mesh")
        exporter: dict = field(default_factory=dict)
        guidance: dict = terms("guidance")
        loss: dict = terms("loss")
        ref_mode: str = "mixed"  # mixed: ref losses on use_ref steps, guidance otherwise | always: both every step
        ref_shading: str = "albedo"
        # null: the background component's colour (random jitter in training), the reference re-composited on it
        ref_bg_color: Optional[List[float]] = field(default_factory=lambda: [1.0, 1.0, 1.0])
        eval_bg_color: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
        video_fps: int = 30
        ref_ray_batch: int = 0  # > 0: the reference losses see this many random pixels per step (CPU runs)
        # shaded renders (lambertian / textureless / normal) train the surface orientation through the normals
        # even when no normal loss is on (analytic normals: a second-order graph on those steps)
        shading_normal_grad: bool = False

    cfg: Config

    def configure(self, build_guidance: bool = True, **kwargs) -> None:
        c = self.cfg
        if c.ref_mode not in ("mixed", "always"):
            raise ConfigError(f"system.ref_mode must be 'mixed' or 'always', got '{c.ref_mode}'")
        self.build_parts()  # geometry, material, background, renderer
        self.build_losses(geometry=self.geometry)
        self.build_guidance(build_guidance)
        self._test_frames: List = []

    # ------------------------------------------------------------------ hooks
    def _datamodule(self):
        try:
            return self.trainer.datamodule
        except RuntimeError:
            return None

    def on_fit_start(self) -> None:
        dm = self._datamodule()
        if dm is None or not self.guidance:
            return
        dm.prepare() if hasattr(dm, "prepare") else None
        ref = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in dm.reference.items()}
        for g in self.guidance.values():
            g.set_prompt(getattr(dm, "caption", "") or "")  # BaseGuidance's contract
            g.set_reference(ref)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        super().on_train_batch_start(batch, batch_idx)
        dm = self._datamodule()
        if isinstance(dm, Updateable):
            dm.do_update_step(self.current_epoch, self.global_step)

    # ------------------------------------------------------------------ rendering
    def render(self, view: Dict, shading: Optional[str] = None, bg_color=None,
               output_normal: Optional[bool] = None) -> Dict:
        bg = None if bg_color is None else self._bg_tensor(bg_color, view["rays_o"].device)
        if shading == "normal":
            output_normal = True
        elif output_normal is None and self._losses_need("needs_normals"):
            output_normal = True
        # gradients through the normals only while a normal loss is on (or shaded renders are asked to train them)
        normal_grad = self.training and (self._losses_need("normal_loss")
                                         or (self.cfg.shading_normal_grad and shading in NEEDS_NORMAL))
        out = self.renderer(view["rays_o"], view["rays_d"], light_positions=view.get("light_positions"),
                            bg_color=bg, shading=shading, c2w=view.get("c2w"), output_normal=output_normal,
                            normal_grad=normal_grad)
        if shading == "normal":
            if view.get("c2w") is None:
                raise ConfigError("normal shading needs the view's camera (c2w) for camera-space normals")
            out["comp_rgb"] = normal_image(out["comp_normal"], out["opacity"], view["c2w"].to(out["opacity"]))
        if "t_samples" in out and self._losses_need("needs_positions"):
            d = F.normalize(view["rays_d"].float(), dim=-1)
            pts = view["rays_o"].float()[..., None, :] + d[..., None, :] * out["t_samples"][..., None]
            out["sample_positions"] = pts.flatten(-2)
        return out

    def _bg_tensor(self, color, device: torch.device) -> Tensor:
        """A background colour on ``device``; config lists are uploaded once per (colour, device), not per step."""
        if torch.is_tensor(color):
            return color.to(device=device, dtype=torch.float32)
        key = (tuple(float(c) for c in color), str(device))
        cache = self.__dict__.setdefault("_bg_cache", {})
        if key not in cache:
            cache[key] = torch.tensor(key[0], dtype=torch.float32, device=device)
        return cache[key]

    def _losses_need(self, attr: str) -> bool:
        """A loss term with ``attr`` (needs_normals, needs_positions) and a non-zero weight now (training only)."""
        from ..core.config import C

        return self.training and any(getattr(m, attr, False) and C(self.loss_weights[n], self.true_global_step) != 0
                                     for n, m in self.losses.items())

    @torch.no_grad()
    def render_view(self, c2w: Float[Tensor, "4 4"], fovy_deg: float, height: int, width: int,
                    shading: str = "albedo", bg_color=(1.0, 1.0, 1.0), normals: bool = True) -> Dict:
        """Render one camera in eval mode -> renderer outputs with batch size 1. ``normals=False`` skips
        the density-gradient pass (callers that only need colour, opacity and depth)."""
        was = self.training
        self.eval()
        try:
            c2w = c2w.to(self.device).float()
            rays_o, rays_d = cameras.get_rays(c2w[None], height, width, float(fovy_deg))
            view = {"rays_o": rays_o, "rays_d": rays_d, "c2w": c2w[None], "light_positions": c2w[None, :3, 3]}
            # shaded modes need normals whatever the caller asked
            return self.render(view, shading=shading, bg_color=bg_color, output_normal=normals or shading != "albedo")
        finally:
            self.train(was)

    # ------------------------------------------------------------------ training
    def _loss_terms(self, out: Dict, ref: Dict, view: str, suffix: str, logs: Dict):
        total, vals = weighted_terms(self.losses, self.loss_weights, self.true_global_step,
                                     lambda n, m: m(out, ref), skip=lambda n, m: not m.applies_to(view))
        logs.update({f"{k}{suffix}": v for k, v in vals.items()})
        return total

    def training_step(self, batch: Dict, batch_idx: int):
        c, step = self.cfg, self.true_global_step
        has_guidance = bool(self.guidance)
        do_ref = bool(batch["use_ref"]) or c.ref_mode == "always" or not has_guidance
        do_novel = has_guidance and (not bool(batch["use_ref"]) or c.ref_mode == "always")
        logs: Dict[str, Any] = {}
        parts = []
        if do_ref:
            ref = batch["ref"]
            if c.ref_ray_batch > 0:
                ref = subsample_rays(ref, c.ref_ray_batch, step)
            out = self.render(ref, shading=c.ref_shading, bg_color=c.ref_bg_color)
            if c.ref_bg_color is None:  # the reference on the background the render used
                ref = composite_reference(ref, out["comp_rgb_bg"])
            parts.append(self._loss_terms(out, ref, "ref", "", logs))
        if do_novel:
            rnd = batch["random"]
            shading = self.material.sample_shading(step) if hasattr(self.material, "sample_shading") else None
            out = self.render(rnd, shading=shading, bg_color=NORMAL_BACKGROUND if shading == "normal" else None)
            parts.append(self._loss_terms(out, batch["ref"], "random", "_novel", logs))
            gbatch = dict(rnd, shading=out.get("shading", shading))

            def call(name, g):
                res = g(out["comp_rgb"], gbatch, step)
                for k, v in res.items():  # logged as tensors: float(v) would wait for the device every step
                    if k != "loss" and (torch.is_tensor(v) and v.numel() == 1 or isinstance(v, (int, float))):
                        logs[f"{name}/{k}"] = v.detach().float().reshape(()) if torch.is_tensor(v) else v
                return res["loss"]

            gtotal, gvals = weighted_terms(self.guidance, self.guidance_weights, step, call)
            logs.update(gvals)
            parts.append(gtotal)
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        total = sum(parts)
        self.log_terms(logs, total)
        return total

    # ------------------------------------------------------------------ evaluation
    def _eval_render(self, batch: Dict) -> Dict:
        out = self.render(batch, shading=None, bg_color=self.cfg.eval_bg_color)
        op = out["opacity"][0]
        normal = out.get("comp_normal")
        nimg = None if normal is None else ((normal[0] + 1) / 2) * op + (1 - op)
        depth = out.get("z_depth", out["depth"])[0]
        return {"rgb": out["comp_rgb"][0], "opacity": op, "depth": depth, "normal": nimg}

    def validation_step(self, batch: Dict, batch_idx: int) -> None:
        r = self._eval_render(batch)
        items = [{"type": "rgb", "img": r["rgb"]}, {"type": "depth", "img": r["depth"], "mask": r["opacity"] > 0.5}]
        if r["normal"] is not None:
            items.append({"type": "rgb", "img": r["normal"]})
        items.append({"type": "grayscale", "img": r["opacity"]})
        self.save_image_grid(f"it{self.true_global_step}-val/{batch['index']}.png", items)

    def on_test_epoch_start(self) -> None:
        self._test_frames = []

    def test_step(self, batch: Dict, batch_idx: int) -> None:
        r = self._eval_render(batch)
        i = int(batch["index"])
        self.save_image(f"test/rgb/{i:04d}.png", r["rgb"])
        if r["normal"] is not None:
            self.save_image(f"test/normal/{i:04d}.png", r["normal"])
        depth = io.colorize_depth(r["depth"], r["opacity"] > 0.5)
        self.save_image(f"test/depth/{i:04d}.png", depth)
        self._test_frames.append((i, io.to_uint8(r["rgb"])))

    def on_test_epoch_end(self) -> None:
        frames = [f for _, f in sorted(self._test_frames, key=lambda x: x[0])]
        if frames:
            self.save_video(TURNTABLE, frames, fps=self.cfg.video_fps)
        self._test_frames = []

    # ------------------------------------------------------------------ export (--export = predict loop)
    def predict_step(self, batch: Dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        return None

    def on_predict_epoch_end(self) -> None:
        self.export()

    def export_parts(self) -> ExportParts:
        """What the exporter gets of this stage (never the system): its parts, ``render_view``, the reference view."""
        dm = self._datamodule()
        return ExportParts(geometry=self.geometry, material=self.material, background=self.background,
                           renderer=self.renderer, render_view=self.render_view, device=self.device,
                           reference=None if dm is None else getattr(dm, "reference", None))

    def export(self) -> Dict[str, str]:
        return self.build_part("exporter", "exporter").export(self.export_parts(), self.get_save_path("export/mesh"))
