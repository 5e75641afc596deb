"""Count the device->host synchronisations a piece of code would make on a GPU, on any device.

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
from typing import List, Optional

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


class peak_memory:
    """Context manager -> :class:`MemoryPeak`: the peak of the bytes allocated inside the block (CPU and,
    on a CUDA run, device memory, from the profiler's allocation events; frees of memory allocated
    before the block count against it), for comparing the memory of two ways of doing one step::

        with peak_memory() as m:
            step()
        m.peak_bytes
    """

    def __init__(self) -> None:
        self.result = MemoryPeak()

    def __enter__(self) -> "MemoryPeak":
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._prof = profile(activities=acts, profile_memory=True)
        self._prof.__enter__()
        return self.result

    def __exit__(self, *exc) -> bool:
        self._prof.__exit__(*exc)
        events = [e for e in self._prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        cur = peak = 0
        for e in events:
            cur += e.nbytes()
            peak = max(peak, cur)
        self.result.peak_bytes, self.result.end_bytes = peak, cur
        return False


@dataclass
class MemoryPeak:
    peak_bytes: int = 0  # the most bytes allocated at once inside the block, above what was allocated before it
    end_bytes: int = 0  # still allocated when it ended
