"""CPU projection of a stage's GPU peak memory (issue 17) and, with ``--census``, of its GPU time (issue 13); not
collected by pytest.

Builds one training stage of a method config with the real system objects (``build_components``; the
frozen models full-size with random weights in the published layouts, ``it3d.testing`` ``size="full"``
under ``$IT3D_MODEL_ROOT/<hub id>``, as ``tests/gpu/check.py`` builds them), loads them in bf16 (the
CPU's half precision; the same bytes as the GPU's fp16), and measures ONE training step -- the system's
``training_step`` (the refine system: ``step_losses``, its reference backward first), ``backward`` and the
optimizer step -- with :class:`it3d.core.profiling.peak_allocated`:

    resident   bytes held by live tensors at the step's entry (frozen weights, NeRF / points, data)
    step peak  the most bytes allocated at once during the step above that (activations, saved tensors,
               gradients, optimizer states, kernel temporaries)
    peak       resident + step peak: what ``torch.cuda.max_memory_allocated`` would read for this step

Each row runs in its own process (a clean heap; only that stage's models loaded). Where the paper
setting is too slow or too big for the CPU, the row is measured at smaller render sizes and the step
peak extrapolated to the paper's (``--px``: see :func:`extrapolate`).

    export IT3D_MODEL_ROOT=/tmp/it3d_full/models        # built once: --build
    python tests/benchmarks/bench_memory.py --build
    python tests/benchmarks/bench_memory.py --rows mi3d-coarse --out /tmp/mem.json
    python tests/benchmarks/bench_memory.py --rows ci3d-coarse --px 64 96    # extrapolated to 128 and 256
    python tests/benchmarks/bench_memory.py --rows ci3d-refine-build    # the refine stage's point-cloud build
    python tests/benchmarks/bench_memory.py --census [--sparse] --rows mi3d-coarse ci3d-dreambooth   # GPU time

Measured on a 2-core CPU (Dec 2026; GiB). Before the recomputing hash-grid Function (the torch path kept
autograd's graph of its gathers, ~7 KB a sample with the normals' second-order graph): make-it-3d coarse at
100 px projected 13.76 (a step on clip-d's SDS branch, measured at the paper's size) to 16.46 (its CLIP
branch, extrapolated from 64 / 80 px) against 14.8 measured on an H200 over 40 steps with that same torch
path (``hash_grid: torch`` in that run's backends): within -7 % .. +11 % of the GPU for a coarse stage.
Make-it-3d refine's training step projects 5.6 (SDS) / 8.3 (CLIP branch) against the stage's 12.1 on the GPU:
the refine stage's GPU peak is not in its training step (the point-cloud build is not measured here).
Customize-it-3d coarse at 128 px: 22.8 (extrapolated from 80 / 96 px; 64 / 80 px gave 21.95); refine at
800 px with 700k points: 8.0 (measured). The linear extrapolation in pixels was checked: make-it-3d coarse
64 / 80 px -> 100 px within 0.5 % of the measurement, customize-it-3d refine 400 / 560 -> 800 px within
0.3 %; customize-it-3d coarse 64 / 80 -> 96 px 2 % under (slightly superlinear).
After it (the hash grid keeps only the sample points; the Triton path on a GPU keeps the same): make-it-3d
coarse at 100 px 6.63 measured (was 13.76; the GPU's 14.8 above predates the change: re-measure);
customize-it-3d coarse step peak 3.16 / 3.54 / 4.26 at 64 / 80 / 96 px (was 6.31 / 8.46 / 11.34), so
10.24 at 128 px (was 22.8) and 22.76 at 256 px (was ~68), extrapolated from 80 / 96 px.
Customize-it-3d coarse with finite-difference normals: 3.68 / 5.05 at 48 / 64 px (was 6.45 / 11.47), so
18.61 at 128 px (was ~50): six shifted density evaluations with their graphs cost more than the analytic one.
Customize-it-3d refine's point-cloud build (800 px build views, 700k samples, one img2img pass with the
DreamBooth pipeline's shared UNet / VAE and one SAM-H pass counted inside the block): resident 4.19 + 1.92 =
6.11 (measured), under its training step's 8.0.

Customize-it-3d DreamBooth step (``--rows ci3d-dreambooth``: 512 px instance + class image, fp32 UNet + text
encoder under bf16 autocast, gradient checkpointing, clipping, AdamW in 256 MB groups): resident 13.64 + step peak
4.74 = 18.39 (measured; 18.51 with the one-tensor AdamW; the H200's 23.1 predates checkpointing and carried the
one-group multi-tensor AdamW's weight-sized temporary).

``--census`` counts the step instead (``it3d.core.profiling.op_census`` on the H200's figures): its kernels, FLOPs
and bytes, the roofline floor, the hash grid as the Triton kernels' measured H200 times (``--hash-grid torch``:
as torch kernels in CUDA's chunks), and an eager estimate = 10.6 us x kernels + 2.33 x roofline + hash grid, fitted
to bench_coarse's two H200 sizes (see ``LAUNCH_S``); ``--sparse`` gives coarse rows a trained-looking field (3 %
of the occupancy grid's cells occupied, 5-10 % of the samples evaluated) instead of the blob. Dec 2026, this code:

    row (px)               kernels  TFLOP  GB moved  roofline ms  hash grid ms  eager ms  steps  minutes
    mi3d-coarse (100)         1771   4.04     54.6        14.0          21.1      72.6   5000     6.05
      --sparse                1767   3.91     26.4         8.1           4.7      42.4   5000     3.53
      --hash-grid torch      13335   4.04    303.4        65.8             -     294.7   5000    24.56
    ci3d-coarse (128)         2915   5.04     82.8        20.3          33.3     111.6   7000    13.02
      --sparse                2911   4.81     33.6        10.1           4.7      59.1   7000     6.89
    ci3d-refine (800)         4348   7.52    102.9        26.1             -     107.0   3000     5.35
    mi3d-refine (800)         3198   6.62    113.7        27.9             -      99.0   5000     8.25
    ci3d-dreambooth (512)     7241   8.71    176.7        42.3             -     175.2    200     0.58
    ci3d-dreambooth-1tensor  16148   8.71    176.7        42.3             -     269.6    200     0.90

The per-kernel term is 26-63 % of each estimate; the fit cannot tell launch cost from any fixed host cost a
step has, since both calibration runs launched the same 774 kernels. The model is rough, by up to 2x either
way: it overstates hashgrid_check's isolated torch encoding by 1.6-2x (6 timings), and gives 175 ms for a
DreamBooth step where the H200 measured 235-280 ms for one without gradient checkpointing (less compute).
AdamW one tensor at a time and the clipping launch 9,680 of DreamBooth's 16,148 kernels; AdamW in 256 MB
multi-tensor groups and the clipping over lists, 773 (and 0.12 GiB less peak).

What it cannot see: allocations outside PyTorch's allocator (BLAS / oneDNN scratch; cuBLAS and cuDNN
workspaces, which the GPU's caching allocator does count), the caching allocator's rounding and
fragmentation (``max_memory_allocated`` excludes the latter anyway), the CUDA context, and transients of
model loading (a GPU run's peak is over the whole stage).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "custom"))

GiB = 2 ** 30
BUILD = {"stabilityai/stable-diffusion-2-base": "sd", "bennyguo/zero123-xl-diffusers": "zero123",
         "openai/clip-vit-base-patch16": "clip-b16", "facebook/sam-vit-huge": "sam-huge"}
SD = "stabilityai/stable-diffusion-2-base"
IMAGE = os.path.join(ROOT, "load", "synthetic", "rgba.png")
DEPTH = os.path.join(ROOT, "load", "synthetic", "depth.png")

# row -> (method config, stage, extra overrides for that stage, {paper render px: GPU peak GB measured fp16 or None})
ROWS = {
    # 14.8: measured before the recomputing hash-grid Function (the projection then was 13.76, now 6.63)
    "mi3d-coarse": ("configs/make-it-3d.yaml", "coarse", [], {100: 14.8}),
    "mi3d-refine": ("configs/make-it-3d.yaml", "refine", [], {800: 12.1}),
    "ci3d-coarse": ("configs/customize-it-3d.yaml", "coarse", [], {128: None, 256: None}),
    "ci3d-coarse-fd": ("configs/customize-it-3d.yaml", "coarse", ["system.geometry.normal_type=finite_difference"],
                       {128: None, 256: None}),
    "ci3d-refine": ("configs/customize-it-3d.yaml", "refine", [], {800: None}),
    # the refine stage's point-cloud build (measure_build): marching cubes of the coarse NeRF, 700k samples, one
    # build view (render, img2img with the DreamBooth pipeline, SAM-H); px = the build views' size
    "ci3d-refine-build": ("configs/customize-it-3d.yaml", "refine", [], {800: None}),
    # clip-d draws t once per step: t < 400 (the CLIP branch: a VAE decode with its backward at 512 px) or SDS
    "mi3d-coarse-clip": ("configs/make-it-3d.yaml", "coarse", ["system.guidance.clip_d.max_step_percent=0.39",
                                                               "system.guidance.clip_d.skip_back_views=false"],
                         {100: 14.8}),  # (the view drawn at --step 3000 is a back view: SDS there)
    "mi3d-refine-clip": ("configs/make-it-3d.yaml", "refine", ["system.guidance.clip_d.max_step_percent=0.39"],
                         {800: 12.1}),
    # one DreamBooth step (measure_dreambooth): the instance image and a class image at 512 px through the trained
    # fp32 UNet + text encoder under half-precision autocast, backward, gradient clipping, AdamW; px = the images'
    # (the H200's 23.1 GB, 235-280 ms a step, predate gradient checkpointing and the grouped AdamW; that setting
    # needs more than this machine's 24 GiB of RAM to measure here)
    "ci3d-dreambooth": ("configs/customize-it-3d.yaml", "dreambooth", [], {512: None}),
    "ci3d-dreambooth-1tensor": ("configs/customize-it-3d.yaml", "dreambooth", ["system.optimizer.args.foreach=false"],
                                {512: None}),  # AdamW one tensor at a time: the comparison for the groups
}


def log(msg: str) -> None:
    print(msg, flush=True)


def build_models(root: str) -> None:
    from it3d.testing import model_dir

    for hub_id, name in BUILD.items():
        d = model_dir(name, "full", os.path.join(root, "built"))
        link = os.path.join(root, "models", hub_id)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.islink(link):
            os.symlink(d, link)
        log(f"{hub_id}: {d}")


# ----------------------------------------------------------------------------- one row (in its own process)
def stage_config(config: str, stage: str, extra, work: str):
    from it3d.runner.cli import import_extensions, prepare_config
    from it3d.runner.pipeline import prepare_stages

    import_extensions()
    sd = os.path.join(os.environ["IT3D_MODEL_ROOT"], SD)
    s = f"stage.{stage}."
    over = [f"data.image_path={IMAGE}", f"exp_root_dir={work}", "precision=bf16", "use_timestamp=false",
            f"data.depth_path={DEPTH}", "data.caption=a photo of a teddy bear on a table"]
    if "customize" in config and stage != "dreambooth":  # the DreamBooth stage's pipeline: SD2 of that architecture
        over += [s + f"system.guidance.dreambooth.pretrained_model_name_or_path={sd}"]
        if stage == "refine":
            over += [s + f"system.builder.enhance.pretrained_model_name_or_path={sd}"]
    if stage == "refine":
        over += [s + "system.coarse_stage_dir=null"]
    over += [s + e for e in extra]
    cfg, _ = prepare_config([os.path.join(ROOT, config)], over)
    for spec, scfg, parsed in prepare_stages(cfg, "cpu"):
        if spec.name == stage:
            if scfg.get("data") is not None and scfg.data.get("prepared"):
                # no preprocess stage runs here: the photo with its alpha, the depth map and the caption given
                # above are complete, so the datamodule reads them (data.prepared would point at a record the
                # preprocess stage never wrote)
                from it3d.core.config import validate_experiment

                scfg.data.prepared = None
                parsed = validate_experiment(scfg)
            return scfg, parsed
    raise SystemExit(f"{config}: no stage {stage}")


def fake_cloud(system, n: int, seed: int = 0):
    """Instead of the builder (it needs a trained coarse stage, SAM and the img2img pipeline): ``n`` points on a sphere of radius 0.35 at the origin (the coarse object's size in the reference frame:
    border 0.2 at distance 1, fovy 60 -> +-0.46), coloured grey, the front third marked as reference points:
    the refine step's cost depends on the point count and the pixels they cover, not on their layout."""
    import torch

    g = torch.Generator().manual_seed(seed)
    p = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1) * 0.35
    colors = torch.full((n, 3), 0.5)
    is_ref = p[:, 2] > 0.35 / 3
    dev = system.geometry.positions.device
    system.geometry.set_points(p.to(dev), colors.to(dev), is_ref.to(dev))


CENSUS = {"on": False, "hash_grid": "triton", "sparse": False}  # --census: the step's op census instead of its memory

# The Triton hash grid's kernels on the H200 (tests/gpu/hashgrid_check.py, Dec 4: paper grid 16 x 2^19 x 2, torch 2.11,
# Triton 3.6), ms per call at 262,144 and 1,048,576 points, linear between: forward; backward with the table
# gradient (forward + backward - forward); with the table and input gradients; the double backward (normals step
# - forward - backward with both).
TRITON_MS = {"forward": (0.31, 1.15), "backward_t": (1.02, 3.05), "backward_xt": (1.17, 3.93), "backward2": (1.17, 3.08)}
# Eager time on the H200 ~= LAUNCH_S x kernels + BANDWIDTH_FACTOR x roofline, fitted exactly to the two sizes
# bench_coarse measured there (torch hash grid, code of e3b6365: 19 ms at 128 px, 47 ms at 256 px) and this
# census of that code (774 kernels both; roofline 4.63 / 16.63 ms). The same model overstates the isolated torch
# encoding of hashgrid_check by 1.6-2x (its tight loop has less Python per kernel than a training step).
LAUNCH_S, BANDWIDTH_FACTOR = 10.6e-6, 2.33


def _triton_ms(kind: str, n: int) -> float:
    a, b = TRITON_MS[kind]
    return max(0.0, a + (b - a) * (n - 2 ** 18) / (2 ** 20 - 2 ** 18))


def model_triton_hash_grid(tally: dict):
    """Census as a GPU runs the hash grid with ``backend: auto`` (Triton): its torch kernels still compute the
    values here, outside the census, and each call adds the H200 time of the Triton kernel it stands for.
    Returns a function that puts the kernels back."""
    from torch.utils._python_dispatch import _disable_current_modes

    from it3d.encodings.hash_grid import TorchKernels

    saved = {n: TorchKernels.__dict__[n] for n in ("forward", "backward", "backward2")}

    def wrap(name, kind_of):
        orig = saved[name]

        def run(self, x, *args):
            with _disable_current_modes():
                out = orig(self, x, *args)
            kind = kind_of(args)
            if kind:
                tally["calls"] += 1
                tally["ms"] += _triton_ms(kind, x.shape[0])
            return out

        setattr(TorchKernels, name, run)

    wrap("forward", lambda a: "forward")
    # backward(x, table, g, want_x, want_t); backward2(x, table, g, ggx, want_t, want_g)
    wrap("backward", lambda a: ("backward_xt" if a[2] else "backward_t") if (a[2] or a[3]) else None)
    wrap("backward2", lambda a: "backward2" if (a[3] or a[4]) else None)

    def restore():
        for n, f in saved.items():
            setattr(TorchKernels, n, f)

    return restore


class _Census:
    """op_census on the H200, with the hash grid counted as ``CENSUS['hash_grid']`` runs it on a GPU."""

    def __enter__(self):
        from it3d.core.profiling import H200, op_census
        from it3d.encodings.hash_grid import TorchKernels

        self.tally = {"calls": 0, "ms": 0.0}
        chunks = dict(TorchKernels.chunk)
        if CENSUS["hash_grid"] == "triton":
            put_back = model_triton_hash_grid(self.tally)
        else:  # the torch path in the chunks CUDA uses (fewer, larger kernels than the CPU's)
            TorchKernels.chunk["cpu"] = TorchKernels.chunk["cuda"]
            put_back = lambda: None  # noqa: E731

        def restore():
            put_back()
            TorchKernels.chunk.update(chunks)

        self.restore = restore
        self.inner = op_census(H200, depth=2)
        self.c = self.inner.__enter__()
        self.c.hash_grid = self.tally
        return self.c

    def __exit__(self, *exc):
        try:
            return self.inner.__exit__(*exc)
        finally:
            self.restore()


def measuring():
    """The context the measured block runs in: the memory peak, or with ``--census`` the op census."""
    from it3d.core.profiling import peak_allocated

    return _Census() if CENSUS["on"] else peak_allocated("cpu")


def census_result(c) -> dict:
    """The census of one block: totals, the roofline floor on an H200, and the modules at depth <= 2 by
    their roofline time (names from torch's ModuleTracker: the first module called, then its children)."""
    mods = sorted(c.by_module.items(), key=lambda kv: -kv[1].roofline_s)
    hg = getattr(c, "hash_grid", {"calls": 0, "ms": 0.0})
    eager = LAUNCH_S * (c.total.launches + hg["calls"]) + BANDWIDTH_FACTOR * c.total.roofline_s + hg["ms"] / 1e3
    return {"census": {"launches": c.total.launches, "tflop": c.total.flops / 1e12, "gb_moved": c.total.bytes / 1e9,
                       "compute_ms": c.total.compute_s * 1e3, "memory_ms": c.total.memory_s * 1e3,
                       "roofline_ms": c.total.roofline_s * 1e3, "device": c.spec.name, "hash_grid": CENSUS["hash_grid"],
                       "triton_calls": hg["calls"], "triton_ms": hg["ms"], "eager_ms": eager * 1e3,
                       "modules": {k: {"launches": v.launches, "tflop": v.flops / 1e12, "gb_moved": v.bytes / 1e9,
                                       "roofline_ms": v.roofline_s * 1e3} for k, v in mods}}}


def row_result(name: str, stage: str, step: int, px: int, guidance_res: dict, points, m, ms: float, load_s: float,
               gpu, **extra) -> dict:
    """One table row from a :class:`it3d.core.profiling.MemoryUse` ``m`` (or an ``OpCensus``) and the timings."""
    if not hasattr(m, "resident_bytes"):
        return {"row": name, "stage": stage, "step": step, "render_px": px, "guidance_res": guidance_res,
                "points": points, "ms_step": round(ms), "load_s": round(load_s, 1), **census_result(m), **extra}
    return {"row": name, "stage": stage, "step": step, "render_px": px, "guidance_res": guidance_res,
            "points": points, "resident_gb": m.resident_bytes / GiB, "step_peak_gb": m.peak_bytes / GiB,
            "peak_gb": m.peak_total_bytes / GiB, "freed_resident_gb": m.freed_resident_bytes / GiB,
            "allocations": m.allocations, "ms_step": round(ms), "load_s": round(load_s, 1), "gpu_gb": gpu, **extra}


def measure_build(name: str, work: str, px: int) -> dict:
    """The refine stage's point-cloud build, as ``RefineSystem.setup`` runs it: the refine system with its
    guidance models loaded (resident), the coarse stage as ``load_stage`` makes it (the coarse config's system
    without guidance: a random NeRF at its blob initialisation), ``build_point_cloud`` measured whole --
    loading SAM and the img2img pipeline, marching cubes, the samples, the reference view and ONE novel view
    (each view's render, img2img and SAM pass is dropped before the next, so more views add time, not peak)."""
    import torch

    from it3d.builders import base as builders_base
    from it3d.core import hub, registry
    from it3d.runner.cli import build_components

    torch.set_num_threads(2)
    config, _, extra, gpu = ROWS[name]
    sam = os.path.join(os.environ["IT3D_MODEL_ROOT"], "facebook/sam-vit-huge")
    over = list(extra) + [f"system.builder.sam.pretrained_model_name_or_path={sam}", f"system.builder.height={px}",
                          f"system.builder.width={px}"]
    scfg, parsed = stage_config(config, "refine", over, work)
    hub.set_precision(parsed.precision)
    t0 = time.time()
    dm, system = build_components(scfg, parsed, str(scfg.trial_dir), resumed=False)
    dm.prepare()
    ccfg, cparsed = stage_config(config, "coarse", [], work)
    coarse = registry.get("system", cparsed.system_type)(ccfg.get("system", {}), resumed=True, path="system",
                                                        save_dir=os.path.join(work, "coarse-save"),
                                                        build_guidance=False)
    coarse.set_step(7000)
    coarse.do_update_step(0, 7000, on_load_weights=True)
    coarse.eval()
    system._coarse[0] = coarse
    first = builders_base.ViewBuilder.novel_cameras
    builders_base.ViewBuilder.novel_cameras = lambda self, ref: first(self, ref)[:1]
    from it3d.builders import enhance as enhance_mod

    ran = {"img2img": 0, "sam": 0}  # the passes that ran inside the measured block

    def counted(cls, attr, key):
        orig = getattr(cls, attr)

        def call(self, *args, **kwargs):
            ran[key] += 1
            return orig(self, *args, **kwargs)

        setattr(cls, attr, call)

    counted(enhance_mod.Img2ImgEnhancer, "enhance", "img2img")
    counted(enhance_mod.SamMaskUnion, "__call__", "sam")
    reference = {**dm.reference, "caption": "a photo of a teddy bear on a table"}
    load_s = time.time() - t0
    gc.collect()
    t1 = time.time()
    with measuring() as m:
        system.build_point_cloud(reference)
    return row_result(name, "refine-build", 0, px, {}, system.geometry.num_points, m, (time.time() - t1) * 1000.0,
                      load_s, gpu.get(px), passes=ran)


def measure_dreambooth(name: str, work: str, px: int) -> dict:
    """One DreamBooth training step as Lightning runs it in a half-precision run: the system (its trained fp32
    UNet and text encoder, the frozen VAE in bf16), a batch of the instance image and one class image at
    ``px`` (random pixels: the cost does not depend on them), ``diffusion_loss`` under bf16 autocast (the CPU's
    half; the GPU's fp16-mixed has the same shapes and bytes), backward, ``clip_grad_norm_`` (the config's
    ``gradient_clip_val``) and the optimizer's step."""
    import torch

    from it3d.core import hub, registry

    torch.set_num_threads(2)
    config, stage, extra, gpu = ROWS[name]
    scfg, parsed = stage_config(config, stage, list(extra), work)
    hub.set_precision(parsed.precision)
    t0 = time.time()
    system = registry.get("system", parsed.system_type)(scfg.system, resumed=False, path="system",
                                                        save_dir=os.path.join(work, "dreambooth-save"))
    opt = system.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    params = [p for g in opt.param_groups for p in g["params"]]
    images = torch.rand(2, px, px, 3, generator=torch.Generator().manual_seed(0))
    prompts = ["a rgb photo of sks teddy bear", "a photo of teddy bear"]
    clip = float(scfg.trainer.get("gradient_clip_val") or 0.0)
    load_s = time.time() - t0

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = system.diffusion_loss(images, prompts).sum()
        loss.backward()
        if clip:  # over the gradients' lists, as on CUDA
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        opt.step()

    torch.manual_seed(0)
    step()  # the first step allocates the optimizer's moments: the steady state holds them
    system.zero_grad(set_to_none=True)
    gc.collect()
    t1 = time.time()
    with measuring() as m:
        step()
    return row_result(name, stage, 1, px, {}, None, m, (time.time() - t1) * 1000.0, load_s, gpu.get(px),
                      paper_steps=sum(int(m["steps"]) for m in scfg.data.modalities),
                      optimizer={k: v for k, v in opt.defaults.items() if k in ("foreach", "fused")},
                      gradient_checkpointing=bool(scfg.system.gradient_checkpointing))


def measure_row(name: str, work: str, px: int, step: int) -> dict:
    import torch

    if name.endswith("-build"):
        return measure_build(name, work, px)
    if "dreambooth" in name:
        return measure_dreambooth(name, work, px)

    from it3d.core import hub
    from it3d.runner.cli import build_components

    torch.set_num_threads(2)
    config, stage, extra, gpu = ROWS[name]
    extra = list(extra)
    # the GPU's buffer sizing (a margin over all samples until measured) instead of the CPU's exact sizing
    extra += ["system.renderer.sample_capacity_margin=1.5"] if stage == "coarse" else \
        ["system.renderer.fragment_capacity_margin=1.25"]
    extra += [f"data.heights=[{px}]", f"data.widths=[{px}]"]
    scfg, parsed = stage_config(config, stage, extra, work)
    hub.set_precision(parsed.precision)
    t0 = time.time()
    dm, system = build_components(scfg, parsed, str(scfg.trial_dir), resumed=False)
    dm.prepare()
    if stage == "refine":
        b = scfg.system.builder  # mesh-sampling: its num_points; depth-unprojection: its cap (an upper bound)
        n = int(b.get("num_points", 0) or 0) or int(b.get("max_points", 0) or 0) or 1_000_000
        fake_cloud(system, n)
    ref = dict(dm.reference)
    for g in system.guidance.values():
        g.set_prompt(getattr(dm, "caption", "") or "a photo of a teddy bear on a table")
        g.set_reference(ref)
    logged = {}
    system.log = lambda k, v, **kw: logged.__setitem__(k, float(v))
    system.train()
    opt = system.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else (opt[0][0] if isinstance(opt, tuple) else opt)
    if isinstance(opt, list):
        opt = opt[0]
    load_s = time.time() - t0
    s = next(k for k in range(step, step + 200) if not dm.train_batch(k)["use_ref"]) if stage == "coarse" else step
    batch = dm.train_batch(s)
    system.set_step(s)
    sparse = {}
    if CENSUS["sparse"] and stage == "coarse":  # a trained-looking field (bench_coarse --sparse): a dense core,
        # near-empty elsewhere; the occupancy grid updated from it, then one unmeasured step sizes the buffers
        with torch.no_grad():
            system.geometry.mlp[-1].bias[0] = -4.0
        ren = system.renderer
        ren.grid.update(ren.geometry.forward_density, s)
        torch.manual_seed(0)
        system.training_step(batch, 0).backward()
        system.zero_grad(set_to_none=True)
        ren.sample_buffers.resize()
        sparse = {"occupied_cells": float(ren.grid.occupied.float().mean())}
    torch.manual_seed(0)
    system.zero_grad(set_to_none=True)
    gc.collect()
    t1 = time.time()
    with measuring() as m:
        if stage == "refine":
            system.step_losses(batch, backward=lambda loss: loss.backward())
        else:
            loss = system.training_step(batch, 0)
            loss.backward()
            del loss
        opt.step()
    ms = (time.time() - t1) * 1000.0
    h = int(batch.get("height", 0) or 0) or (batch["random"]["rays_o"].shape[1] if "random" in batch else 0)
    res = {g: int(scfg.system.guidance[g].resolution) for g in system.guidance}
    return row_result(name, stage, s, h, res, getattr(system.geometry, "num_points", None), m, ms, load_s, gpu.get(px),
                      paper_steps=int(scfg.trainer.max_steps), **sparse,
                      samples={k: int(v) for k, v in getattr(system.renderer, "last_stats", {}).items()
                               if k in ("n_samples", "n_slots", "n_evaluated")}, clip_fraction=next((v for k, v in logged.items() if k.endswith("clip_fraction")), None))


# ----------------------------------------------------------------------------- driver
def run_child(name: str, work: str, px: int, step: int, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--work", work, "--step", str(step),
           "--px", str(px)] + (["--census", "--hash-grid", CENSUS["hash_grid"]] if CENSUS["on"] else []) \
        + (["--sparse"] if CENSUS["sparse"] else [])
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"row": name, "render_px": px, "error": f"timeout after {timeout:.0f} s"}
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        tail = [l for l in r.stderr.strip().splitlines() if l.strip()][-6:]
        return {"row": name, "render_px": px, "error": f"rc={r.returncode}", "stderr": tail}
    out = json.loads(lines[-1][7:])
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def extrapolate(a: dict, b: dict, px: int) -> float:
    """Step peak at render size ``px`` from two measurements at smaller ones, linear in the rendered pixels:
    peak = c + k * px^2 (the NeRF's samples, their saved activations and the sample buffers are R x S for R
    rays; the guidance works at its fixed resolution whatever the render size: part of c). Valid while the
    same phase of the step holds the peak at both measured sizes and the target."""
    k = (b["step_peak_gb"] - a["step_peak_gb"]) / (b["render_px"] ** 2 - a["render_px"] ** 2)
    return b["step_peak_gb"] + k * (px * px - b["render_px"] ** 2)


def extrapolated(name: str, meas) -> list:
    """Rows at the paper's render sizes not measured, from the two largest measured ones."""
    ok = sorted((m for m in meas if "error" not in m and "census" not in m), key=lambda m: m["render_px"])
    out = []
    for px, gpu in sorted(ROWS[name][3].items()):
        if len(ok) >= 2 and px not in [m["render_px"] for m in ok]:
            step_pk = extrapolate(ok[-2], ok[-1], px)
            out.append({**ok[-1], "render_px": px, "step_peak_gb": step_pk, "gpu_gb": gpu,
                        "peak_gb": ok[-1]["resident_gb"] + step_pk, "extrapolated": True, "ms_step": "-"})
    return out


def minutes(ms_step: float, steps: int) -> str:
    return f"{ms_step * steps / 6e4:.2f}" if steps else "-"


def table_lines(head: str, results, width: int, line) -> list:
    """A table's header, rule and one line per row: ``line(row)``, or the row's error."""
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['row']:{width}} {r.get('render_px', '-')!s:>4} ERROR {r['error']} {r.get('stderr', '')}"
                     if "error" in r else line(r))
    return lines


def census_line(r: dict) -> str:
    c = r["census"]
    steps = r.get("paper_steps") or 0
    hg = f"{c['triton_ms']:.2f} ({c['triton_calls']})" if c.get("hash_grid") == "triton" and c.get("triton_calls") \
        else ("torch" if c.get("hash_grid") == "torch" else "-")
    return (f"{r['row']:24} {r['render_px']!s:>4} {c['launches']:8d} {c['tflop']:7.2f} {c['gb_moved']:9.2f} "
            f"{c['compute_ms']:10.2f} {c['memory_ms']:9.2f} {c['roofline_ms']:11.2f} {hg:>12} "
            f"{c['eager_ms']:8.1f} {steps or '-'!s:>5} {minutes(c['eager_ms'], steps):>6}")


def memory_line(r: dict) -> str:
    res = "/".join(str(v) for v in r["guidance_res"].values()) or "-"
    return (f"{r['row'] + (' (extrapolated)' if r.get('extrapolated') else ''):32} {r['render_px']!s:>4} "
            f"{res:>8} {r.get('points') or '-'!s:>7} {r['resident_gb']:8.2f} {r['step_peak_gb']:8.2f} "
            f"{r['peak_gb']:7.2f} {r.get('gpu_gb') or '-'!s:>6} {r.get('ms_step', '-')!s:>8}")


def census_table(results) -> str:
    """Census rows: per step the kernels, FLOPs and bytes, and the H200 floors they give; then per row the
    modules that take most of the roofline time."""
    head = (f"{'row':24} {'px':>4} {'kernels':>8} {'TFLOP':>7} {'GB moved':>9} {'compute ms':>10} {'memory ms':>9} "
            f"{'roofline ms':>11} {'hash grid ms':>12} {'eager ms':>8} {'steps':>5} {'min':>6}")
    lines = table_lines(head, results, 24, census_line)
    for r in results:
        if "error" in r:
            continue
        lines.append(f"\n{r['row']} at {r['render_px']} px, modules by roofline time (kernels / TFLOP / GB / ms):")
        for k, v in list(r["census"]["modules"].items())[:12]:
            lines.append(f"  {k[:60]:60} {v['launches']:7d} {v['tflop']:7.3f} {v['gb_moved']:8.2f} {v['roofline_ms']:8.2f}")
    return "\n".join(lines) + ("\n(floors on an H200: per kernel max(FLOPs / 989.4 TFLOPS, bytes / 4.8 TB/s), summed, no"
                               " launch or host cost; hash grid: the Triton kernels' H200 times (calls); eager: "
                               f"{LAUNCH_S * 1e6:.1f} us x kernels + {BANDWIDTH_FACTOR} x roofline + hash grid, the "
                               "bench_coarse fit; min: eager x the stage's steps)")


def table(results) -> str:
    if any("census" in r for r in results):
        return census_table(results)
    head = (f"{'row':32} {'px':>4} {'guid.res':>8} {'points':>7} {'resident':>8} {'step pk':>8} {'peak':>7} "
            f"{'GPU':>6} {'ms/step':>8}")
    lines = table_lines(head, results, 32, memory_line)
    return "\n".join(lines) + "\n(GB = GiB, 2^30 bytes, as tests/gpu/check.py reports them; GPU: the measured fp16 peak on an H200, where known)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="*", default=["mi3d-coarse", "ci3d-coarse", "ci3d-refine"])
    p.add_argument("--px", nargs="*", type=int, default=None,
                   help="measure at these render sizes instead of the paper's (two or more: extrapolate to the paper's)")
    p.add_argument("--step", type=int, default=3000, help="the step index the batch and schedules are taken at")
    p.add_argument("--work", default="/tmp/it3d-bench-memory")
    p.add_argument("--out", default=None)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--build", action="store_true", help="build the full-size models under $IT3D_MODEL_ROOT/..")
    p.add_argument("--show", nargs="*", default=None, help="print the table of these --out files and stop")
    p.add_argument("--census", action="store_true",
                   help="instead of the memory, count the step's kernels, FLOPs and bytes (a GPU time floor)")
    p.add_argument("--hash-grid", default="triton", choices=["triton", "torch"],
                   help="--census: count the hash grid as the Triton kernels' H200 times (what auto runs on a GPU) or "
                        "as the torch path's kernels")
    p.add_argument("--sparse", action="store_true",
                   help="coarse rows: a trained-looking field (dense core, empty elsewhere) and its occupancy grid "
                        "instead of the initial blob, whose fog fills every sample")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)

    a = p.parse_args(argv)
    CENSUS.update(on=a.census, hash_grid=a.hash_grid, sparse=a.sparse)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.build:
        build_models(os.path.dirname(os.environ.get("IT3D_MODEL_ROOT", "/tmp/it3d_full/models").rstrip("/")))
        return 0
    if a.show:  # measured rows of several runs; each row extrapolated again from its two largest renders
        rows = [r for f in a.show for r in json.load(open(f)) if not r.get("extrapolated")]
        done = {(r["row"], r.get("render_px")) for r in rows if "error" not in r}
        rows = [r for r in rows if "error" not in r or (r["row"], r.get("render_px")) not in done]
        out = []
        for name in dict.fromkeys(r["row"] for r in rows):
            meas = [r for r in rows if r["row"] == name]
            out += sorted(meas, key=lambda r: r.get("render_px", 0)) + extrapolated(name, meas)
        log(table(out))
        return 0
    if a.child:
        r = measure_row(a.child, a.work, a.px[0], a.step)
        print("RESULT " + json.dumps(r), flush=True)
        return 0
    if "IT3D_MODEL_ROOT" not in os.environ:
        raise SystemExit("set IT3D_MODEL_ROOT (the full-size models; --build makes them)")
    results = []
    for name in a.rows:
        targets = ROWS[name][3]
        meas = []
        for px in a.px or sorted(targets):
            log(f"{name} at {px} px ...")
            r = run_child(name, a.work, px, a.step, a.timeout)
            log("  " + json.dumps(r))
            results.append(r)
            meas.append(r)
        results += extrapolated(name, meas)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(results, f, indent=1)
    log("\n" + table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
