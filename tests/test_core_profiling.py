"""count_syncs: every way of reading device data on the host is counted once, and nothing else."""
import pytest
import torch

from it3d.core.profiling import count_syncs


def _count(fn):
    with count_syncs() as s:
        fn()
    return s.count, s.uploads, [e.op for e in s.events]


x = torch.tensor([0.2, 0.7, 0.9, 0.1])


@pytest.mark.parametrize("fn,ops", [
    (lambda: x[0].item(), ["item"]),
    (lambda: bool(x[0] > 0.5), ["item"]),
    (lambda: 1 if x.any() else 0, ["item"]),
    (lambda: int(x[1] * 3), ["item"]),
    (lambda: float(x.sum()), ["item"]),
    (lambda: range(torch.tensor(3)), ["item"]),
    (lambda: x.tolist(), ["tolist"]),
    (lambda: x.numpy(), ["numpy"]),
    (lambda: x.cpu(), ["cpu"]),
    (lambda: x.nonzero(), ["nonzero"]),
    (lambda: torch.nonzero(x > 0.5, as_tuple=True), ["nonzero"]),
    (lambda: x[x > 0.5], ["index"]),
    (lambda: x.clone().__setitem__(x > 0.5, 0.0), ["index_put_"]),
    (lambda: torch.masked_select(x, x > 0.5), ["masked_select"]),
    (lambda: torch.unique(x), ["_unique2"]),
    (lambda: torch.repeat_interleave(torch.tensor([1, 2])), ["repeat_interleave"]),
    (lambda: torch.linalg.inv(torch.eye(3)), ["_linalg_check_errors"]),
    (lambda: torch.equal(x, x), ["equal"]),
])
def test_each_host_read_is_counted_once(fn, ops):
    n, up, seen = _count(fn)
    assert (n, up, seen) == (len(ops), 0, ops)


@pytest.mark.parametrize("fn", [
    lambda: torch.nonzero_static(x > 0.5, size=4, fill_value=-1),
    lambda: x[torch.tensor([0, 2])],
    lambda: torch.where(x > 0.5, x, 0.0),
    lambda: torch.linalg.inv_ex(torch.eye(3)).inverse,
    lambda: torch.repeat_interleave(x, torch.tensor([1, 2, 0, 1]), output_size=4),
    lambda: torch.sort(x, stable=True),
    lambda: torch.tensor([1.0, 2.0]),  # a host tensor, no device asked
    lambda: x.shape[0] + x.numel(),
])
def test_device_side_work_is_not_counted(fn):
    assert _count(fn) == (0, 0, [])


def test_uploads_and_backward_are_counted():
    n, up, seen = _count(lambda: torch.tensor([1.0, 2.0], device=x.device))
    assert (n, up) == (0, 1)

    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a * 2

        @staticmethod
        def backward(ctx, g):
            if g.sum() > 0:  # a sync inside the backward pass
                return g * 2
            return g

    a = torch.ones(3, requires_grad=True)
    with count_syncs() as s:
        ReadsInBackward.apply(a).sum().backward()
    # attributed to the line in backward (co_firstlineno is the @staticmethod line)
    assert s.count == 1 and s.by_site() == {f"{__file__}:{ReadsInBackward.backward.__code__.co_firstlineno + 2} item": 1}
    assert "1 device->host syncs, 0 host->device uploads" in s.report()


# ----------------------------------------------------------------------------- op census
def test_census_counts_a_matmul_by_hand_and_views_as_free():
    from it3d.core.profiling import DeviceSpec, op_census

    spec = DeviceSpec("test", peak_flops=1e12, bandwidth=1e11)
    a, b = torch.rand(64, 32), torch.rand(16, 32)
    with op_census(spec) as c:
        out = a @ b.t()  # t(): a view, no kernel
    assert c.total.launches == 1
    assert c.total.flops == 2 * 64 * 32 * 16
    assert c.total.bytes == (64 * 32 + 16 * 32 + 64 * 16) * 4
    assert c.total.compute_s == pytest.approx(2 * 64 * 32 * 16 / 1e12)
    assert c.total.roofline_s == pytest.approx(max(2 * 64 * 32 * 16 / 1e12, (64 * 32 + 16 * 32 + 64 * 16) * 4 / 1e11))
    assert c.seconds(launch_s=1e-6) == pytest.approx(c.total.roofline_s + 1e-6)
    # an elementwise op on a broadcast view reads the view's storage once, not its 64 x 16 elements
    row = torch.rand(1, 16)
    with op_census(spec) as c:
        out + row.expand(64, 16)
    assert (c.total.launches, c.total.flops, c.total.bytes) == (1, 0.0, (64 * 16 + 16 + 64 * 16) * 4)


def test_census_counts_the_backward_and_names_the_module():
    from it3d.core.profiling import op_census

    m, k, n = 8, 12, 5
    net = torch.nn.Sequential(torch.nn.Linear(k, n), torch.nn.ReLU())
    x = torch.rand(m, k)
    with op_census(depth=2) as c:
        net(x).sum().backward()
        (x * 2).sum()
    # forward x W^T and the weight's gradient g^T x: two matmuls; x needs no gradient, so no third
    assert c.total.flops == 2 * (2 * m * k * n)
    # both inside the module: ModuleTracker follows the backward too; the ops outside it go to (none)
    assert c.by_module["Sequential"].flops == c.by_module["Sequential.0"].flops == 2 * (2 * m * k * n)
    assert "Sequential.1" in c.by_module and c.by_module["Sequential.1"].flops == 0
    assert c.by_module["(none)"].launches >= 2 and c.by_module["(none)"].flops == 0
    x.requires_grad_(True)
    with op_census() as c:
        net(x).sum().backward()
    assert c.total.flops == 3 * (2 * m * k * n) and "Sequential.0" not in c.by_module  # depth 1: roots only


def test_census_counts_a_foreach_op_as_cudas_multi_tensor_launches():
    from it3d.core.profiling import op_census

    small = [torch.zeros(10) for _ in range(250)]  # 250 tensors of one chunk each: 110 a launch (depth 1)
    big = [torch.zeros(65536 * 100) for _ in range(4)]  # 400 chunks: 320 blocks a launch
    with op_census() as c:
        torch._foreach_mul_(small, 2.0)
    assert c.total.launches == 3 and c.total.bytes == 2 * 250 * 10 * 4
    with op_census() as c:
        torch._foreach_mul_(big, 2.0)
        torch._foreach_add(small, small)  # out of place, two lists in: depth 3, 48 tensors a launch
    assert c.total.launches == 2 + 6


def test_census_counts_cpu_attention_and_names_blocks_inside_containers():
    from it3d.core.profiling import op_census

    b, h, l, s_, d = 2, 3, 16, 24, 8
    q = torch.rand(b, h, l, d, requires_grad=True)
    k, v = torch.rand(b, h, s_, d), torch.rand(b, h, s_, d)
    with op_census() as c:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert c.total.flops == 2 * (2 * b * h * l * s_ * d)  # q k^T and p v
    with op_census() as c:
        out.sum().backward()
    assert c.total.flops == 2.5 * 2 * (2 * b * h * l * s_ * d)  # flop_counter's backward: 5 matmuls

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])

        def forward(self, x):
            for blk in self.blocks:  # the ModuleList itself is never called
                x = blk(x)
            return x

    with op_census(depth=2) as c:
        Net()(torch.rand(3, 4))
    assert set(c.by_module) - {"(none)"} == {"Net", "Net.blocks.0", "Net.blocks.1"}  # (none): the init, the input
    assert c.by_module["Net.blocks.0"].flops == 2 * 3 * 4 * 4
