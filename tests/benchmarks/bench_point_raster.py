"""Point rasterizer + deferred U-Net: time and peak memory (not collected by pytest).

    .venv/bin/python tests/benchmarks/bench_point_raster.py                    # CPU: 100k@256 and 1M@800
    .venv/bin/python tests/benchmarks/bench_point_raster.py --device cuda      # + pytorch3d when installed
    .venv/bin/python tests/benchmarks/bench_point_raster.py --cases 100000x256 --repeats 3

Each (case, phase) runs in a fresh subprocess so that the CPU peak (VmHWM above the RSS after
set-up; the first run counts) belongs to that phase alone; on CUDA the peak is ``torch.cuda.max_memory_allocated``.
Points lie on a sphere of radius 0.5 seen from distance 1.2 with fovy 60 (the object fills the
view, as in the refine stage), 3 scales, radius 1.5 px, 8 points per pixel, the paper-size U-Net
(channels 32, 64, 128, 256), descriptors of 19 channels.
Figures: rasterize (3 scales, forward), render forward (rasterize + composite + U-Net), and
render forward + backward (gradients to descriptors, background, U-Net), all in training mode
with the renderer's fixed-size pair buffers sized from the warm-up run (as in training after
the first resize).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "custom"))


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS counter (VmHWM) and return the current RSS in MiB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status("VmRSS")


def run_case(n: int, size: int, device: str, backend: str, repeats: int, channels, only=None) -> dict:
    import torch

    from it3d.core import registry
    from it3d.core.cameras import spherical_c2w
    from it3d.renderers.point_deferred import scale_sizes
    from it3d.renderers.point_rasterizer import project_points, rasterize_projected, scale_coords

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    pts = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1) * 0.5
    geo = registry.get("geometry", "point-cloud")({}, path="g")
    geo.set_points(pts, torch.rand(n, 3, generator=g), torch.rand(n, generator=g) > 0.5)
    r = registry.get("renderer", "point-deferred")({"unet_channels": list(channels), "backend": backend},
                                                   path="r", geometry=geo)
    geo.to(dev)
    r.to(dev)
    c2w = spherical_c2w(torch.tensor([15.0]), torch.tensor([30.0]), torch.tensor([1.2])).to(dev)
    fovy = torch.tensor([60.0], device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def raster_only():  # as in a training render: the renderer's fixed-size pair buffers
        with torch.no_grad():
            xy, z = project_points(geo.positions, c2w, fovy, size, size)
            for s, (h, w) in enumerate(scale_sizes(size, size, 3)):
                rad = 1.5 if s == 0 else max(1.5 * h / size, 0.75)
                rasterize_projected(scale_coords(xy, size, size, h, w), z, h, w, rad, 8, backend,
                                    buffers=r.sample_buffers, key=f"scale{s}")

    def forward():
        with torch.no_grad():
            r(c2w, fovy, size, size)

    def fwd_bwd():
        out = r(c2w, fovy, size, size)
        out["comp_rgb"].mean().backward()
        geo.descriptors.grad = None
        for p in r.parameters():
            p.grad = None

    res = {"points": n, "size": size, "device": device, "backend": backend, "threads": torch.get_num_threads()}
    phases = {"rasterize": raster_only, "forward": forward, "forward_backward": fwd_bwd}
    for name in only or list(phases):
        fn = phases[name]
        sync()
        base = reset_peak_rss()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base_cuda = torch.cuda.memory_allocated()
        times = []
        for i in range(repeats + 1):  # the first run is a warm-up (it still counts for the peak)
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
            if i == 0:  # steady state of training: pair buffers sized from the warm-up's measured peaks
                r.sample_buffers.resize()
        times = times[1:] or times
        res[f"{name}_s"] = round(sorted(times)[len(times) // 2], 3)
        peak = ((torch.cuda.max_memory_allocated() - base_cuda) / 2 ** 20) if dev.type == "cuda" else \
            (_status("VmHWM") - base)
        res[f"{name}_peak_mb"] = round(peak, 1)
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--cases", nargs="+", default=["100000x256", "1000000x800"], help="POINTSxSIZE")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--backends", nargs="+", default=None, help="default: torch (+ pytorch3d on CUDA when installed)")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._one:
        n, size, backend, phase = a._one.split(":")
        print(json.dumps(run_case(int(n), int(size), a.device, backend, a.repeats, a.channels, [phase])))
        return
    backends = a.backends
    if backends is None:
        backends = ["torch"]
        if a.device.startswith("cuda"):
            from it3d.renderers.point_rasterizer import pytorch3d_available

            if pytorch3d_available():
                backends.append("pytorch3d")
            else:
                print("pytorch3d is not installed: torch backend only")
    for case in a.cases:
        n, size = case.lower().split("x")
        for backend in backends:
            row = {}
            for phase in ("rasterize", "forward", "forward_backward"):  # one process per phase: clean peaks
                cmd = [sys.executable, os.path.abspath(__file__), "--device", a.device, "--repeats", str(a.repeats),
                       "--channels", *map(str, a.channels), "--_one", f"{n}:{size}:{backend}:{phase}"]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{case} {backend} {phase}: failed\n{out.stderr[-2000:]}")
                    continue
                row.update(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
