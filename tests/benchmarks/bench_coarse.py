"""Coarse-stage NeRF training-step benchmark (not collected by pytest).

One step = render one random view at HxW with the `volume` renderer over the default
`implicit-volume` (16-level hash grid, 2^19 table, 64+32 samples per ray, occupancy grid),
L1 loss against a fixed target, backward, Adam step. Prints steps/s, peak memory, and the share
of the step spent in each part, timed exclusively (nested calls subtracted) with device
synchronisation at every boundary:

    encoding (hash grid), network (MLPs), sampling (ray-box, stratified + importance samples,
    grid lookups), material, compositing, other forward (gather/scatter), backward, optimizer.

It also counts the device->host syncs of one step (``it3d.core.profiling.count_syncs``: the
render + loss + backward, and the grid update separately) and prints the sample-buffer figures
(occupied samples / evaluated slots / all samples).

    python tests/benchmarks/bench_coarse.py --device cpu --sizes 64 128 --steps 3 [--sparse] [--threads 1]
    python tests/benchmarks/bench_coarse.py --sizes 64 --shading lambertian --memory   # + one step's peak bytes
    python tests/benchmarks/bench_coarse.py --sizes 128 --grid-res 128 --sparse --census  # + its kernels and bytes
    python tests/benchmarks/bench_coarse.py --device cuda --sizes 64 128 256 --steps 20 --encoding-backend triton
    python tests/benchmarks/bench_coarse.py --src /path/to/other/checkout/custom ...   # before/after: same bench,
                                                                                       # another version of it3d
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

HERE_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "custom")
_src = sys.argv[sys.argv.index("--src") + 1] if "--src" in sys.argv else HERE_SRC
sys.path.insert(0, os.path.abspath(_src))

from it3d.core.registry import get  # noqa: E402
try:
    from it3d.core.cameras import get_rays, spherical_c2w  # noqa: E402
except ModuleNotFoundError:  # an --src from before the camera maths moved to core/ (Dec 4, 17:41)
    from it3d.data.cameras import get_rays, spherical_c2w  # noqa: E402
from it3d.renderers import volume as volume_mod  # noqa: E402


def _load_profiling(name: str = "count_syncs"):
    """count_syncs / peak_allocated / op_census from this checkout (a standalone file, loaded once), so an older
    --src can be measured too."""
    import importlib.util

    mod = sys.modules.get("_bench_profiling")
    if mod is None:
        spec = importlib.util.spec_from_file_location("_bench_profiling", os.path.join(HERE_SRC, "it3d", "core",
                                                                                        "profiling.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return getattr(mod, name)


class Timers:
    """Exclusive wall time per name: a call's time minus the time of timed calls nested in it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total = defaultdict(float)
        self.stack = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, name: str, fn):
        def wrapped(*args, **kwargs):
            self.sync()
            self.stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                dt = time.perf_counter() - t0
                child = self.stack.pop()
                self.total[name] += dt - child
                if self.stack:
                    self.stack[-1] += dt

        return wrapped

    def section(self, name: str):
        timers = self

        class _S:
            def __enter__(self):
                timers.sync()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timers.sync()
                timers.total[name] += time.perf_counter() - self.t0
                return False

        return _S()


def build(device: torch.device, grid_res: int, shading: str, encoding_backend: str = "auto", margin=None):
    enc = {"otype": "HashGrid", "n_levels": 16, "n_features_per_level": 2, "log2_hashmap_size": 19,
           "base_resolution": 16, "max_resolution": 2048, "backend": encoding_backend}
    geo = get("geometry", "implicit-volume")({"pos_encoding": enc}, path="system.geometry").to(device)
    mat = get("material", "diffuse-light")({"shading_probs": {shading: 1.0}}, path="system.material").to(device)
    bg = get("background", "random-color")({}, path="system.background").to(device)
    rcfg = {"grid": {"resolution": grid_res}}
    if margin is not None:
        rcfg["sample_capacity_margin"] = margin
    ren = get("renderer", "volume")(rcfg, path="system.renderer", geometry=geo, material=mat, background=bg).to(device)
    return geo, mat, bg, ren


def instrument(geo, mat, ren, timers: Timers) -> None:
    geo.encoding.forward = timers.wrap("encoding", geo.encoding.forward)
    geo.mlp.forward = timers.wrap("network", geo.mlp.forward)
    mat.forward = timers.wrap("material", mat.forward)
    ren._sample = timers.wrap("sampling", ren._sample)
    ren._mask = timers.wrap("sampling", ren._mask)
    ren._composite = timers.wrap("compositing", ren._composite)
    ren.forward = timers.wrap("other forward", ren.forward)


def run(size: int, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    geo, mat, bg, ren = build(device, args.grid_res, args.shading, args.encoding_backend, args.sample_capacity_margin)
    for m in (geo, mat, bg, ren):
        m.train()
    opt = torch.optim.Adam(list(geo.parameters()) + list(bg.parameters()), lr=1e-2, eps=1e-15)
    if args.sparse:  # a trained-looking field: dense blob core (r < ~0.2), near-empty elsewhere
        with torch.no_grad():
            geo.mlp[-1].bias[0] = -4.0
    t0 = time.perf_counter()
    ren.do_update_step(0, 0)  # occupancy grid update (every `update_every` steps in training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    grid_update_s = time.perf_counter() - t0
    target = torch.ones(1, size, size, 3, device=device)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size, device=device), torch.linspace(-1, 1, size, device=device),
                            indexing="ij")
    target[0, (xx ** 2 + yy ** 2) < 0.3] = torch.tensor([0.8, 0.4, 0.2], device=device)
    lights = torch.tensor([[1.0, 1.0, 2.0]], device=device)

    def step(i: int, timers: Timers = None, counter=None):
        g = torch.Generator().manual_seed(i)
        elev, azim = float(torch.rand((), generator=g) * 30), float(torch.rand((), generator=g) * 360)
        c2w = spherical_c2w(torch.tensor([elev]), torch.tensor([azim]), torch.tensor([1.0])).to(device)
        ro, rd = get_rays(c2w, size, size, 40.0)
        if counter is not None:  # count the render + loss + backward only
            import warnings

            with counter, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if device.type == "cuda":  # the CUDA runtime's own count: one warning per synchronising call
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    out = ren(ro, rd, light_positions=lights, c2w=c2w, shading=args.shading)
                    (out["comp_rgb"] - target).abs().mean().backward()
                finally:
                    if device.type == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
            counter.cuda_syncs = sum("synchroniz" in str(w.message) for w in caught)
            opt.zero_grad(set_to_none=True)
            return
        # the shading asked for (the material's own draw would mix in its default albedo weight)
        out = ren(ro, rd, light_positions=lights, c2w=c2w, shading=args.shading, normal_grad=args.normal_grad)
        loss = (out["comp_rgb"] - target).abs().mean()
        if timers is None:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return
        with timers.section("backward"):
            loss.backward()
        with timers.section("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    if hasattr(ren, "sample_buffers"):  # steady state: sample buffers sized from the warm-up renders' peaks
        ren.sample_buffers.resize()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(args.steps):
        step(100 + i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t0) / args.steps
    cpu = (time.process_time() - c0) / args.steps
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    stats = {k: int(v) for k, v in ren.last_stats.items()}
    count_syncs = _load_profiling()
    counter = count_syncs()
    step(300, counter=counter)
    syncs = counter.counter
    with count_syncs() as update_syncs:
        ren.do_update_step(0, ren.grid.cfg.update_every * 1000)
    mem = mem_stats = None
    if args.memory:  # one whole step (render, loss, backward, Adam) under the allocator's events
        opt.zero_grad(set_to_none=True)
        with _load_profiling("peak_allocated")(device) as mem:
            step(400)
        mem_stats = {k: int(v) for k, v in ren.last_stats.items()}  # its own samples (the grid was updated)
    census = None
    if args.census:  # one whole step's kernels, FLOPs and bytes: what a GPU would launch and move
        opt.zero_grad(set_to_none=True)
        with _load_profiling("op_census")(_load_profiling("H200")) as census:
            step(500)
    timers = Timers(device)
    instrument(geo, mat, ren, timers)
    for i in range(args.profile_steps):
        step(200 + i, timers)
    return {"size": size, "step_s": dt, "cpu_s": cpu, "steps_per_s": 1.0 / dt, "peak_mb": peak,
            "grid_update_s": grid_update_s, "stats": stats, "timers": dict(timers.total),
            "syncs": syncs.count, "uploads": syncs.uploads, "update_syncs": update_syncs.count,
            "cuda_syncs": getattr(counter, "cuda_syncs", 0) if device.type == "cuda" else None,
            "sync_sites": syncs.by_site(), "memory": mem, "memory_stats": mem_stats, "census": census}


def rss_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile-steps", type=int, default=1)
    p.add_argument("--grid-res", type=int, default=None, help="occupancy grid resolution (default 64 CPU, 128 CUDA)")
    p.add_argument("--shading", default="albedo", help="albedo (no normals) or lambertian (analytic normals)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0 = default)")
    p.add_argument("--encoding-backend", default="auto", help="hash grid backend: auto | torch | triton | tcnn")
    p.add_argument("--sample-capacity-margin", default=None,
                   help="renderer.sample_capacity_margin (default: the renderer's, auto: exact on CPU, 1.5 on GPU)")
    p.add_argument("--normal-grad", default=None, choices=["on", "off"],
                   help="gradients through the analytic normals (on: the second-order graph a normal loss needs; off: "
                        "normals as constants of the step); default: the renderer's (on in training)")
    p.add_argument("--memory", action="store_true",
                   help="also measure one step's peak allocation (it3d.core.profiling.peak_allocated: exact on CPU)")
    p.add_argument("--census", action="store_true",
                   help="+ one step's kernel count, FLOPs, bytes and H200 roofline (it3d.core.profiling.op_census)")
    p.add_argument("--src", default=HERE_SRC, help="the it3d source dir to measure (default: this checkout)")
    p.add_argument("--sparse", action="store_true",
                   help="bias the density down so the occupancy grid skips most samples (a trained scene's case); "
                        "default: the initial blob, whose trunc_exp fog fills the whole box")
    args = p.parse_args()
    args.normal_grad = None if args.normal_grad is None else args.normal_grad == "on"
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.grid_res is None:
        args.grid_res = 128 if device.type == "cuda" else 64
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} grid={args.grid_res}^3 "
          f"shading={args.shading} steps={args.steps} sparse={args.sparse} encoding={args.encoding_backend} "
          f"src={os.path.abspath(args.src)}")
    _ = volume_mod  # the renderer module the timers instrument
    for size in args.sizes:
        r = run(size, args, device)
        if r["peak_mb"] is not None:
            mem = f"peak CUDA alloc {r['peak_mb']:.0f} MiB"
        else:
            mem = f"peak RSS {rss_peak_mb():.0f} MiB"
        s = r["stats"]
        print(f"\n{size}x{size}: {r['steps_per_s']:.3f} steps/s ({r['step_s'] * 1e3:.0f} ms/step wall, "
              f"{r['cpu_s'] * 1e3:.0f} ms process CPU time), {mem}, "
              f"grid update {r['grid_update_s'] * 1e3:.0f} ms, "
              f"evaluated {s.get('n_evaluated', 0)} occupied samples in {s.get('n_slots', s.get('n_evaluated', 0))} "
              f"slots of {s.get('n_samples', 0)} ({s.get('n_rays', 0)} rays, {s.get('n_dropped', 0)} dropped); "
              f"syncs per step: {r['syncs']} in render+loss+backward ({r['uploads']} uploads), "
              f"{r['update_syncs']} in a grid update"
              + ("" if r["cuda_syncs"] is None else f"; CUDA sync-debug warnings in that step: {r['cuda_syncs']}"))
        if r["memory"] is not None:
            m, ms = r["memory"], r["memory_stats"]
            slots = max(ms.get("n_slots", ms.get("n_evaluated", 0)), 1)
            print(f"  step memory: {m.report()}; {slots} evaluated slots, step peak / slot = {m.peak_bytes / slots:.0f} B")
        if r["census"] is not None:
            c = r["census"].total
            print(f"  step census: {c.launches} kernels, {c.flops / 1e9:.1f} GFLOP, {c.bytes / 1e9:.2f} GB read + written; "
                  f"H200 floors: compute {c.compute_s * 1e3:.2f} ms, memory {c.memory_s * 1e3:.2f} ms, "
                  f"roofline {c.roofline_s * 1e3:.2f} ms")
        for site, n in sorted(r["sync_sites"].items()):
            print(f"    sync x{n} {site}")
        tot = sum(r["timers"].values())
        for name, v in sorted(r["timers"].items(), key=lambda kv: -kv[1]):
            print(f"  {name:14s} {v / args.profile_steps * 1e3:9.1f} ms  {100 * v / tot:5.1f} %")


if __name__ == "__main__":
    main()
