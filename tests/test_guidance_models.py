"""clip-d, zero123 and multimodal-dreambooth guidance on tiny models loaded through the hub."""
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPVisionModelWithProjection

from it3d.core import registry
from it3d.core.config import ConfigError
from it3d.guidance.zero123 import CLIPCameraProjection
from it3d.testing import tiny_model_dir

import it3d.guidance  # noqa: F401

CPU = torch.device("cpu")
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


pytestmark = pytest.mark.usefixtures("one_thread")


def reference(size=32):
    g = torch.Generator().manual_seed(3)
    return {"rgb": torch.rand(1, size, size, 3, generator=g), "mask": torch.ones(1, size, size, 1),
            "elevation": torch.zeros(1), "azimuth": torch.zeros(1), "camera_distances": torch.ones(1)}


def views(elev, azim, dist=None):
    elev, azim = torch.tensor(elev, dtype=torch.float32), torch.tensor(azim, dtype=torch.float32)
    return {"elevation": elev, "azimuth": azim, "camera_distances": torch.ones_like(elev) if dist is None else torch.tensor(dist)}


class ImageModule(torch.nn.Module):
    """Stands in for the NeRF: a parameter that renders (through a sigmoid) to an image."""

    def __init__(self, size=32):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(1, size, size, 3, generator=torch.Generator().manual_seed(5)))

    def forward(self):
        return torch.sigmoid(self.logits)


@pytest.fixture(scope="module")
def clipd(tmp_path_factory):
    g = registry.get("guidance", "clip-d")(
        {"pretrained_model_name_or_path": tiny_model_dir("sd"), "clip_model_name_or_path": tiny_model_dir("clip"),
         "resolution": 64, "seed": 0, "prompt_processor": {"cache_dir": str(tmp_path_factory.mktemp("emb"))}},
        path="system.guidance.clip_d", device=CPU)
    g.set_prompt("a photo of a cat")
    g.set_reference(reference())
    return g


def test_clip_d_below_threshold_is_the_clip_loss_with_gradient_to_the_image(clipd, monkeypatch):
    sd, clip = tiny_model_dir("sd"), tiny_model_dir("clip")
    nerf = ImageModule()
    rgb = nerf()
    rgb.retain_grad()
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, 8, 8, generator=gen).requires_grad_(True)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    t = torch.tensor([150])
    # the encoder output keeps a path to rgb so the gradient reaches the "NeRF"
    monkeypatch.setattr(clipd, "encode_images", lambda img, b: latents + 0.0 * img.mean())
    out = clipd(rgb, views([20.0], [90.0]), 0, t=t, noise=noise)

    # by hand: one-step x0, decode, CLIP embed, -cos
    abar = clipd.alphas_cumprod[t].view(1, 1, 1, 1)
    x_t = abar.sqrt() * latents.detach() + (1 - abar).sqrt() * noise
    eps_hat = clipd.predict_noise(x_t, t, views([20.0], [90.0]))
    x0 = (x_t - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae").eval()
    enc = CLIPVisionModelWithProjection.from_pretrained(clip).eval()
    with torch.no_grad():
        img = (vae.decode(x0 / 0.18215).sample * 0.5 + 0.5).clamp(0, 1)
        embed = lambda x: enc(pixel_values=(F.interpolate(x, (32, 32), mode="bicubic", antialias=True) - CLIP_MEAN) / CLIP_STD).image_embeds
        expected = -F.cosine_similarity(embed(img), embed(reference()["rgb"].permute(0, 3, 1, 2)), dim=-1)
    assert out["clip_fraction"].item() == 1.0
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-5)

    out["loss"].backward()
    assert latents.grad.abs().sum() > 0
    # the real encoder path: gradient reaches the image and the module's parameter
    monkeypatch.undo()
    nerf.zero_grad()
    rgb = nerf()
    rgb.retain_grad()
    clipd(rgb, views([20.0], [90.0]), 0, t=t)["loss"].backward()
    assert rgb.grad.abs().sum() > 0 and nerf.logits.grad.abs().sum() > 0


def test_clip_d_above_threshold_is_sds(clipd):
    out = clipd(torch.rand(2, 32, 32, 3), views([0.0, 0.0], [0.0, 90.0]), 0, t=torch.tensor([400, 500]))
    assert out["clip_fraction"].item() == 0.0 and "loss_clip" not in out
    assert out["loss"].item() == pytest.approx(out["loss_sds"].item(), rel=1e-6)


def test_clip_d_skips_back_views(clipd, monkeypatch):
    """Official Make-It-3D: no CLIP-D on views within 45 degrees of the back (is_large); they get SDS at any t."""
    rgb = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(4))
    t = torch.full((4,), 150)
    azim = [0.0, 90.0, 140.0, -180.0]  # relative to the reference azimuth 0: front, side, back, back
    out = clipd(rgb, views([0.0] * 4, azim), 0, t=t)
    assert out["clip_fraction"].item() == 0.5
    monkeypatch.setattr(clipd.cfg, "skip_back_views", False)
    assert clipd(rgb, views([0.0] * 4, azim), 0, t=t)["clip_fraction"].item() == 1.0
    monkeypatch.setattr(clipd.cfg, "skip_back_views", True)
    back = clipd(rgb[2:], views([0.0] * 2, azim[2:]), 0, t=t[2:])
    assert back["clip_fraction"].item() == 0.0 and back["loss"].item() == pytest.approx(back["loss_sds"].item(), rel=1e-6)


@pytest.fixture(scope="module")
def zero123():
    g = registry.get("guidance", "zero123")({"pretrained_model_name_or_path": tiny_model_dir("zero123"), "resolution": 64,
                                             "seed": 0}, path="system.guidance.zero123", device=CPU)
    g.set_reference(reference())
    return g


def test_zero123_relative_camera_and_angle_scale(zero123):
    b = views([0.0, 0.0, 30.0, 0.0], [180.0, 90.0, 0.0, 0.0], [1.0, 1.0, 1.5, 1.0])
    cam = zero123.camera(b, 4)
    torch.testing.assert_close(cam[0], torch.tensor([0.0, 0.0, -1.0, 0.0]), atol=1e-6, rtol=0)  # front -> back
    torch.testing.assert_close(cam[1], torch.tensor([0.0, 1.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(cam[2], torch.tensor([-math.pi / 6, 0.0, 1.0, 0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(zero123.sample_scale(b, 4), torch.tensor([1.0, 0.5, 30 / 180, 0.0]), atol=1e-5, rtol=0)


def test_zero123_cfg_by_hand_and_angle_scaled_loss(zero123):
    path = tiny_model_dir("zero123")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()
    cc = CLIPCameraProjection.from_pretrained(path, subfolder="clip_camera_projection").float().eval()
    enc = CLIPVisionModelWithProjection.from_pretrained(path, subfolder="image_encoder").eval()
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").eval()
    ref = F.interpolate(reference()["rgb"].permute(0, 3, 1, 2), (64, 64), mode="bilinear")
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([300])
    with torch.no_grad():
        emb = enc(pixel_values=(F.interpolate(ref, (32, 32), mode="bicubic", antialias=True) - CLIP_MEAN) / CLIP_STD).image_embeds
        cond = cc(torch.cat([emb, torch.tensor([[0.0, 0.0, -1.0, 0.0]])], -1))[:, None]
        concat = vae.encode(ref * 2 - 1).latent_dist.mode()
        eps_c = unet(torch.cat([x_t, concat], 1), t, encoder_hidden_states=cond).sample
        eps_u = unet(torch.cat([x_t, torch.zeros_like(concat)], 1), t, encoder_hidden_states=torch.zeros_like(cond)).sample
    got = zero123.predict_noise(x_t, t, views([0.0], [180.0]))
    torch.testing.assert_close(got, eps_u + 5.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)

    rgb = torch.rand(2, 32, 32, 3, requires_grad=True)
    out = zero123(rgb, views([0.0, 0.0], [0.0, 180.0]), 0)  # reference view and its back
    out["loss"].backward()
    assert rgb.grad[0].abs().sum() == 0 and rgb.grad[1].abs().sum() > 0  # angle 0 -> weight 0


def test_dreambooth_prompt_follows_shading(tmp_path, monkeypatch):
    g = registry.get("guidance", "multimodal-dreambooth")(
        {"pretrained_model_name_or_path": tiny_model_dir("sd"), "resolution": 64,
         "prompt_processor": {"cache_dir": str(tmp_path), "view_dependent_prompting": False}},
        path="system.guidance.dreambooth", device=CPU)
    g.set_prompt("a teddy bear")
    assert g.prompt_for({"shading": "normal"}) == "sks normal map of a teddy bear"
    assert g.prompt_for({"shading": "lambertian"}) == "sks rgb photo of a teddy bear"
    assert g.prompt_for({}) == "sks rgb photo of a teddy bear"
    seen = []
    orig = g.prompt_processor.encode
    monkeypatch.setattr(g.prompt_processor, "encode", lambda p: seen.extend(p) or orig(p))
    g(torch.rand(1, 32, 32, 3), {**views([0.0], [0.0]), "shading": "normal"}, 0)
    assert "sks normal map of a teddy bear" in seen

    with pytest.raises(ConfigError, match="system.guidance.db.pretrained_model_name_or_path"):
        registry.get("guidance", "multimodal-dreambooth")({}, path="system.guidance.db", device=CPU)
