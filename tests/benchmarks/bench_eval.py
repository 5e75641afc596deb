"""Speed of the evaluation metrics at full size (random weights, real layer widths); prints figures.

    PYTHONPATH=custom python tests/benchmarks/bench_eval.py [--device cuda] [--size 256] [--views 24]
"""
import argparse
import time

import torch

from it3d.eval import contextual, lpips, metrics


def timed(fn, device, reps=3):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--views", type=int, default=24)
    p.add_argument("--cx-size", type=int, default=128)
    a = p.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    x, y = torch.rand(1, a.size, a.size, 3, device=dev), torch.rand(1, a.size, a.size, 3, device=dev)
    views = torch.rand(a.views, a.size, a.size, 3, device=dev)
    model = lpips.LPIPS().to(dev).eval().requires_grad_(False)  # full VGG16 widths, random weights
    with torch.no_grad():
        print(f"device={dev} size={a.size}")
        print(f"psnr        {1e3 * timed(lambda: metrics.psnr(x, y), dev):8.2f} ms")
        print(f"ssim        {1e3 * timed(lambda: metrics.ssim(x, y), dev):8.2f} ms")
        print(f"lpips       {1e3 * timed(lambda: model(x, y), dev):8.2f} ms")
        t = timed(lambda: [contextual.image_contextual_distance(model, views[i:i + 4], x, size=a.cx_size)
                           for i in range(0, a.views, 4)], dev, reps=1)
        print(f"contextual  {1e3 * t:8.2f} ms for {a.views} views at {a.cx_size}px")


if __name__ == "__main__":
    main()
