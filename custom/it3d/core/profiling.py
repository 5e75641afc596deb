"""Count the device->host synchronisations a piece of code would make on a GPU, on any device; and
measure the memory a step holds at its peak (:class:`peak_allocated`, at the end).

On CUDA every ``.item()``, ``bool(tensor)``, ``nonzero`` or boolean-mask index stalls the host
until the GPU has caught up, and makes the step impossible to capture with CUDA graphs or
``torch.compile(mode="reduce-overhead")``. On a CPU nothing stalls, so tests cannot time it; they
can count it. :func:`count_syncs` installs two modes for the duration of a ``with`` block:

* a ``TorchDispatchMode`` that sees every aten op that runs, forward and backward (autograd
  carries the mode into the backward pass), and records those that read device data on the host:
  ``_local_scalar_dense`` (what ``.item()``, ``bool(t)``, ``if t:``, ``int(t)``, ``float(t)``,
  ``range(t)`` call; reported as ``item``), ops whose output size depends on the data
  (``nonzero``, ``argwhere``, ``masked_select``, ``unique*``, ``bincount``, ``repeat_interleave``
  without ``output_size``, indexing or assignment with a boolean mask), and ops that check their
  result on the host (``equal``, ``allclose``, ``_linalg_check_errors`` behind ``linalg.inv`` /
  ``solve`` / ``cholesky``: use the ``*_ex`` variants), and copies to the CPU;
* a ``TorchFunctionMode`` for the Python-level calls that never reach aten on a CPU tensor
  (``tolist``, ``numpy``, ``.cpu()``, ``repr``) and for uploads of Python data: ``torch.tensor`` /
  ``as_tensor`` of Python or numpy data with an explicit ``device`` (a blocking copy on CUDA; on a
  CPU run the device is the CPU, which is counted too), counted apart as ``uploads``.

    with count_syncs() as s:
        loss = step()
        loss.backward()
    assert s.count == 0, s.report()

On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` is the runtime's own check of the same thing.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_ATEN_SYNC = {"_local_scalar_dense", "nonzero", "argwhere", "masked_select", "unique_dim", "_unique", "_unique2",
              "unique_consecutive", "bincount", "equal", "allclose", "_linalg_check_errors"}
_HOST_METHODS = {"tolist", "numpy", "cpu", "__repr__", "__format__"}  # on a CPU tensor these never reach aten
_UPLOAD = {torch.tensor, torch.as_tensor}
_THIS = os.path.abspath(__file__)
_HERE = os.path.dirname(os.path.dirname(_THIS))  # the it3d package


@dataclass
class SyncEvent:
    op: str
    where: str  # innermost it3d frame "file:line" (or the innermost frame outside torch)
    kind: str  # "sync" | "upload"


def _has_bool_index(indices) -> bool:
    return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in (indices or ()))


def _is_cpu(device) -> bool:
    return device is not None and torch.device(device).type == "cpu"


def _classify_aten(func, args, kwargs) -> bool:
    """An aten op (what runs, forward and backward) that needs the host to read device data."""
    name = func._schema.name.split("::")[-1]
    if name in _ATEN_SYNC:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        return _has_bool_index(args[1] if len(args) > 1 else kwargs.get("indices"))
    if name == "repeat_interleave":
        return torch.is_tensor(args[0]) and len(args) < 3 and kwargs.get("output_size") is None
    if name == "_to_copy":
        dev = kwargs.get("device")
        return dev is not None and _is_cpu(dev) and args[0].device.type != "cpu"
    return False


def _classify_function(func, args, kwargs) -> Optional[str]:
    """Python-level calls that move data to the host without an aten op on CPU tensors, and uploads."""
    if func in _UPLOAD:  # host data put on the run's device (on CPU runs the device is the CPU: count it anyway)
        data = args[0] if args else kwargs.get("data")
        return "upload" if not torch.is_tensor(data) and kwargs.get("device") is not None else None
    return "sync" if getattr(func, "__name__", "") in _HOST_METHODS else None


def _call_site() -> str:
    frames = [f for f in traceback.extract_stack() if os.path.abspath(f.filename) != _THIS]
    for f in reversed(frames):
        if f.filename.startswith(_HERE):
            return f"{os.path.relpath(f.filename, os.path.dirname(_HERE))}:{f.lineno}"
    for f in reversed(frames):
        if "/torch/" not in f.filename:
            return f"{f.filename}:{f.lineno}"
    return "?"


@dataclass
class SyncCounter:
    events: List[SyncEvent] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Device->host synchronisations."""
        return sum(e.kind == "sync" for e in self.events)

    @property
    def uploads(self) -> int:
        return sum(e.kind == "upload" for e in self.events)

    def by_site(self, kind: str = "sync") -> dict:
        out: dict = {}
        for e in self.events:
            if e.kind == kind:
                key = f"{e.where} {e.op}"
                out[key] = out.get(key, 0) + 1
        return out

    def report(self) -> str:
        lines = [f"{self.count} device->host syncs, {self.uploads} host->device uploads"]
        for kind in ("sync", "upload"):
            for k, n in sorted(self.by_site(kind).items(), key=lambda kv: -kv[1]):
                lines.append(f"  {kind:6s} x{n:<4d} {k}")
        return "\n".join(lines)


class _FunctionMode(TorchFunctionMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # this mode is off while the handler runs: what ``func`` calls inside is not seen twice
        kwargs = kwargs or {}
        kind = _classify_function(func, args, kwargs)
        if kind is not None:
            self.counter.events.append(SyncEvent(getattr(func, "__name__", str(func)), _call_site(), kind))
        return func(*args, **kwargs)


class _DispatchMode(TorchDispatchMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _classify_aten(func, args, kwargs):
            name = func._schema.name.split("::")[-1]
            self.counter.events.append(SyncEvent("item" if name == "_local_scalar_dense" else name, _call_site(), "sync"))
        return func(*args, **kwargs)


class count_syncs:
    """Context manager -> :class:`SyncCounter` of the syncs (and uploads) made inside it (this thread,
    and autograd's backward of graphs built inside it)."""

    def __init__(self) -> None:
        self.counter = SyncCounter()
        self._modes = (_DispatchMode(self.counter), _FunctionMode(self.counter))

    def __enter__(self) -> SyncCounter:
        for m in self._modes:
            m.__enter__()
        return self.counter

    def __exit__(self, *exc) -> bool:
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False


SYNC_TIMING_ENV = "IT3D_SYNC_TIMING"


def sync_if_timing(device) -> None:
    """Wait for ``device``'s queued work, in measuring runs only (``$IT3D_SYNC_TIMING=1``, CUDA): a
    timer read after it counts the work, not its launch. Normal runs get no extra host sync."""
    if os.environ.get(SYNC_TIMING_ENV) == "1" and torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def _device_of(device) -> Optional[torch.device]:
    if device is None:
        return None
    d = torch.device(device)
    return torch.device(d.type, 0) if d.type == "cuda" and d.index is None else d


def _same_device(dev_type, dev_index, want: Optional[torch.device]) -> bool:
    if want is None:
        return True
    if str(dev_type).split(".")[-1].lower() != want.type:
        return False
    return want.type == "cpu" or dev_index == want.index


def live_storages(device="cpu") -> Dict[int, int]:
    """``data_ptr -> nbytes`` of the storages of every tensor a Python object holds on ``device`` (views
    and tensors sharing a storage count once). Found through the garbage collector, which tracks every
    tensor and parameter object; tensors only C++ holds (an autograd graph nobody references any more,
    compiled-graph caches) are not seen."""
    import gc

    want = _device_of(device)
    out: Dict[int, int] = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor):  # type(): no __class__ lookup on lazy module proxies
            continue
        try:
            if want is not None and (obj.device.type != want.type or (want.type != "cpu" and obj.device.index != want.index)):
                continue
            st = obj.untyped_storage()
            ptr, n = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError, TypeError):  # meta / fake / sparse / wrapper subclasses
            continue
        if ptr and n:
            out[ptr] = n
    return out


@dataclass
class MemoryUse:
    """What :class:`peak_allocated` measured on one device."""
    resident_bytes: int = 0  # held by live tensor storages at entry (weights, optimizer states, caches)
    peak_bytes: int = 0  # the most bytes allocated at once inside the block, above the entry
    end_bytes: int = 0  # allocated inside the block and still held at its end (net of frees seen)
    freed_resident_bytes: int = 0  # entry storages freed inside the block: their frees carry no size on a
    # CPU (the profiler's allocator never saw them allocated), so ``peak_bytes`` may overstate by up to this
    allocations: int = 0  # allocation events seen

    @property
    def peak_total_bytes(self) -> int:
        """``resident_bytes + peak_bytes``: what ``torch.cuda.max_memory_allocated`` would report for the
        block after ``reset_peak_memory_stats`` (without the allocator's rounding to 512-byte blocks)."""
        return self.resident_bytes + self.peak_bytes

    def report(self) -> str:
        g = 2 ** 30
        return (f"resident {self.resident_bytes / g:.3f} GiB + step peak {self.peak_bytes / g:.3f} GiB = "
                f"{self.peak_total_bytes / g:.3f} GiB ({self.allocations} allocations"
                + (f", {self.freed_resident_bytes / g:.3f} GiB of resident storages freed inside" if self.freed_resident_bytes else "")
                + ")")


class peak_allocated:
    """Context manager -> :class:`MemoryUse`: the peak of the bytes held by tensor storages on ``device``
    while the block runs, forward and backward, and the bytes held at entry (the resident weights)::

        system.zero_grad(set_to_none=True)
        with peak_allocated("cpu") as m:
            loss = system.training_step(batch, 0)["loss"]
            loss.backward()
        m.resident_bytes, m.peak_bytes, m.peak_total_bytes

    Mechanism: the profiler's memory events (``profile_memory=True``): every allocation and free the
    device's allocator makes, with its size and time -- op outputs, the tensors autograd saves for the
    backward pass, a kernel's temporaries, gradients -- summed in time order; the peak of the running sum
    is ``peak_bytes``. Exact on a CPU (its allocator allocates exactly what is asked); on CUDA the caching
    allocator's events are its 512-byte-rounded blocks. Not seen: memory a library allocates without the
    PyTorch allocator (BLAS packing buffers, oneDNN scratchpads on a CPU; cuBLAS / cuDNN workspaces come
    from the caching allocator and are seen on CUDA), and allocations on threads the profiler does not
    follow (inside OpenMP regions, where kernels rarely allocate). ``resident_bytes`` comes from
    :func:`live_storages` at entry (``resident=False`` skips that scan). A free of a storage that existed
    before the block carries no size on a CPU, so the sum does not drop (nor for one that an earlier
    profiler happened to size: frees are matched to the block's own allocations by address, so the figure
    does not depend on what was profiled before): ``freed_resident_bytes`` says by how much the peak can be
    overstated (call ``zero_grad(set_to_none=True)`` before the block).
    """

    def __init__(self, device="cpu", resident: bool = True) -> None:
        self.device = _device_of(device)
        self.resident = resident
        self.result = MemoryUse()

    def __enter__(self) -> MemoryUse:
        from torch.profiler import ProfilerActivity, profile

        self._entry = live_storages(self.device) if self.resident else {}
        self.result.resident_bytes = sum(self._entry.values())
        cuda = torch.cuda.is_available() and (self.device is None or self.device.type == "cuda")
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self._prof = profile(activities=acts, profile_memory=True)
        self._prof.__enter__()
        return self.result

    def __exit__(self, *exc) -> bool:
        self._prof.__exit__(*exc)
        events = _memory_events(self._prof.profiler.kineto_results, self.device)
        self._prof = None
        cur = peak = allocs = 0
        held: Dict[tuple, int] = {}  # (device, ptr) -> bytes of the storages allocated inside the block
        for _, dev, ptr, n in events:
            if n > 0:
                held[(dev, ptr)] = n
                allocs += 1
            elif (dev, ptr) in held:
                n = -held.pop((dev, ptr))
            elif dev.type == "cpu":
                # a CPU free of a storage from before the block: sized only when that storage happened to be
                # allocated under an earlier profiler, so never counted (a peak that does not depend on
                # which profilers ran before)
                continue
            cur += n
            peak = max(peak, cur)
        r = self.result
        r.peak_bytes, r.end_bytes, r.allocations = peak, cur, allocs
        if self.resident:
            still = live_storages(self.device)
            r.freed_resident_bytes = sum(n for p, n in self._entry.items() if still.get(p) != n)
        self._entry = {}
        return False


def _memory_events(results, device: Optional[torch.device]) -> List[tuple]:
    """``(time_ns, device, ptr, bytes)`` of every allocation (bytes > 0) and free (< 0) the profiler
    recorded on ``device`` (None: every device), in time order."""
    from torch._C._profiler import _EventType

    out = []
    stack = list(results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag != _EventType.Allocation:
            continue
        f = node.extra_fields
        dev = _device_of(f.device)
        if _same_device(dev.type, dev.index, device):
            out.append((node.start_time_ns, dev, f.ptr, f.alloc_size))
    out.sort(key=lambda e: e[0])
    return out


class peak_memory(peak_allocated):
    """Context manager -> :class:`MemoryUse`: the peak of the bytes allocated inside the block, on every
    device (CPU and, on a CUDA run, device memory), without the resident scan; for comparing the memory of
    two ways of doing one step::

        with peak_memory() as m:
            step()
        m.peak_bytes
    """

    def __init__(self) -> None:
        super().__init__(device=None, resident=False)


MemoryPeak = MemoryUse  # the old name


# ----------------------------------------------------------------------------- op census (a time floor)
@dataclass(frozen=True)
class DeviceSpec:
    """The figures a roofline needs: dense half-precision matmul peak (FLOP/s) and memory bandwidth (B/s)."""
    name: str
    peak_flops: float
    bandwidth: float


# NVIDIA's H100 SXM5 / H200 SXM datasheets: 989.4 dense BF16/FP16 tensor TFLOPS (1,979 "with sparsity");
# HBM3 3.35 TB/s, HBM3e 4.8 TB/s. Same compute die.
H100 = DeviceSpec("H100 SXM", 989.4e12, 3.35e12)
H200 = DeviceSpec("H200 SXM", 989.4e12, 4.8e12)
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "resize_",
              "_local_scalar_dense", "lift_fresh", "is_same_size", "sym_size", "sym_stride", "sym_numel"}


@dataclass
class OpTally:
    launches: int = 0  # aten ops that run a kernel (views, allocations and metadata ops are free)
    flops: float = 0.0  # matmul / convolution / attention FLOPs (torch.utils.flop_counter's formulas)
    bytes: float = 0.0  # bytes the kernels read and write: their tensor inputs and outputs
    compute_s: float = 0.0  # flops / peak
    memory_s: float = 0.0  # bytes / bandwidth
    roofline_s: float = 0.0  # per kernel the larger of the two, summed: no fusion, no launch cost

    def add(self, flops: float, nbytes: float, spec: DeviceSpec, launches: int = 1) -> None:
        c, m = flops / spec.peak_flops, nbytes / spec.bandwidth
        self.launches += launches
        self.flops += flops
        self.bytes += nbytes
        self.compute_s += c
        self.memory_s += m
        self.roofline_s += max(c, m)


@dataclass
class OpCensus:
    """What :class:`op_census` counted: ``total`` and, per module (its fully qualified name from the first
    module called, nested in at most ``depth - 1`` other running modules; ``(none)`` for ops outside every
    module), an :class:`OpTally`."""
    spec: DeviceSpec
    total: OpTally = field(default_factory=OpTally)
    by_module: Dict[str, OpTally] = field(default_factory=dict)

    def seconds(self, launch_s: float = 0.0) -> float:
        """The roofline time plus ``launch_s`` per kernel launch."""
        return self.total.roofline_s + launch_s * self.total.launches


def _nbytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches for ``t``: its elements, but no more than its storage (broadcast views)."""
    n = t.numel() * t.element_size()
    try:
        return min(n, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return n


# CUDA's multi-tensor kernels (ATen/native/cuda/MultiTensorApply.cuh): a launch takes at most 320 blocks of 65,536
# elements and, by the number of tensor lists, 110 / 64 / 48 / 36 / 30 tensors (the 4 KB-argument limits; CUDA >= 12.1
# drivers take more tensors a launch, so this is an upper bound there)
_MT_CHUNK, _MT_BLOCKS, _MT_TENSORS = 65536, 320, (110, 64, 48, 36, 30)


def _foreach_launches(name: str, args, out) -> int:
    """Kernel launches of one ``_foreach_*`` op on CUDA: one per full launch of its tensor lists."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    if not lists:
        return 1
    depth = len(lists) + (0 if name.endswith("_") else 1)  # an out-of-place op writes one more list
    per_launch = _MT_TENSORS[min(depth, len(_MT_TENSORS)) - 1]
    chunks = sum(-(-t.numel() // _MT_CHUNK) for t in lists[0])
    return max(1, -(-len(lists[0]) // per_launch), -(-chunks // _MT_BLOCKS))


def _module_depth(fqn: str) -> int:
    """Levels of a module name: a list index below a container counts with it (``Unet.down_blocks.0``: 2; a
    ModuleList is never called), one right below the first module is a level of its own (``Sequential.0``: 2)."""
    segs = fqn.split(".")
    return sum(1 for i, s in enumerate(segs) if i <= 1 or not s.isdigit())


def _cpu_attention():
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    return {"_scaled_dot_product_flash_attention_for_cpu": sdpa_flop_count,
            "_scaled_dot_product_flash_attention_for_cpu_backward": sdpa_backward_flop_count}


_CPU_ATTENTION = _cpu_attention()
_CPU_ATTENTION_ARGS = {"_scaled_dot_product_flash_attention_for_cpu": 3,  # q, k, v
                       "_scaled_dot_product_flash_attention_for_cpu_backward": 4}  # grad_out, q, k, v


def _is_view(func) -> bool:
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


class _CensusMode(TorchDispatchMode):
    def __init__(self, census: OpCensus, tracker, depth: int) -> None:
        super().__init__()
        self.census, self.tracker, self.depth = census, tracker, depth

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        if _is_view(func) or name in _NO_KERNEL:
            return out
        packet = func._overloadpacket
        if packet in flop_registry:
            flops = float(flop_registry[packet](*args, **kwargs, out_val=out))
        elif name in _CPU_ATTENTION:  # the CPU's attention kernels, absent from flop_counter's table
            flops = float(_CPU_ATTENTION[name](*(a.shape for a in args[:_CPU_ATTENTION_ARGS[name]])))
        else:
            flops = 0.0
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs:  # an in-place op that returns nothing (``_foreach_*_``): its written arguments are its output
            outs = [t for a, v in zip(func._schema.arguments, args)
                    if a.alias_info is not None and a.alias_info.is_write
                    for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor)]
        nbytes = float(sum(_nbytes(t) for t in ins + outs))
        spec = self.census.spec
        n = _foreach_launches(name, args, out) if name.startswith("_foreach_") else 1
        self.census.total.add(flops, nbytes, spec, n)
        mods = [p for p in self.tracker.parents if p != "Global" and _module_depth(p) <= self.depth]
        for m in mods or ["(none)"]:
            self.census.by_module.setdefault(m, OpTally()).add(flops, nbytes, spec, n)
        return out


class op_census:
    """Context manager -> :class:`OpCensus`: every aten op the block runs, forward and backward, as the
    kernels a GPU would launch, each with its FLOPs and the bytes it reads and writes, and from those a
    roofline time on ``spec``: per kernel max(FLOPs / peak, bytes / bandwidth). It is a floor -- no launch
    cost, no host overhead, no kernel below its roofline -- and an upper bound on what fusing kernels
    saves in traffic (every kernel here reads its inputs from memory and writes its outputs back). It
    counts the ops of the code path that ran (on a CPU: the CPU's, e.g. the torch hash grid, not Triton's
    fused kernel)::

        with op_census(H100, depth=2) as c:
            loss = step(); loss.backward()
        c.total.flops, c.total.launches, c.seconds(launch_s=4e-6), c.by_module["UNet2DConditionModel"]

    Views, allocations and metadata ops launch nothing and count nothing; a ``_foreach_*`` op counts the
    launches CUDA's multi-tensor apply makes for its lists (a CPU runs it tensor by tensor)."""

    def __init__(self, spec: DeviceSpec = H100, depth: int = 1) -> None:
        self.result = OpCensus(spec)
        self.depth = depth

    def __enter__(self) -> OpCensus:
        from torch.utils.module_tracker import ModuleTracker

        self._tracker = ModuleTracker()
        self._tracker.__enter__()
        self._mode = _CensusMode(self.result, self._tracker, self.depth)
        self._mode.__enter__()
        return self.result

    def __exit__(self, *exc) -> bool:
        self._mode.__exit__(*exc)
        self._tracker.__exit__(*exc)
        return False
