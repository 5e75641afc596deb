"""SDS base + stable-diffusion guidance on the tiny SD pipeline (loaded through the hub)."""
import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from it3d.core import hub, registry
from it3d.core.config import ConfigError
from it3d.testing import tiny_model_dir

import it3d.guidance  # noqa: F401  (registers)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_sd(tmp_path, **cfg):
    base = {"pretrained_model_name_or_path": tiny_model_dir("sd"), "resolution": 64, "seed": 0,
            "prompt_processor": {"cache_dir": str(tmp_path / "emb")}}
    base.update(cfg)
    g = registry.get("guidance", "stable-diffusion")(base, path="system.guidance.sd", device=torch.device("cpu"))
    g.set_prompt("a photo of a cat")
    return g


def hand_alphas_cumprod():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).float()


def hand_text(path, prompt):
    tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval()
    ids = tok([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return enc(ids)[0]


def latent_grad(g, monkeypatch, latents, batch, t, noise):
    """Run the guidance on given latents (encode_images replaced) and return d loss / d latents."""
    latents = latents.clone().requires_grad_(True)
    monkeypatch.setattr(g, "encode_images", lambda rgb, b: latents)
    out = g(torch.zeros(latents.shape[0], 64, 64, 3), batch, 0, t=t, noise=noise)
    (grad,) = torch.autograd.grad(out["loss"], latents)
    return out, grad


@pytest.mark.parametrize("weighting,clip", [("sds", None), ("uniform", 0.05)])
def test_sds_gradient_is_weighted_cfg_residual(tmp_path, monkeypatch, weighting, clip):
    path = tiny_model_dir("sd")
    g = make_sd(tmp_path, guidance_scale=7.5, weighting=weighting, grad_clip=clip)
    gen = torch.Generator().manual_seed(1)
    B = 2
    latents = torch.randn(B, 4, 8, 8, generator=gen)
    noise = torch.randn(B, 4, 8, 8, generator=gen)
    t = torch.tensor([250, 520])
    batch = {"elevation": torch.zeros(B), "azimuth": torch.zeros(B), "camera_distances": torch.ones(B)}
    out, grad = latent_grad(g, monkeypatch, latents, batch, t, noise)

    # by hand: forward diffusion, two separate UNet calls, CFG, weighting
    abar = hand_alphas_cumprod()[t].view(B, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    cond = hand_text(path, "a photo of a cat, front view").expand(B, -1, -1)
    uncond = hand_text(path, "").expand(B, -1, -1)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()
    with torch.no_grad():
        eps_c = unet(x_t, t, encoder_hidden_states=cond).sample
        eps_u = unet(x_t, t, encoder_hidden_states=uncond).sample
    eps_hat = eps_u + 7.5 * (eps_c - eps_u)
    w = (1 - abar) if weighting == "sds" else torch.ones_like(abar)
    expected = w * (eps_hat - noise)
    if clip is not None:
        assert expected.abs().max() > clip  # the clamp is exercised
        expected = expected.clamp(-clip, clip)
    torch.testing.assert_close(grad, expected / B, rtol=1e-4, atol=1e-5)
    assert out["t"].item() == pytest.approx(385.0)
    assert out["loss"].item() == pytest.approx(0.5 * (expected ** 2).sum().item() / B, rel=1e-4)


def test_sds_gradient_reaches_rendered_image_not_unet(tmp_path):
    g = make_sd(tmp_path)
    rgb = torch.rand(1, 32, 32, 3, requires_grad=True)
    out = g(rgb, {"elevation": torch.zeros(1), "azimuth": torch.zeros(1)}, 0)
    out["loss"].backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in g.unet.parameters())
    assert set(out) >= {"loss", "t", "grad_norm"} and out["loss"].dim() == 0


def test_timesteps_stay_in_range_and_follow_schedule(tmp_path):
    g = make_sd(tmp_path)
    t = g.sample_timesteps(4000)
    assert t.min() >= 200 and t.max() <= 600 and {200, 600} <= set(t.tolist())
    assert abs(t.float().mean().item() - 400) < 10
    # same seed -> same draws
    assert torch.equal(make_sd(tmp_path).sample_timesteps(50), make_sd(tmp_path).sample_timesteps(50))

    s = make_sd(tmp_path, min_step_percent=0.02, max_step_percent=[0, 0.98, 0.5, 100])
    for step, hi in ((0, 980), (50, 740), (100, 500), (5000, 500)):
        s.do_update_step(0, step)
        t = s.sample_timesteps(3000)
        assert s.max_step == hi and t.min() >= 20 and t.max() == hi


def test_bad_step_range_and_weighting_fail(tmp_path):
    with pytest.raises(ConfigError, match="min_step_percent"):
        make_sd(tmp_path, min_step_percent=0.7, max_step_percent=0.6)
    with pytest.raises(ConfigError, match="system.guidance.sd.weighting"):
        make_sd(tmp_path, weighting="sdss")


def test_two_entries_share_one_unet_and_stay_out_of_checkpoints(tmp_path):
    a = make_sd(tmp_path)
    b = registry.get("guidance", "multimodal-dreambooth")(
        {"pretrained_model_name_or_path": tiny_model_dir("sd"), "resolution": 64}, path="system.guidance.db",
        device=torch.device("cpu"))
    assert a.unet is b.unet and a.vae is b.vae
    assert a.unet is hub.load(UNet2DConditionModel, tiny_model_dir("sd"), subfolder="unet", dtype="auto", device="cpu")
    assert a.dtype == torch.float32 and next(a.unet.parameters()).dtype == torch.float32  # auto on CPU
    assert len(a.state_dict()) == 0 and len(list(a.parameters())) == 0
