"""peak_allocated: the peak of the bytes tensor storages hold during a block, counted exactly on a CPU.

Every expected figure is derived by hand from the shapes (fp32: 4 bytes an element); a tool that missed
autograd's saved tensors, the backward pass, a kernel's output or a free would fail them.
"""
import torch

from it3d.core.profiling import live_storages, peak_allocated, peak_memory

MiB = 2 ** 20


def test_allocations_and_frees_in_time_order():
    with peak_allocated() as m:
        a = torch.empty(MiB, dtype=torch.uint8)  # 1 MiB
        b = torch.empty(2 * MiB, dtype=torch.uint8)  # 3 MiB live
        del a  # 2 MiB
        c = torch.empty(4 * MiB, dtype=torch.uint8)  # 6 MiB: the peak
        del b  # 4 MiB held at the end
    assert m.peak_bytes == 6 * MiB
    assert m.end_bytes == 4 * MiB
    assert m.allocations == 3
    assert m.peak_total_bytes == m.resident_bytes + 6 * MiB
    del c


def test_a_view_allocates_nothing_and_an_out_of_place_op_its_output():
    x = torch.zeros(MiB // 4)  # 1 MiB, before the block
    with peak_allocated() as m:
        v = x.view(-1, 4).t()  # a view: no storage
        y = x + 1  # 1 MiB, and the Python 1: a 0-dim double (8 bytes) cast to float (4 bytes), freed after
        x.add_(1)  # in place: only the scalar's 8 + 4 bytes again
    assert (m.peak_bytes, m.end_bytes, m.allocations) == (MiB + 12, MiB, 5)
    del v, y


def test_linear_forward_keeps_the_saved_output_alive():
    """loss = sigmoid(linear(x)).sum() with nothing but the graph holding the activations."""
    torch.manual_seed(0)
    n, i, o = 256, 1024, 1024
    lin, x = torch.nn.Linear(i, o), torch.randn(n, i)
    A = n * o * 4  # one (n, o) fp32 activation: 1 MiB
    with peak_allocated() as m:
        loss = lin(x).sigmoid().sum()
    # h = addmm(b, x, W^T): A; y = sigmoid(h): A (2A: the peak); h is freed (addmm saves x and W, both
    # older than the block); sigmoid saved y for its backward, so A stays, and the scalar loss: 4 bytes
    assert m.peak_bytes == 2 * A
    assert m.end_bytes == A + 4
    del loss


def test_linear_forward_and_backward_by_hand():
    torch.manual_seed(0)
    n, i, o = 256, 1024, 1024
    lin, x = torch.nn.Linear(i, o), torch.randn(n, i)
    A, W, B = n * o * 4, o * i * 4, o * 4  # activation 1 MiB, weight gradient 4 MiB, bias gradient 4 KiB
    with peak_allocated() as m:
        loss = lin(x).sigmoid().sum()
        loss.backward()
    # forward as above: peak 2A, then y (saved) + loss (4 bytes). backward: the seed ones_like(loss) (4 bytes;
    # SumBackward expands it, a view); SigmoidBackward allocates grad_h (A), then the engine frees y (A);
    # AddmmBackward allocates dW = (grad_h^T x) (W; transposed back by TBackward into the weight's layout, so
    # AccumulateGrad keeps it without a copy) and db = grad_h.sum(0) (B): A + W + B + 8 live at once
    assert m.peak_bytes == A + W + B + 8
    # grad_h and the seed are freed with the graph; the two gradients and the loss stay
    assert m.end_bytes == W + B + 4
    assert m.freed_resident_bytes == 0
    assert lin.weight.grad.nbytes == W and lin.bias.grad.nbytes == B
    del loss


def test_resident_counts_each_live_storage_once():
    before = live_storages("cpu")
    w = torch.empty(3 * MiB, dtype=torch.uint8)
    views = (w[:MiB], w.view(3, MiB))  # share w's storage: counted once
    p = torch.nn.Parameter(torch.empty(MiB // 4))  # 1 MiB
    after = live_storages("cpu")
    new = {k: v for k, v in after.items() if k not in before}
    assert sorted(new.values()) == [MiB, 3 * MiB]
    with peak_allocated() as m:
        pass
    assert m.resident_bytes >= 4 * MiB and m.peak_bytes == 0 and m.allocations == 0
    with peak_allocated(resident=False) as m2:
        pass
    assert m2.resident_bytes == 0
    del views, p


def test_a_free_of_an_older_storage_is_flagged():
    """The CPU allocator cannot size a free of memory allocated before profiling: the sum does not drop,
    and the tool says by how much the peak may be overstated."""
    old = torch.empty(2 * MiB, dtype=torch.uint8)
    with peak_allocated() as m:
        del old
        new = torch.empty(MiB, dtype=torch.uint8)
    assert m.peak_bytes == MiB  # not MiB - 2 MiB: the free was not sized
    assert m.freed_resident_bytes == 2 * MiB
    del new


def test_a_free_of_a_storage_an_earlier_profiler_sized_is_not_counted():
    """The CPU allocator sizes a free of a storage allocated while any profiler ran (CI saw -256 bytes from
    an earlier test's tensor): frees are matched to the block's own allocations, so the peak is the same
    whichever profilers ran before."""
    with peak_allocated(resident=False):
        old = torch.empty(2 * MiB, dtype=torch.uint8)  # allocated under a profiler: its free is sized
    with peak_allocated() as m:
        del old
        new = torch.empty(MiB, dtype=torch.uint8)
        del new
        newer = torch.empty(3 * MiB, dtype=torch.uint8)
    assert (m.peak_bytes, m.end_bytes, m.allocations) == (3 * MiB, 3 * MiB, 2)
    assert m.freed_resident_bytes == 2 * MiB
    del newer


def test_peak_memory_keeps_its_interface():
    with peak_memory() as m:
        x = torch.empty(MiB, dtype=torch.uint8)
        del x
    assert (m.peak_bytes, m.end_bytes) == (MiB, 0)
