"""Evaluation metrics against hand-computed values and slow references (tiny random LPIPS / CLIP)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from it3d.eval import contextual, lpips, metrics
from it3d.testing import tiny_model_dir


def rand_img(seed, h=32, w=32, lo=0.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(1, h, w, 3, generator=g)


# ----------------------------------------------------------------------------- PSNR
def test_psnr_constant_offset_is_exact():
    x = rand_img(0, lo=0.2, hi=0.8)
    assert metrics.psnr(x + 0.1, x).item() == pytest.approx(20.0, abs=1e-4)  # mse = 0.01


def test_psnr_uniform_plus_minus_delta():
    x = rand_img(1, lo=0.2, hi=0.8)
    signs = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) > 0.5, 1.0, -1.0)
    delta = 0.05
    assert metrics.psnr(x + delta * signs, x).item() == pytest.approx(10 * math.log10(1 / delta ** 2), abs=1e-4)


def test_psnr_masked_uses_only_masked_pixels():
    x = rand_img(3, lo=0.2, hi=0.6)
    mask = torch.zeros(1, 32, 32, 1)
    mask[:, :, :10] = 1.0
    y = x + torch.where(mask > 0, 0.1, 0.3)
    assert metrics.psnr(y, x, mask).item() == pytest.approx(20.0, abs=1e-4)
    full_mse = (10 * 0.01 + 22 * 0.09) / 32
    assert metrics.psnr(y, x).item() == pytest.approx(10 * math.log10(1 / full_mse), abs=1e-4)
    assert math.isinf(metrics.psnr(x, x).item())


# ----------------------------------------------------------------------------- SSIM
def test_ssim_identity_and_constant_images():
    x = rand_img(4)
    assert metrics.ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    a, b = torch.full((1, 16, 16, 3), 0.5), torch.full((1, 16, 16, 3), 0.25)
    c1 = 0.01 ** 2  # variances are 0, so the contrast-structure term is C2 / C2 = 1
    assert metrics.ssim(a, b).item() == pytest.approx((2 * 0.5 * 0.25 + c1) / (0.5 ** 2 + 0.25 ** 2 + c1), abs=1e-6)


def slow_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Direct per-window SSIM of two H W images (float64 loops; Gaussian 11, sigma 1.5)."""
    r = np.arange(11) - 5.0
    g = np.exp(-(r ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i: i + 11, j: j + 11], y[i: i + 11, j: j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_slow_reference():
    x = rand_img(5, 18, 20)
    y = (0.7 * x + 0.3 * rand_img(6, 18, 20)).clamp(0, 1)
    ref = np.mean([slow_ssim(x[0, ..., c].double().numpy(), y[0, ..., c].double().numpy()) for c in range(3)])
    assert metrics.ssim(y, x).item() == pytest.approx(ref, abs=1e-5)
    assert 0.0 < ref < 0.99


def test_ssim_masked_averages_window_centres_in_mask():
    x = rand_img(7, 24, 40)
    y = x.clone()
    y[:, :, 20:] = rand_img(8, 24, 20)  # the right half differs
    mask = torch.zeros(1, 24, 40, 1)
    mask[:, :, :15] = 1.0  # window centres < col 15 only see columns < 20: identical there
    assert metrics.ssim(y, x, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert metrics.ssim(y, x).item() < 0.8


def test_ssim_rejects_too_small_images():
    with pytest.raises(Exception, match="at least 11x11"):
        metrics.ssim(torch.rand(1, 8, 8, 3), torch.rand(1, 8, 8, 3))


# ----------------------------------------------------------------------------- LPIPS
@pytest.fixture(scope="module")
def lp():
    return lpips.load_lpips(tiny_model_dir("lpips"))


def test_lpips_identity_zero_and_symmetric(lp):
    x, y = rand_img(9, 48, 48), rand_img(10, 48, 48)
    assert lp(x, x).item() == 0.0
    d_xy, d_yx = lp(x, y).item(), lp(y, x).item()
    assert d_xy > 0 and d_xy == pytest.approx(d_yx, rel=1e-6)
    assert lp(x, (x + 0.02).clamp(0, 1)).item() < d_xy


def slow_lpips(sd, a, b):
    """LPIPS straight from the state dict: conv stack by torchvision indices, taps after each block."""
    shift = torch.tensor(lpips.SHIFT).view(1, 3, 1, 1)
    scale = torch.tensor(lpips.SCALE).view(1, 3, 1, 1)
    feats = []
    for img in (a, b):
        h = ((img.permute(0, 3, 1, 2) * 2 - 1) - shift) / scale
        taps, idx = [], iter(lpips.conv_indices())
        for block, n in enumerate(lpips.BLOCKS):
            if block:
                h = F.max_pool2d(h, 2)
            for _ in range(n):
                i = next(idx)
                h = F.relu(F.conv2d(h, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1))
            taps.append(h)
        feats.append(taps)
    total = 0.0
    for k, (fa, fb) in enumerate(zip(*feats)):
        na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total += F.conv2d((na - nb) ** 2, sd[f"lin{k}.model.1.weight"]).mean()
    return float(total)


def test_lpips_matches_state_dict_reference_and_conversion(lp, tmp_path):
    sd = lpips.read_state_dict(lpips.weights_file(tiny_model_dir("lpips")))
    x, y = rand_img(11, 40, 40), rand_img(12, 40, 40)
    assert lp(x, y).item() == pytest.approx(slow_lpips(sd, x, y), rel=1e-5)
    # official split: torchvision vgg16 (features.* + classifier.*) and lpips vgg.pth (lin*.model.1.weight)
    vgg = {k: v for k, v in sd.items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save({k: v for k, v in sd.items() if k.startswith("lin")}, tmp_path / "vgg.pth")
    assert lpips.main(["convert", "--vgg", str(tmp_path / "vgg16.pth"), "--lin", str(tmp_path / "vgg.pth"),
                       "--out", str(tmp_path / "conv")]) == 0
    assert lpips.load_lpips(str(tmp_path / "conv"))(x, y).item() == pytest.approx(lp(x, y).item(), rel=1e-6)


def test_lpips_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(lpips.WeightsUnavailable, match="--lpips"):
        lpips.load_lpips(str(tmp_path / "nowhere"))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "lpips_vgg16.pt")
    with pytest.raises(lpips.WeightsUnavailable, match="lacks keys"):
        lpips.load_lpips(str(tmp_path))


# ----------------------------------------------------------------------------- CLIP
def test_clip_similarity_of_image_with_itself_is_one():
    scorer = metrics.ClipScorer(tiny_model_dir("clip"), "cpu")
    x, y = rand_img(13, 40, 40), rand_img(14, 40, 40)
    s = scorer.similarity(torch.cat([x, y]), x)
    assert s[0].item() == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= s[1].item() < 1.0 - 1e-4


# ----------------------------------------------------------------------------- contextual
def test_contextual_hand_values():
    g = torch.Generator().manual_seed(15)
    y = torch.randn(1, 8, 20, generator=g)
    # X = Y (any order): every y_j has an exact match, CX = 1, distance = 0
    perm = torch.randperm(20, generator=g)
    assert contextual.contextual_distance(y[:, :, perm], y).item() == pytest.approx(0.0, abs=1e-6)
    # one x against M = 2 y's: CX_1j sums to 1 over j, so CX = mean_j CX_1j = 1/2 and distance = log 2
    assert contextual.contextual_distance(torch.randn(1, 8, 1, generator=g), y[:, :, :2]).item() == \
        pytest.approx(math.log(2), abs=1e-6)


def test_contextual_distance_of_identical_images_is_minimal(lp):
    x = rand_img(16, 64, 64)
    others = torch.cat([rand_img(17, 64, 64), torch.flip(x, dims=[1]), (x * 0.5 + 0.25)])
    d = contextual.image_contextual_distance(lp, torch.cat([x, others]), x, size=64)
    assert d[0].item() < d[1:].min().item()
    assert d[0].item() >= 0


# ----------------------------------------------------------------------------- suite
def test_suite_reports_unavailable_metrics_with_reason(tmp_path):
    suite = metrics.MetricSuite(metrics.EvalConfig(lpips=str(tmp_path / "none"), clip=str(tmp_path / "none" / "clip")))
    x = rand_img(18)
    vals, notes = suite.evaluate(x, x, torch.ones(1, 32, 32, 1), rand_img(19))
    assert math.isinf(vals["psnr"]) and vals["ssim_masked"] == pytest.approx(1.0, abs=1e-6)
    for k in ("lpips", "clip", "cx"):
        assert math.isnan(vals[k]) and notes[k]
    assert "--lpips" in notes["lpips"] and "not available" in notes["clip"]


def test_suite_with_tiny_models():
    suite = metrics.MetricSuite(metrics.EvalConfig(lpips=tiny_model_dir("lpips"), clip=tiny_model_dir("clip"), cx_size=48))
    x = rand_img(20)
    vals, notes = suite.evaluate(x, x, torch.ones(1, 32, 32, 1), torch.cat([x, x]))
    assert notes == {}
    assert vals["lpips"] == 0.0 and vals["clip"] == pytest.approx(1.0, abs=1e-5)
    vals2, _ = suite.evaluate(x, x, torch.ones(1, 32, 32, 1), torch.cat([rand_img(21), rand_img(22)]))
    assert vals2["clip"] < vals["clip"] and vals2["cx"] > vals["cx"]


def test_pick_views():
    assert metrics.pick_views(5, 0) == [1, 2, 3, 4]
    assert metrics.pick_views(121, 4) == [1, 41, 80, 120]
    assert metrics.pick_views(1, 4) == []
