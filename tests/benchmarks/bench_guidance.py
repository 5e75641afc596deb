"""Time and memory of one guidance step with full-size, randomly initialised models.

One step = VAE encode of the rendered image (with gradient) + UNet with classifier-free
guidance (batch 2, no gradient) + backward to the image, run through the real guidance
classes (``stable-diffusion``, ``zero123``): they are built on the tiny test models, then their
UNet / VAE (and Zero123's camera projection) are swapped for full-size random ones:

* SD2-base UNet (320/640/1280/1280, linear projections, head dims 5/10/20/20, cross-attn 1024),
  512x512 image -> 64x64 latents;
* Zero123 UNet (SD1.x layout, 8 input channels, 8 heads, cross-attn 768), 256x256 -> 32x32;
* the SD AutoencoderKL (128/256/512/512).

    python tests/benchmarks/bench_guidance.py --device cpu --dtype fp32 --iters 1
    python tests/benchmarks/bench_guidance.py --device cuda --dtype fp16 --iters 10 --warmup 2
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "custom"))

SD_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
               attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
ZERO123_UNET = dict(sample_size=32, in_channels=8, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                    attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
              scaling_factor=0.18215)


class RssSampler:
    """Peak resident memory (Linux /proc/self/statm) over a block, sampled every few ms."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every)

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())


def param_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def build(which: str, device: torch.device, dtype: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from it3d.core import registry
    from it3d.guidance.zero123 import CLIPCameraProjection
    from it3d.testing import tiny_model_dir

    import it3d.guidance  # noqa: F401

    torch.manual_seed(0)
    cfg = {"dtype": dtype, "seed": 0}
    if which == "sd":
        g = registry.get("guidance", "stable-diffusion")({"pretrained_model_name_or_path": tiny_model_dir("sd"),
                                                           "resolution": 512, **cfg}, path="bench.sd", device=device)
        unet_cfg = SD_UNET
    else:
        g = registry.get("guidance", "zero123")({"pretrained_model_name_or_path": tiny_model_dir("zero123"),
                                                  "resolution": 256, **cfg}, path="bench.zero123", device=device)
        unet_cfg = ZERO123_UNET
    def ready(m):
        m = m.to(device) if g.dtype == torch.float32 else m.to(device, g.dtype)
        return m.eval().requires_grad_(False)

    g.models = dict(g.models)  # do not touch the hub-cached tiny models
    g.models["unet"] = ready(UNet2DConditionModel(**unet_cfg))
    g.models["vae"] = ready(AutoencoderKL(**SD_VAE))
    if which == "sd":
        emb = torch.randn(1, 77, 1024, device=device, dtype=g.dtype)
        g.prompt_processor.get_text_embeddings = lambda e, a, prompt=None: (emb.expand(len(e), -1, -1), torch.zeros_like(emb).expand(len(e), -1, -1))
    else:
        g.models["camera_projection"] = ready(CLIPCameraProjection(768, 4))
        size = 256
        g.set_reference({"rgb": torch.rand(1, size, size, 3, device=device), "elevation": torch.zeros(1),
                         "azimuth": torch.zeros(1), "camera_distances": torch.ones(1)})
        g.ref["clip"] = torch.randn(1, 1, 768, device=device)  # ViT-L/14 projection size
    return g


def step(g, size: int, device: torch.device):
    rgb = torch.rand(1, size, size, 3, device=device, requires_grad=True)
    batch = {"elevation": torch.tensor([15.0]), "azimuth": torch.tensor([120.0]), "camera_distances": torch.ones(1)}
    out = g(rgb, batch, 0)
    out["loss"].backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all()
    return out


def bench(which: str, args) -> None:
    device = torch.device(args.device)
    g = build(which, device, args.dtype)
    size = 512 if which == "sd" else 256
    weights = param_bytes(g.models["unet"], g.models["vae"])
    for _ in range(args.warmup):
        step(g, size, device)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    with RssSampler() as mem:
        for _ in range(args.iters):
            t0 = time.perf_counter()
            step(g, size, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    lat = size // 8
    print(f"[{which}] device={device} dtype={g.dtype} image={size}x{size} latents={lat}x{lat} "
          f"unet_params={sum(p.numel() for p in g.models['unet'].parameters()) / 1e6:.0f}M "
          f"weights(unet+vae)={weights / 2**30:.2f} GiB threads={torch.get_num_threads()}")
    print(f"[{which}] step time: mean {sum(times) / len(times):.2f} s, min {min(times):.2f} s over {len(times)} iteration(s)")
    if device.type == "cuda":
        print(f"[{which}] peak CUDA memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    else:
        print(f"[{which}] RSS before step {mem.start / 2**30:.2f} GiB, peak during step {mem.peak / 2**30:.2f} GiB "
              f"(+{(mem.peak - mem.start) / 2**30:.2f} GiB for activations), process max RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    del g
    gc.collect()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16")
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--models", default="sd,zero123", help="comma list of: sd, zero123")
    args = p.parse_args(argv)
    for which in args.models.split(","):
        bench(which.strip(), args)


if __name__ == "__main__":
    main()
