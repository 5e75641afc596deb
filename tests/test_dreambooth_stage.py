"""Multi-modal DreamBooth stage on the tiny Stable Diffusion, driven by Lightning through it3d.runner.cli:
schedule order and proportions, weights that change, class images cached, the saved pipeline, resume."""
import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from it3d.core import hub
from it3d.core.config import ConfigError
from it3d.data.dreambooth_data import DreamBoothDataModule, entry_at, modality_image
from it3d.runner.cli import prepare_config, run_stage
from it3d.systems.dreambooth import training_target
from it3d.testing import tiny_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "stages", "dreambooth.yaml")
DEV = {"accelerator": "cpu", "devices": 1, "device": "cpu"}


def make_inputs(folder):
    """A 48 x 48 RGBA photo with hand-made depth / normal maps beside it (no preprocessing models)."""
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[8:40, 12:36] = (40, 90, 200, 255)
    Image.fromarray(rgba).save(folder / "box.png")
    disp = np.zeros((48, 48), np.uint8)
    disp[8:40, 12:36] = np.linspace(60, 250, 24, dtype=np.float32).astype(np.uint8)[None]
    Image.fromarray(disp).save(folder / "box_depth.png")
    normal = np.full((48, 48, 3), (128, 128, 255), np.uint8)
    Image.fromarray(normal).save(folder / "box_normal.png")
    return str(folder / "box.png")


def stage_cfg(tmp_path, *extra):
    image = make_inputs(tmp_path)
    overrides = [
        f"data.image_path={image}", "data.resolution=64", "data.step_scale=0.04",
        "data.caption=a photo of a small blue box on a table", "data.require_normal=true",
        f"system.pretrained_model_name_or_path={tiny_model_dir('sd')}", "system.num_class_images=2",
        "system.class_inference_steps=2", "system.class_batch_size=2", "system.sample_steps=2",
        "system.optimizer.args.weight_decay=0.0", f"exp_root_dir={tmp_path / 'out'}", "use_timestamp=false",
        "trainer.enable_progress_bar=false", f"system.class_cache_dir={tmp_path / 'class_cache'}", *extra]
    return prepare_config([CONFIG], overrides, device="cpu")


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_dreambooth_stage_trains_in_order_and_saves_a_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    cfg, parsed = stage_cfg(tmp_path)
    captured = {}
    import it3d.systems.dreambooth as db

    orig_end = db.DreamBoothSystem.on_train_end

    def keep(self):
        captured["system"] = self
        orig_end(self)

    db.DreamBoothSystem.on_train_end = keep
    try:
        trial = run_stage(cfg, parsed, "train", DEV)
    finally:
        db.DreamBoothSystem.on_train_end = orig_end
    system = captured["system"]
    # 25 / 50 / 50 / 75 steps x 0.04 -> 1 / 2 / 2 / 3, in the order mask, depth, normal, rgb
    assert [m for _, m, _ in system.history] == ["mask", "depth", "depth", "normal", "normal", "rgb", "rgb", "rgb"]
    assert [s for s, _, _ in system.history] == list(range(8))
    prompts = dict((m, p) for _, m, p in system.history)
    assert prompts == {"mask": "a foreground mask of sks small blue box", "depth": "a depth map of sks small blue box",
                       "normal": "a normal map of sks small blue box", "rgb": "a rgb photo of sks small blue box"}
    # class images: generated once by the base model, cached with their settings
    class_dir = os.path.join(trial, "save", "class_images")
    assert sorted(os.listdir(class_dir)) == ["0000.png", "0001.png", "info.json", "timing.json"]
    timing = json.load(open(os.path.join(class_dir, "timing.json")))  # what the GPU budget projects from
    assert (timing["images"], timing["reused"], timing["steps"], timing["sampler"]) == (2, 0, 2, "dpm-solver++")
    assert timing["seconds"] > 0 and timing["batch_size"] == 2 and timing["load_seconds"] > 0
    # one batch of 2 images; one stamp per sampler step, in order, inside the batch's time
    [batch] = timing["batches"]
    assert batch["images"] == 2 and len(batch["step_ends"]) == 2
    assert 0 < batch["step_ends"][0] <= batch["step_ends"][1] <= batch["seconds"] <= timing["seconds"]
    assert json.load(open(os.path.join(class_dir, "info.json")))["prompt"] == "a photo of small blue box"
    assert Image.open(os.path.join(class_dir, "0000.png")).size == (64, 64)

    pipe_dir = os.path.join(trial, "save", "pipeline")
    assert not [d for d in os.listdir(os.path.join(trial, "save")) if d.startswith(".pipeline")]  # temp dirs gone
    info = json.load(open(os.path.join(pipe_dir, "it3d_dreambooth.json")))
    assert info["class_name"] == "small blue box" and info["steps"] == [1, 2, 2, 3]
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
    base_unet = UNet2DConditionModel.from_pretrained(tiny_model_dir("sd"), subfolder="unet")
    base_text = CLIPTextModel.from_pretrained(tiny_model_dir("sd"), subfolder="text_encoder")
    for tuned, base in ((pipe.unet, base_unet), (pipe.text_encoder, base_text)):
        new, old = state(tuned), state(base)
        diffs = [(new[k] - old[k]).abs().max().item() for k in old if old[k].is_floating_point()]
        # AdamW, lr 1e-6, no weight decay: every parameter moves by at most ~lr per step (8 steps)
        assert max(diffs) > 0 and max(diffs) < 8 * 1e-6 * 1.5
    assert torch.equal(state(pipe.unet)["conv_in.weight"], system.unet.state_dict()["conv_in.weight"].cpu())
    hub_unet = hub.load(UNet2DConditionModel, pipe_dir, subfolder="unet", device="cpu")
    assert torch.equal(hub_unet.conv_in.weight, pipe.unet.conv_in.weight)
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = hub.load(StableDiffusionImg2ImgPipeline, pipe_dir, dtype="fp32", device="cpu")  # the enhancer's load
    assert torch.equal(img2img.text_encoder.get_input_embeddings().weight,
                       pipe.text_encoder.get_input_embeddings().weight)
    img = pipe("a rgb photo of sks small blue box", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3)
    assert os.path.isfile(os.path.join(trial, "ckpts", "last.ckpt"))


def test_dreambooth_resume_continues_the_schedule_and_rgb_only_ablation(tmp_path):
    two = ('data.modalities=[{modality: mask, prompt: "a foreground mask of {identifier} {class_name}", steps: 25}, '
           '{modality: rgb, prompt: "a rgb photo of {identifier} {class_name}", steps: 75}]')  # 1 + 3 steps
    cfg, parsed = stage_cfg(tmp_path, two, "trainer.max_steps=2")
    trial = run_stage(cfg, parsed, "train", DEV)
    ckpt = os.path.join(trial, "ckpts", "last.ckpt")
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2
    stamp = os.path.getmtime(os.path.join(trial, "save", "class_images", "0000.png"))

    import it3d.systems.dreambooth as db

    seen = []
    orig = db.DreamBoothSystem.training_step

    def spy(self, batch, batch_idx):
        out = orig(self, batch, batch_idx)
        seen.append(self.history[-1][:2])
        return out

    db.DreamBoothSystem.training_step = spy
    try:
        cfg2, parsed2 = stage_cfg(tmp_path, two, "trainer.max_steps=100", f"resume={ckpt}")
        run_stage(cfg2, parsed2, "train", DEV)
    finally:
        db.DreamBoothSystem.training_step = orig
    assert seen == [(2, "rgb"), (3, "rgb")]
    assert os.path.getmtime(os.path.join(trial, "save", "class_images", "0000.png")) == stamp  # reused
    assert os.path.isdir(os.path.join(trial, "save", "pipeline"))

    rgb_only = 'data.modalities=[{modality: rgb, prompt: "a rgb photo of {identifier} {class_name}", steps: 75}]'
    cfg3, parsed3 = stage_cfg(tmp_path, rgb_only, "tag=rgb", "system.prior_preservation=false")
    from it3d.core import registry

    dm = registry.get("datamodule", "dreambooth")(cfg3.data, path="data")
    dm.setup("fit")
    assert dm.schedule == [("rgb", "a rgb photo of sks small blue box", 3)] and dm.total_steps == 3


def test_training_target_by_hand():
    from diffusers import DDPMScheduler

    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 700])
    eps = DDPMScheduler(prediction_type="epsilon")
    assert torch.equal(training_target(eps, latents, noise, t), noise)
    v = DDPMScheduler(prediction_type="v_prediction")
    ab = v.alphas_cumprod[t].reshape(2, 1, 1, 1)
    expect = ab.sqrt() * noise - (1 - ab).sqrt() * latents  # v = sqrt(abar) eps - sqrt(1 - abar) x0
    assert torch.allclose(training_target(v, latents, noise, t), expect, atol=1e-6)


def test_schedule_and_modality_images():
    sched = [("mask", "p0", 25), ("depth", "p1", 50), ("normal", "p2", 50), ("rgb", "p3", 75)]
    assert [entry_at(sched, s) for s in (0, 24, 25, 74, 75, 124, 125, 199, 200, 500)] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    mask = torch.tensor([[0.0, 1.0, 1.0]]).reshape(1, 1, 3, 1)
    depth = torch.tensor([[9.0, 2.0, 4.0]]).reshape(1, 1, 3, 1)
    img = modality_image("depth", torch.ones(1, 1, 3, 3), mask, depth)
    assert img[0, 0, :, 0].tolist() == [0.0, 1.0, 0.0]  # near = bright over the mask, black outside
    # world normals facing a camera at azimuth 90 (+y) are camera-space +z: (0.5, 0.5, 1); black background
    from it3d.core.cameras import spherical_c2w

    normal = torch.tensor([[0.0, 1.0, 0.0]]).expand(1, 1, 3, 3)
    img = modality_image("normal", torch.ones(1, 1, 3, 3), mask, normal=normal, c2w=spherical_c2w(0.0, 90.0, 1.0)[None])
    assert torch.allclose(img[0, 0, 1], torch.tensor([0.5, 0.5, 1.0]), atol=1e-6)
    assert img[0, 0, 0].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="did you mean 'normal'"):
        modality_image("normals", torch.ones(1, 1, 3, 3), mask)


def test_bad_modality_config_names_the_key(tmp_path):
    cfg, _ = stage_cfg(tmp_path, 'data.modalities=[{modality: rgbb, prompt: "x", steps: 1}]')
    with pytest.raises(ConfigError, match="data.modalities.0.modality"):
        DreamBoothDataModule(cfg.data, path="data")


def test_each_prompt_trains_on_its_own_modality_with_the_prior_term(tmp_path, monkeypatch):
    """What reaches the diffusion loss at every step: [the step's modality image, a class image] with
    [that modality's prompt, the class prompt]; the loss is instance + prior_loss_weight * prior."""
    from it3d.runner.cli import build_components

    cfg, parsed = stage_cfg(tmp_path)
    dm, system = build_components(cfg, parsed, str(tmp_path / "trial"), resumed=False)
    dm.setup("fit")
    system.class_name = dm.class_name
    system.class_images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(system, "log", lambda *a, **k: None)
    calls = []

    def spy(images, prompts):
        calls.append((images.clone(), list(prompts)))
        return torch.tensor([0.7, 0.2])[:len(prompts)]

    monkeypatch.setattr(system, "diffusion_loss", spy)
    batch = dm._batch
    imgs, schedule = batch["images"], batch["schedule"]
    assert system.cfg.prior_preservation and system.cfg.prior_loss_weight == 1.0
    for a in imgs:  # four different images: a prompt paired with the wrong one would show
        assert all(not torch.allclose(imgs[a], imgs[b]) for b in imgs if b != a), a
    for step in range(dm.total_steps):
        system.set_step(step)
        loss = system.training_step(batch, 0)
        modality, prompt, _ = schedule[entry_at(schedule, step)]
        images, prompts = calls[-1]
        assert torch.equal(images[0], imgs[modality][0]) and prompts[0] == prompt, (step, modality)
        assert torch.equal(images[1], system.class_images[step % 2]) and prompts[1] == system.class_prompt
        assert float(loss) == pytest.approx(0.7 + 1.0 * 0.2)
    assert [m for m, _, _ in schedule] == ["mask", "depth", "normal", "rgb"] and len(calls) == 8


def test_memory_options_checkpointing_8bit_states_and_one_half_precision_save(tmp_path, caplog):
    """Gradient checkpointing on by default (lower peak, same loss), AdamW8bit keeps 8-bit states, the
    pipeline is written once, in save_dtype, from a CPU copy of the trained weights."""
    import logging

    from safetensors import safe_open

    from it3d.core.profiling import peak_memory
    from it3d.runner.cli import build_components
    from it3d.systems.dreambooth import saved_dtype

    assert saved_dtype("auto", "cuda:0") == torch.float16 and saved_dtype("auto", "cpu") == torch.float32
    assert saved_dtype("bf16", "cpu") == torch.bfloat16
    cfg, parsed = stage_cfg(tmp_path, "system.save_dtype=fp16", "system.optimizer.name=AdamW8bit",
                            "system.optimizer.args.lr=1e-3", "after_train=[export]")
    _, system = build_components(cfg, parsed, str(tmp_path / "probe"), resumed=False)
    assert system.unet.is_gradient_checkpointing and system.text_encoder.is_gradient_checkpointing
    images = torch.rand(2, 64, 64, 3)
    peaks, losses = {}, {}
    for ckpt in (True, False, True):
        (system.unet.enable_gradient_checkpointing if ckpt else system.unet.disable_gradient_checkpointing)()
        torch.manual_seed(0)
        with peak_memory() as m:
            loss = system.diffusion_loss(images, ["a photo", "a photo"]).mean()
            loss.backward()
        system.zero_grad(set_to_none=True)
        peaks[ckpt], losses[ckpt] = m.peak_bytes, float(loss)
    print(f"tiny DreamBooth step peak: checkpointing {peaks[True] / 1e6:.1f} MB, without {peaks[False] / 1e6:.1f} MB")
    assert losses[True] == pytest.approx(losses[False], rel=1e-6) and peaks[True] < peaks[False]

    with caplog.at_level(logging.INFO, logger="it3d"):
        trial = run_stage(cfg, parsed, "train", DEV)  # then --export (after_train) in the same process
    saves = [r.getMessage() for r in caplog.records if "pipeline saved" in r.getMessage()]
    assert len(saves) == 1 and "float16" in saves[0]  # --train's export finds it saved: written once
    assert any("pipeline already saved" in r.getMessage() for r in caplog.records)
    ckpt = torch.load(os.path.join(trial, "ckpts", "last.ckpt"), map_location="cpu", weights_only=False)

    def tensors(node):
        if torch.is_tensor(node):
            return [node]
        items = node.values() if isinstance(node, dict) else node if isinstance(node, (list, tuple)) else []
        return [t for v in items for t in tensors(v)]

    states = tensors(ckpt["optimizer_states"][0]["state"])
    assert any(t.dtype == torch.uint8 and t.numel() >= 4096 for t in states)  # 8-bit moments of the large tensors
    unet_file = os.path.join(trial, "save", "pipeline", "unet", "diffusion_pytorch_model.safetensors")
    with safe_open(unet_file, "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert {v.dtype for v in saved.values()} == {torch.float16}
    trained = ckpt["state_dict"]["unet.conv_in.weight"]
    assert torch.equal(saved["conv_in.weight"], trained.half())  # the trained weights, rounded once


def test_adamw_steps_in_bounded_groups_without_a_weight_sized_temporary(tmp_path):
    """The DreamBooth optimiser is torch's multi-tensor AdamW (``foreach``, CUDA's default) over consecutive groups
    of at most ``system.optimizer_group_mb``: after its first step (which allocates the two moments) a step
    allocates one group's temporary, where one group allocates all trained weights' (4.5 GiB for SD 2's UNet +
    text encoder), and it launches a few multi-tensor kernels per group where one tensor at a time launches
    several per tensor. The grouped step computes exactly what the one-group step does."""
    from it3d.core.profiling import op_census, peak_allocated
    from it3d.runner.cli import build_components

    cfg, parsed = stage_cfg(tmp_path, "system.optimizer.args.weight_decay=0.01")
    _, system = build_components(cfg, parsed, str(tmp_path / "probe"), resumed=False)
    params = [p for p in system.parameters() if p.requires_grad]
    sizes = [p.numel() * p.element_size() for p in params]
    nbytes, largest = sum(sizes), max(sizes)
    limit_mb = nbytes / 5 / 2 ** 20  # about five groups
    system.cfg.optimizer_group_mb = limit_mb
    opt = system.configure_optimizers()
    assert type(opt) is torch.optim.AdamW and opt.defaults["foreach"] is True and opt.defaults["lr"] == 1e-6
    groups = [g["params"] for g in opt.param_groups]
    assert [id(p) for g in groups for p in g] == [id(p) for p in params]  # every tensor once, in order
    group_bytes = [sum(p.numel() * p.element_size() for p in g) for g in groups]
    assert len(groups) >= 5 and all(b <= limit_mb * 2 ** 20 or len(g) == 1 for g, b in zip(groups, group_bytes))
    assert all(g["weight_decay"] == 1e-2 for g in opt.param_groups)

    def optimizer(kind, ps):
        if kind == "grouped":
            return opt
        return torch.optim.AdamW(ps, lr=1e-6, weight_decay=1e-2, foreach=kind == "one group")

    steps, launches, after = {}, {}, {}
    start = [copy.deepcopy(p) for p in params]
    for kind in ("grouped", "one group", "one tensor"):
        ps = params if kind == "grouped" else [copy.deepcopy(p) for p in start]
        o = optimizer(kind, ps)
        peaks = []
        for i in range(2):
            for p in ps:
                p.grad = torch.full_like(p, 0.5 + i)
            with peak_allocated("cpu", resident=False) as m:
                o.step()
            peaks.append(m.peak_bytes)
        for p in ps:
            p.grad = torch.ones_like(p)
        with op_census() as c:
            o.step()
        steps[kind], launches[kind], after[kind] = peaks, c.total.launches, [p.detach().clone() for p in ps]
        o.zero_grad(set_to_none=True)
    assert steps["grouped"][0] >= 2 * nbytes  # exp_avg + exp_avg_sq
    assert max(group_bytes) <= steps["grouped"][1] <= 1.5 * max(group_bytes) < nbytes  # one group's temporary
    assert steps["one group"][1] >= nbytes  # the weight-sized temporary
    assert steps["one tensor"][1] <= 4 * largest
    assert all(torch.equal(a, b) for a, b in zip(after["grouped"], after["one group"]))
    assert launches["grouped"] < len(params) <= launches["one tensor"] / 5
    cfg8, parsed8 = stage_cfg(tmp_path, "system.optimizer.name=AdamW8bit")
    _, system8 = build_components(cfg8, parsed8, str(tmp_path / "probe8"), resumed=False)
    opt8 = system8.configure_optimizers()  # other optimisers: no torch-only argument, one group
    assert "foreach" not in opt8.defaults and len(opt8.param_groups) == 1
    cfg1, parsed1 = stage_cfg(tmp_path, "system.optimizer.args.foreach=false")
    _, system1 = build_components(cfg1, parsed1, str(tmp_path / "probe1"), resumed=False)
    assert len(system1.configure_optimizers().param_groups) == 1  # one tensor at a time needs no groups


def test_optimizer_groups_resume_across_groupings_and_fused_drops_the_foreach_default(tmp_path):
    """A checkpoint of the one-group optimiser (older it3d, or foreach: false) resumes under the grouped one with
    its moments, and the reverse; ``fused: true`` gets a fused AdamW (no foreach default, which torch refuses
    with it) in one group; ``foreach: null`` (CUDA's choice) is grouped too."""
    from it3d.runner.cli import build_components

    def system_with(*extra):
        cfg, parsed = stage_cfg(tmp_path, *extra)
        return build_components(cfg, parsed, str(tmp_path / f"probe{len(extra)}{hash(extra) % 997}"), resumed=False)[1]

    one = system_with("system.optimizer.args.foreach=false")
    grouped = system_with("system.optimizer_group_mb=0.05")
    grouped.load_state_dict(one.state_dict())
    opt1 = one.configure_optimizers()
    params1 = [p for g in opt1.param_groups for p in g["params"]]
    for p in params1:
        p.grad = torch.full_like(p, 0.25)
    opt1.step()
    state = opt1.state_dict()
    opt2 = grouped.configure_optimizers()
    assert len(opt1.param_groups) == 1 and len(opt2.param_groups) >= 3
    with pytest.raises(ValueError, match="parameter group"):  # what Lightning would meet without the hook
        opt2.load_state_dict(state)
    ckpt = {"optimizer_states": [copy.deepcopy(state)]}
    grouped.on_load_checkpoint(ckpt)
    opt2.load_state_dict(ckpt["optimizer_states"][0])
    params2 = [p for g in opt2.param_groups for p in g["params"]]
    for i in (0, len(params1) // 2, len(params1) - 1):
        assert torch.equal(opt2.state[params2[i]]["exp_avg"], opt1.state[params1[i]]["exp_avg"])
        assert float(opt2.state[params2[i]]["step"]) == 1.0
    back = {"optimizer_states": [opt2.state_dict()]}  # and the grouped checkpoint under one group
    one.on_load_checkpoint(back)
    assert len(back["optimizer_states"][0]["param_groups"]) == 1
    opt1.load_state_dict(back["optimizer_states"][0])
    fused = system_with("system.optimizer.args.fused=true").configure_optimizers()
    assert fused.defaults["fused"] is True and not fused.defaults["foreach"] and len(fused.param_groups) == 1
    auto = system_with("system.optimizer.args.foreach=null", "system.optimizer_group_mb=0.05").configure_optimizers()
    assert auto.defaults["foreach"] is None and len(auto.param_groups) >= 3


def test_class_images_shared_across_runs_keyed_by_settings_and_model(tmp_path, monkeypatch):
    """A second photo of the same class reuses the first run's class images (no pipeline call, hard links
    to the same files); other settings or another model make new ones; the sampler is DPM-Solver++ (2M)."""
    import it3d.systems.dreambooth as db
    from diffusers import DPMSolverMultistepScheduler

    calls = []
    orig = db.DreamBoothSystem._generate_class_images

    def spy(self, missing, paths, resolution):
        calls.append(list(missing))
        return orig(self, missing, paths, resolution)

    monkeypatch.setattr(db.DreamBoothSystem, "_generate_class_images", spy)
    seen = []
    orig_sched = db.class_scheduler

    def sched_spy(name, config):
        s = orig_sched(name, config)
        seen.append(s)
        return s

    monkeypatch.setattr(db, "class_scheduler", sched_spy)

    def class_images(name, *extra):
        os.makedirs(tmp_path / name, exist_ok=True)
        cfg, parsed = stage_cfg(tmp_path / name, "trainer.max_steps=1", f"system.class_cache_dir={tmp_path / 'shared'}",
                                *extra)
        trial = run_stage(cfg, parsed, "train", DEV)
        return os.path.join(trial, "save", "class_images")

    first = class_images("one")
    assert calls == [[0, 1]]
    assert isinstance(seen[0], DPMSolverMultistepScheduler) and seen[0].config.algorithm_type == "dpmsolver++" \
        and seen[0].config.solver_order == 2
    second = class_images("two")  # another trial, same class / settings / model
    assert calls == [[0, 1]]  # nothing generated
    for n in ("0000.png", "0001.png"):
        assert os.path.samefile(os.path.join(first, n), os.path.join(second, n))
    assert not os.path.exists(os.path.join(second, "timing.json"))
    class_images("three", "system.class_seed=7")  # other settings: new images
    assert calls == [[0, 1], [0, 1]]
    assert len(os.listdir(tmp_path / "shared")) == 2
    # the same settings and model path, but the model's weights replaced: new images
    other = tmp_path / "other-sd"
    shutil.copytree(tiny_model_dir("sd"), other)
    class_images("four", f"system.pretrained_model_name_or_path={other}")
    class_images("five", f"system.pretrained_model_name_or_path={other}")
    assert calls == [[0, 1], [0, 1], [0, 1]]  # "five" reused "four"'s
    unet = next(p for p in (other / "unet").iterdir() if p.suffix in (".safetensors", ".bin"))
    os.utime(unet, ns=(10 ** 9, 10 ** 9))
    class_images("six", f"system.pretrained_model_name_or_path={other}")
    assert calls == [[0, 1], [0, 1], [0, 1], [0, 1]]
    # a sampler that is not offered fails at parse time with the key
    os.makedirs(tmp_path / "seven")
    with pytest.raises(ConfigError, match="system.class_sampler"):
        stage_cfg(tmp_path / "seven", "system.class_sampler=euler")
