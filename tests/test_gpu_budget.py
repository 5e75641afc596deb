"""The GPU budget script's projection (tests/gpu/check.py, issue 13), on hand-made measurements.

The script itself needs a GPU; what it computes from a run's files is plain arithmetic, checked here."""
import os

import pytest

from conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
check = load_script("tests/gpu/check.py", "gpu_check")

PAPER = {"run": "lightning", "steps": 200, "class_images": 200, "class_steps": 25, "class_batch": 4}


def timing(*batches, load=3.0):
    return {"images": sum(b["images"] for b in batches), "reused": 0, "steps": 4, "sampler": "dpm-solver++",
            "batch_size": 4, "seconds": load + sum(b["seconds"] for b in batches), "load_seconds": load,
            "batches": list(batches)}


COLD = {"images": 4, "seconds": 1.0, "step_ends": [0.5, 0.6, 0.7, 0.8]}  # first batch: slow first step
WARM = {"images": 4, "seconds": 0.5, "step_ends": [0.1, 0.2, 0.3, 0.4]}  # 0.1 s a step, 0.1 s the rest


def test_class_images_are_projected_from_the_warm_batch_step_stamps():
    # the warm batch: 0.1 s a step, 0.5 - 4 x 0.1 = 0.1 s for prompt + decode; 50 batches of 25 steps + load
    assert check.class_image_seconds(timing(COLD, WARM), PAPER) == pytest.approx(3.0 + 50 * (25 * 0.1 + 0.1))
    # a last, partial batch is not the one read
    part = {"images": 2, "seconds": 0.9, "step_ends": [0.5, 0.6, 0.7, 0.8]}
    assert check.class_image_seconds(timing(COLD, WARM, part), PAPER) == pytest.approx(133.0)
    # batches measured at half the config's size count twice per batch
    half = {"images": 2, "seconds": 0.5, "step_ends": [0.1, 0.2, 0.3, 0.4]}
    assert check.class_image_seconds(timing(half, half), PAPER) == pytest.approx(3.0 + 50 * 2 * 2.6)
    # a timing from before the stamps: the average per image and step (load included)
    old = {"images": 2, "steps": 4, "seconds": 1.6}
    assert check.class_image_seconds(old, PAPER) == pytest.approx(1.6 / 8 * 200 * 25)


def test_dreambooth_stage_projection_swaps_the_measured_class_images_for_the_papers():
    ci = timing(COLD, WARM)  # 4.5 s of the stage's wall time
    stage = {"wall_s": 60.0, "steps": 8, "ms_step": 250.0, "ms_sum": 8 * 260.0, "class_images": ci}
    fixed = 60.0 - 8 * 0.26 - 4.5 + 133.0  # load, save, other set-up; class images at the papers' count
    assert check.project(stage, PAPER) == pytest.approx((200 * 0.25 + fixed) / 60.0)
    assert check.project({"wall_s": None}, PAPER) is None


def test_rehearsal_overrides_time_two_batches_of_the_configs_size():
    out = check.overrides({"dreambooth": dict(PAPER, class_batch=6)}, steps=40, refine_steps=10, rehearsal=False)
    assert "stage.dreambooth.system.num_class_images=12" in out
    assert "stage.dreambooth.system.class_inference_steps=4" in out
    assert not [o for o in out if "class_batch_size" in o]  # the config's own batch size is what is timed


def test_paper_figures_read_the_method_config():
    photo = os.path.join(ROOT, "load", "synthetic", "rgba.png")
    fig = check.stage_figures(check.METHODS["customize-it-3d"], photo)
    assert fig["dreambooth"] == {"run": "lightning", "steps": 200, "class_images": 200, "class_steps": 25,
                                 "class_batch": 4}
    assert (fig["coarse"]["steps"], fig["refine"]["steps"]) == (7000, 3000)


# ----------------------------------------------------------------------------- bench_memory --census
bench = load_script("tests/benchmarks/bench_memory.py", "bench_memory")


def test_triton_hash_grid_times_interpolate_the_h200_measurements():
    assert bench._triton_ms("forward", 2 ** 18) == pytest.approx(0.31)
    assert bench._triton_ms("backward_xt", 2 ** 20) == pytest.approx(3.93)
    assert bench._triton_ms("backward_t", (2 ** 18 + 2 ** 20) // 2) == pytest.approx((1.02 + 3.05) / 2)


def test_census_counts_the_hash_grid_as_triton_calls_and_puts_the_kernels_back():
    import torch
    from it3d.encodings.hash_grid import TINY_HASH_GRID, HashGridEncoding, TorchKernels

    enc = HashGridEncoding(dict(TINY_HASH_GRID, backend="torch"))
    x = torch.rand(3000, 3, generator=torch.Generator().manual_seed(0))
    ref = enc(x)
    kernels = dict(TorchKernels.__dict__)

    def step():
        enc.params.grad = None
        out = enc(x)
        out.sum().backward()
        return out

    try:
        bench.CENSUS["hash_grid"] = "torch"
        with bench._Census() as torch_path:
            step()
    finally:
        bench.CENSUS["hash_grid"] = "triton"
    assert torch_path.hash_grid == {"calls": 0, "ms": 0.0} and torch_path.total.launches > 20
    with bench._Census() as c:
        out = step()
    # one forward and one table-gradient backward, at their H200 times; the values still computed
    assert c.hash_grid["calls"] == 2
    assert c.hash_grid["ms"] == pytest.approx(bench._triton_ms("forward", 3000) + bench._triton_ms("backward_t", 3000))
    assert torch.equal(out.detach(), ref.detach()) and enc.params.grad.abs().sum() > 0
    # what is left in the census is the step's own ops (the sum, its gradient), not the encoding's gathers
    assert c.total.launches < 6 < torch_path.total.launches
    assert all(TorchKernels.__dict__[k] is kernels[k] for k in ("forward", "backward", "backward2"))
    assert TorchKernels.chunk == {"cpu": 2 ** 15, "cuda": 2 ** 17}
