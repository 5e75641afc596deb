"""``dreambooth`` system: multi-modal DreamBooth fine-tuning of Stable Diffusion (Customize-It-3D sec. 3.1).

The UNet and (``train_text_encoder``) the CLIP text encoder are fine-tuned on the reference's
instance images -- mask, depth, normal, rgb, one modality per step in the order and step counts of
the ``dreambooth`` datamodule's schedule -- with the standard DreamBooth loss: the noise-prediction
MSE (the target follows ``scheduler.config.prediction_type``: epsilon, v_prediction or sample) plus
``prior_loss_weight`` x the same loss on class images ("a photo of <class>") that the base model
generates once before training (``num_class_images``, ``class_batch_size`` per pipeline call, in the
run's precision, with ``class_sampler``: DPM-Solver++ (2M) by default, 25 steps). They are cached
twice: in ``<save>/class_images`` with the settings that made them (a rerun or a resume reuses them
and makes only the missing ones), and in the shared ``class_cache_dir`` under a key of those
settings plus the base model's identity (its resolved folder and weight files), so another photo of
the same class with the same model reuses them (hard links into the trial, copies across devices).

Precision: the trained UNet and text encoder keep fp32 master weights and, when the run's
``precision`` is half (fp16 on CUDA by default, or bf16), train in Lightning's mixed precision
(``trains_pretrained``); the frozen VAE and the class-image pipeline (a separate copy of the base
model, freed after use) run in the run's precision. Sampling with the trained fp32 UNet through
the half VAE (``--test``) runs under autocast.

Memory: gradient checkpointing is on by default (the UNet's and text encoder's activations are
recomputed in the backward); AdamW steps one tensor at a time (no weight-sized temporary in its step:
4.5 GiB less at the step's peak, which is the stage's); ``optimizer.name: AdamW8bit`` keeps the AdamW states in 8 bits
(bitsandbytes), ~7 GB less than fp32 states for the SD 2 UNet + text encoder.

Training stops after the schedule's total step count. At the end (and on ``--export``; a
``--train`` run's export finds it saved and does not write it again) the fine-tuned model is
written once as a diffusers ``StableDiffusionPipeline`` folder at ``<save>/pipeline`` (written to
a temp dir, then renamed) in ``save_dtype`` (``auto``: the run's precision, fp16 on CUDA; the copy
is made on the CPU), with ``it3d_dreambooth.json`` naming the identifier, class and per-modality
prompts it was trained with. ``--test`` samples one image
per modality prompt into ``<save>/test``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..core import hub, io
from ..core.config import ConfigError
from ..core.errors import It3dError
from ..core.profiling import sync_if_timing
from ..core.ranges import check
from ..core.registry import register
from ..core.typing import Float, Int, Tensor
from ..data.dreambooth_data import entry_at
from .base import BaseSystem

log = logging.getLogger("it3d")
PIPELINE_INFO = "it3d_dreambooth.json"


def saved_dtype(name: str, device: Any) -> torch.dtype:
    """``save_dtype`` -> a dtype: ``auto`` = the run's precision on ``device`` (fp16 on CUDA, fp32 on CPU);
    fp16 / bf16 / fp32 as named (also on a CPU: the weights are only written)."""
    return hub.resolve_dtype("auto", device) if name == "auto" else hub.DTYPES[name]


def cpu_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``module`` on the CPU with floating weights in ``dtype``, built parameter by parameter
    (``deepcopy`` with the converted tensors pre-seeded), so the device never holds a second copy."""
    memo = {}
    for t in list(module.parameters()) + list(module.buffers()):
        data = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype, copy=True)
        memo[id(t)] = torch.nn.Parameter(data, requires_grad=False) if isinstance(t, torch.nn.Parameter) else data
    return copy.deepcopy(module, memo)


def training_target(scheduler, latents: Float[Tensor, "B C h w"], noise: Float[Tensor, "B C h w"],
                    timesteps: Int[Tensor, "B"]) -> Float[Tensor, "B C h w"]:
    """What the UNet must predict for ``scheduler.config.prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise It3dError(f"unsupported scheduler prediction_type '{kind}' (epsilon, v_prediction or sample)")


CLASS_SAMPLERS = ("dpm-solver++", "ddim")


def class_scheduler(name: str, config):
    """The class-image sampler: ``dpm-solver++`` = DPM-Solver++ (2M), multistep, second order (Lu et al.
    2022: ~20-25 steps match 50 steps of first-order samplers), or ``ddim``."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "dpm-solver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    raise It3dError(f"system.class_sampler: unknown sampler '{name}' (use {', '.join(CLASS_SAMPLERS)})")


def model_identity(id_or_path: str) -> dict:
    """Where the model loads from and, for a folder, the size and mtime of its weight and config files:
    a changed or replaced model gets new class images."""
    status, path = hub.locate(id_or_path)
    files = {}
    if path and os.path.isdir(path):
        for sub, _, fnames in sorted(os.walk(path)):
            for n in sorted(fnames):
                if n.endswith((".safetensors", ".bin", ".json")):
                    st = os.stat(os.path.join(sub, n))
                    files[os.path.relpath(os.path.join(sub, n), path)] = [st.st_size, st.st_mtime_ns]
    return {"status": status, "path": path, "files": files}


def _same_info(folder: str, info: dict) -> bool:
    try:
        with open(os.path.join(folder, "info.json"), encoding="utf-8") as f:
            return json.load(f) == info
    except (OSError, ValueError):
        return False


def _link_or_copy(src: str, dst: str) -> None:
    tmp = dst + ".tmp.png"
    try:
        if os.path.exists(tmp):
            os.remove(tmp)
        os.link(src, tmp)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


_MULTI_TENSOR = (torch.optim.Adam, torch.optim.AdamW)  # torch's optimisers with a multi-tensor (foreach) step


@register("dreambooth", kind="system")
class DreamBoothSystem(BaseSystem):
    trains_pretrained = True  # the runner trains it in mixed precision when the run's precision is half

    @dataclass
    class Config(BaseSystem.Config):
        pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-2-base"
        train_text_encoder: bool = True
        prior_preservation: bool = True
        prior_loss_weight: float = 1.0
        class_prompt: str = "a photo of {class_name}"
        num_class_images: int = 200
        class_inference_steps: int = 25
        class_guidance_scale: float = 7.5
        class_batch_size: int = 4
        class_seed: int = 0
        class_sampler: str = check("dpm-solver++", choices=CLASS_SAMPLERS)  # the class-image pipeline's scheduler
        class_cache_dir: str = ".it3d_cache/class_images"  # shared across runs; "" = only the trial's own copy
        vae_dtype: str = "auto"  # the frozen VAE (auto: the run's precision); the trained UNet / text encoder keep fp32 weights
        gradient_checkpointing: bool = True  # recompute the UNet's / text encoder's activations in the backward
        optimizer_group_mb: float = check(256.0, gt=0)  # the multi-tensor Adam / AdamW steps groups of at most this
        save_dtype: str = "auto"  # weights of the saved pipeline: auto (the run's precision: fp16 on CUDA) | fp32 | fp16 | bf16
        sample_steps: int = 50  # --test samples
        sample_guidance_scale: float = 7.5
        optimizer: dict = field(default_factory=lambda: {"name": "AdamW", "args": {"lr": 1e-6, "weight_decay": 1e-2}})

    cfg: Config

    def configure(self, **kwargs) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        c = self.cfg
        if c.save_dtype not in ("auto", "fp32", "fp16", "bf16"):
            raise ConfigError(f"system.save_dtype must be auto, fp32, fp16 or bf16, got '{c.save_dtype}'")
        name, key = c.pretrained_model_name_or_path, "system.pretrained_model_name_or_path"
        self.tokenizer = hub.load(AutoTokenizer, name, subfolder="tokenizer", config_key=key)
        # trained copies: never the hub's shared cached instances
        self.unet = hub.load(UNet2DConditionModel, name, subfolder="unet", dtype="fp32", config_key=key, cache=False)
        self.text_encoder = hub.load(CLIPTextModel, name, subfolder="text_encoder", dtype="fp32", config_key=key,
                                     cache=False)
        self.noise_scheduler = hub.load(DDPMScheduler, name, subfolder="scheduler", config_key=key)
        vae = hub.load(AutoencoderKL, name, subfolder="vae", dtype=c.vae_dtype, device=self.run_device, config_key=key)
        self._frozen = {"vae": vae}  # kept out of the state dict / checkpoints
        self.unet.train().requires_grad_(True)
        self.text_encoder.train(c.train_text_encoder).requires_grad_(c.train_text_encoder)
        if c.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if c.train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()
        self.history: List[tuple] = []  # (step, modality, prompt) of every training step of this process
        self.class_images: Optional[Tensor] = None
        self.class_name = ""

    @property
    def vae(self):
        return self._frozen["vae"]

    def optimizer_defaults(self, optimizer_cls) -> Dict[str, Any]:
        """torch's Adam / AdamW with its multi-tensor step (``foreach=True``, CUDA's default: ~60 kernel launches
        an op for the SD 2 UNet + text encoder), over groups of at most ``optimizer_group_mb``
        (:meth:`optimizer_groups`). With a single group its step allocates a temporary the size of all trained
        weights (the sqrt of the second moments): 4.5 GiB on top of weights, gradients and moments (4.5 + 4.5 +
        9.0 GiB), the H200's 23.1 GiB DreamBooth peak. One tensor at a time (``foreach: false``) the temporary is
        the largest tensor's, but the step launches ~9,000 kernels (estimated ~0.1 s a step on an H200 by
        ``bench_memory.py --census``'s model; not measured). ``fused=True`` has neither cost, but Lightning refuses gradient clipping -- ``--max_grad_norm
        1`` here -- with it under mixed precision. ``system.optimizer.args.foreach`` chooses otherwise; other
        optimisers (AdamW8bit) get nothing."""
        return {"foreach": True} if optimizer_cls in _MULTI_TENSOR else {}

    def optimizer_groups(self, params: List[Tensor], optimizer_cls, args: Dict[str, Any]) -> list:
        """For the multi-tensor Adam / AdamW: consecutive tensors in groups of at most ``optimizer_group_mb``
        (a larger tensor alone), so its temporary is one group's size; each group steps as its own multi-tensor
        call (``foreach: null`` too: CUDA picks the multi-tensor step then). One tensor at a time, fused, or
        another optimiser: one group."""
        if optimizer_cls not in _MULTI_TENSOR or args.get("foreach") is False or args.get("fused"):
            return params
        limit = self.cfg.optimizer_group_mb * 2 ** 20
        groups: List[List[Tensor]] = []
        size = 0.0
        for p in params:
            n = p.numel() * p.element_size()
            if not groups or size + n > limit:
                groups.append([])
                size = 0.0
            groups[-1].append(p)
            size += n
        return [{"params": g} for g in groups]

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """A checkpoint whose optimiser grouped the same tensors otherwise (written before the groups, or with
        another ``optimizer_group_mb`` / ``foreach``): its per-tensor state (moments, step counts) is kept and its
        groups redrawn as this config groups them, so the resume continues it (Lightning restores the optimiser
        after this hook). Groups with different hyper-parameters are left alone."""
        states = checkpoint.get("optimizer_states") or []
        if len(states) != 1 or not states[0].get("param_groups"):
            return
        old = states[0]["param_groups"]
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in old]
        opt = self.configure_optimizers()
        opt = opt["optimizer"] if isinstance(opt, dict) else opt
        sizes = [len(g["params"]) for g in opt.param_groups]
        flat = [i for g in old for i in g["params"]]
        if sizes == [len(g["params"]) for g in old] or sum(sizes) != len(flat) or any(h != hyper[0] for h in hyper):
            return
        groups, start = [], 0
        for n in sizes:
            groups.append({**hyper[0], "params": flat[start:start + n]})
            start += n
        states[0]["param_groups"] = groups
        log.info(f"dreambooth: the checkpoint's {len(old)} optimiser group(s) regrouped into {len(groups)}")

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "class_name"):
            raise It3dError("the dreambooth system needs the 'dreambooth' datamodule (data_type: dreambooth)")
        self.dm = dm
        self.class_name = dm.class_name
        if stage == "fit":
            self.total_steps = dm.total_steps
            if self.cfg.prior_preservation:
                self.class_images = self.ensure_class_images(dm.cfg.resolution)

    @property
    def class_prompt(self) -> str:
        return self.cfg.class_prompt.format(class_name=self.class_name)

    def pipeline(self, unet=None, text_encoder=None, vae=None):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=vae or self.vae, text_encoder=text_encoder or self.text_encoder,
                                       tokenizer=self.tokenizer, unet=unet or self.unet,
                                       scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def class_image_settings(self, resolution: int) -> dict:
        """What makes the class images: the trial's ``info.json``; with :func:`model_identity`, the cache key."""
        c = self.cfg
        return {"prompt": self.class_prompt, "resolution": resolution, "steps": c.class_inference_steps,
                "sampler": c.class_sampler, "guidance_scale": c.class_guidance_scale, "seed": c.class_seed,
                "model": c.pretrained_model_name_or_path,
                "dtype": str(hub.resolve_dtype("auto", self.run_device)).replace("torch.", "")}

    @torch.no_grad()
    def ensure_class_images(self, resolution: int) -> Float[Tensor, "N R R 3"]:
        """The prior-preservation images, generated by the base weights once and cached (trial and shared)."""
        c = self.cfg
        folder = os.path.join(self.save_dir, "class_images")
        info = self.class_image_settings(resolution)
        if not _same_info(folder, info) and os.path.isdir(folder):
            shutil.rmtree(folder)
        os.makedirs(folder, exist_ok=True)
        io.write_text(os.path.join(folder, "info.json"), json.dumps(info, indent=1))
        names = [f"{i:04d}.png" for i in range(c.num_class_images)]
        shared = None
        if c.class_cache_dir:
            key = dict(info, model_identity=model_identity(c.pretrained_model_name_or_path))
            shared = os.path.join(c.class_cache_dir, hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16])
            os.makedirs(shared, exist_ok=True)
            io.write_text(os.path.join(shared, "info.json"), json.dumps(key, indent=1))
            for n in names:  # reuse what another run made with the same settings and model
                if not os.path.isfile(os.path.join(folder, n)) and os.path.isfile(os.path.join(shared, n)):
                    _link_or_copy(os.path.join(shared, n), os.path.join(folder, n))
        missing = [i for i, n in enumerate(names) if not os.path.isfile(os.path.join(folder, n))]
        reused = len(names) - len(missing)
        if missing:
            log.info(f"dreambooth: generating {len(missing)} class images for '{self.class_prompt}' "
                     f"({c.class_sampler}, {c.class_inference_steps} steps)")
            t0 = time.perf_counter()
            timing = self._generate_class_images(missing, [os.path.join(folder, n) for n in names], resolution)
            if shared is not None:
                for i in missing:
                    _link_or_copy(os.path.join(folder, names[i]), os.path.join(shared, names[i]))
            io.write_text(os.path.join(folder, "timing.json"), json.dumps(  # for the speed tables
                {"images": len(missing), "reused": reused, "steps": c.class_inference_steps, "sampler": c.class_sampler,
                 "batch_size": c.class_batch_size, "seconds": round(time.perf_counter() - t0, 3), **timing}))
        elif reused:
            log.info(f"dreambooth: {reused} class images for '{self.class_prompt}' reused from {shared or folder}")
        from ..core.image import read_image

        paths = [os.path.join(folder, n) for n in names]
        return torch.from_numpy(np.stack([read_image(p)[..., :3] for p in paths])) if paths else None

    def _generate_class_images(self, missing: List[int], paths: List[str], resolution: int) -> Dict[str, Any]:
        """Writes the missing images; returns where the time went, for the speed tables: ``load_seconds``
        and per batch its images, seconds and the end of each sampler step (seconds from the batch's start;
        after a device sync in measuring runs, ``$IT3D_SYNC_TIMING=1``)."""
        from diffusers import StableDiffusionPipeline

        c = self.cfg
        t_load = time.perf_counter()
        # the base model (not the weights being trained, also on a resume), in the run's precision
        pipe = hub.load(StableDiffusionPipeline, c.pretrained_model_name_or_path, dtype="auto",
                        device=self.run_device, config_key="system.pretrained_model_name_or_path", cache=False,
                        safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = class_scheduler(c.class_sampler, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        sync_if_timing(self.run_device)
        timing: Dict[str, Any] = {"load_seconds": round(time.perf_counter() - t_load, 3), "batches": []}
        for start in range(0, len(missing), c.class_batch_size):
            idx = missing[start:start + c.class_batch_size]
            gen = torch.Generator(device=self.run_device).manual_seed(c.class_seed + idx[0])
            ends: List[float] = []
            t0 = time.perf_counter()

            def stamp(_pipe, _i, _t, kwargs):
                sync_if_timing(self.run_device)
                ends.append(round(time.perf_counter() - t0, 4))
                return kwargs

            imgs = pipe([self.class_prompt] * len(idx), num_inference_steps=c.class_inference_steps,
                        guidance_scale=c.class_guidance_scale, height=resolution, width=resolution,
                        generator=gen, output_type="np", callback_on_step_end=stamp).images
            timing["batches"].append({"images": len(idx), "seconds": round(time.perf_counter() - t0, 4),
                                      "step_ends": ends})
            for i, img in zip(idx, imgs):
                tmp = paths[i] + ".tmp.png"
                io.save_image(tmp, img)
                os.replace(tmp, paths[i])  # a killed run never leaves a half-written image behind
        del pipe
        if self.run_device.type == "cuda":
            torch.cuda.synchronize(self.run_device)
            torch.cuda.empty_cache()
        return timing

    # ------------------------------------------------------------------ training
    def encode_prompts(self, prompts: List[str]) -> Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def diffusion_loss(self, images: Float[Tensor, "B H W 3"], prompts: List[str]) -> Float[Tensor, "B"]:
        """Per-image DreamBooth loss: MSE between the UNet's prediction and its target at a random t."""
        x = images.permute(0, 3, 1, 2).to(self.device) * 2.0 - 1.0
        with torch.no_grad():
            latents = self.vae.encode(x.to(self.vae.dtype)).latent_dist.sample()
            latents = latents.float() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred = self.unet(noisy, t, encoder_hidden_states=self.encode_prompts(prompts)).sample
        target = training_target(self.noise_scheduler, latents, noise, t)
        return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)

    def training_step(self, batch: Dict[str, Any], batch_idx: int):
        step = self.true_global_step
        schedule = batch["schedule"]
        modality, prompt, _ = schedule[entry_at(schedule, step)]
        image = batch["images"][modality]
        images, prompts = [image], [prompt]
        if self.class_images is not None:
            ci = self.class_images[step % len(self.class_images)][None].to(image)
            if ci.shape[1:3] != image.shape[1:3]:
                ci = F.interpolate(ci.permute(0, 3, 1, 2), size=image.shape[1:3], mode="bilinear",
                                   antialias=True).permute(0, 2, 3, 1)
            images.append(ci)
            prompts.append(self.class_prompt)
        losses = self.diffusion_loss(torch.cat(images), prompts)
        loss, logs = losses[0], {"instance": losses[0]}
        if len(losses) > 1:
            logs["prior"] = losses[1:].mean()
            loss = loss + self.cfg.prior_loss_weight * logs["prior"]
        logs["modality"] = float(entry_at(schedule, step))
        self.log_terms(logs, loss)
        self.history.append((step, modality, prompt))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.true_global_step >= getattr(self, "total_steps", float("inf")):
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            self.save_pipeline()

    # ------------------------------------------------------------------ outputs
    def save_pipeline(self) -> str:
        """Write ``<save>/pipeline`` atomically (temp dir + rename) and return its path."""
        out = self.get_save_path("pipeline")
        dtype = saved_dtype(self.cfg.save_dtype, self.run_device)
        # a copy in the saved dtype, made on the CPU tensor by tensor (never a second copy on the GPU)
        unet, text_encoder, vae = (cpu_copy(m, dtype) for m in (self.unet, self.text_encoder, self.vae))
        tmp = tempfile.mkdtemp(prefix=".pipeline.", dir=self.save_dir)
        try:
            self.pipeline(unet, text_encoder, vae).save_pretrained(tmp, safe_serialization=True)
            prompts = {m: p for m, p, _ in self.dm.schedule}
            info = {"identifier": self.dm.cfg.identifier, "class_name": self.class_name, "caption": self.dm.caption,
                    "prompts": prompts, "class_prompt": self.class_prompt, "steps": [s for _, _, s in self.dm.schedule],
                    "base_model": self.cfg.pretrained_model_name_or_path}
            io.write_text(os.path.join(tmp, PIPELINE_INFO), json.dumps(info, indent=1))
            old = None
            if os.path.isdir(out):
                old = tempfile.mkdtemp(prefix=".pipeline.old.", dir=self.save_dir)
                os.replace(out, os.path.join(old, "pipeline"))
            os.replace(tmp, out)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        self._saved_at = self.true_global_step
        log.info(f"dreambooth: pipeline saved to {out} ({str(dtype).replace('torch.', '')})")
        return out

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return None

    def on_predict_epoch_end(self) -> None:
        if getattr(self, "_saved_at", None) == self.true_global_step:  # --train's export: saved at the end already
            log.info(f"dreambooth: pipeline already saved at step {self._saved_at}")
            return
        if self.trainer.is_global_zero:
            self.save_pipeline()

    @torch.no_grad()
    def test_step(self, batch, batch_idx):
        pipe = self.pipeline()
        gen = torch.Generator(device=self.device).manual_seed(int(batch["index"]))
        res = self.dm.cfg.resolution
        half = self.vae.dtype if self.vae.dtype != self.unet.dtype else None  # fp32 UNet, half VAE: autocast
        with torch.autocast(self.device.type, dtype=half, enabled=half is not None):
            img = pipe(batch["prompt"], num_inference_steps=self.cfg.sample_steps, height=res, width=res,
                       guidance_scale=self.cfg.sample_guidance_scale, generator=gen, output_type="np").images[0]
        self.save_image(f"test/{int(batch['index']):02d}_{batch['modality']}.png", img)
