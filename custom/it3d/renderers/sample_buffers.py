"""Fixed-size compaction buffers: gather the True entries of a mask without reading their count on
the host, so a training step keeps static shapes and never waits for the device.

``torch.nonzero`` has a data-dependent output size: on CUDA it copies the count to the host (a
sync) and every later shape depends on it. :meth:`CompactionBuffers.compact` uses
``torch.nonzero_static`` with a size fixed in advance instead: per key (a renderer pass, a
raster scale) a fraction of the mask's entries, rounded up to 1/32. The fraction starts at 1 (all
entries); :meth:`CompactionBuffers.resize` sets it to ``margin`` x the largest fraction of True
entries measured since its previous call (one host read, done by the renderers every so many
training steps). Entries past the buffer are dropped (the last ones in flat order); their number
is counted on the device and returned as a warning text by the next resize, which also enlarges
the buffer. ``margin = 0`` or ``exact=True`` (eval) sizes the buffer to the exact count (one host
sync per call, never drops). ``margin = "auto"``: exact on CPU tensors (there a host read costs
nothing, while unused buffer slots cost compute) and ``auto_margin`` on accelerators.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch

from ..core.errors import ConfigError
from ..core.typing import Tensor

CAPACITY_STEP = 32  # buffer fractions are multiples of 1/32: few distinct shapes


def check_margin(value: Any, key: str) -> None:
    if value == "auto":
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = -1.0
    if v != 0 and v < 1:
        raise ConfigError(f"{key}: expected auto, 0 (exact) or a number >= 1, got {value!r}")


class CompactionBuffers:
    def __init__(self, margin: Any, what: str, dropped_as: str, margin_key: str, auto_margin: float = 1.5) -> None:
        check_margin(margin, margin_key)
        self.auto = margin == "auto"
        self.margin = float(auto_margin if self.auto else margin)
        self.what, self.dropped_as, self.margin_key = what, dropped_as, margin_key
        self.fraction: Dict[str, float] = {}  # per key, of the mask's entries (host)
        self._peak: Dict[str, Tensor] = {}  # per key, since the last resize (device)
        self._dropped: Optional[Tensor] = None

    def compact(self, mask: Tensor, key: str, exact: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
        """-> (flat indices of the True entries of ``mask`` in order, padded with ``mask.numel()``; their
        count; how many did not fit), the counts as device tensors."""
        flat = mask.reshape(-1)
        total = flat.numel()
        count = flat.sum()
        if exact or self.margin == 0 or (self.auto and flat.device.type == "cpu"):
            cap = int(count)
            over = torch.zeros_like(count)
        else:
            cap = min(total, math.ceil(self.fraction.get(key, 1.0) * total))
            frac = count.float() / max(total, 1)
            self._peak[key] = torch.maximum(self._peak[key], frac) if key in self._peak else frac
            over = (count - cap).clamp_min(0)
            self._dropped = over if self._dropped is None else self._dropped + over
        return torch.nonzero_static(flat, size=cap, fill_value=total).squeeze(1), count, over

    def resize(self) -> Optional[str]:
        """Size every buffer from the peaks measured since the last call (one host read) -> a warning
        text when entries did not fit since then, else None."""
        if not self._peak or self.margin == 0:
            return None
        keys = sorted(self._peak)
        vals = torch.stack([self._peak[k].float() for k in keys] + [self._dropped.float()]).tolist()
        old = {k: self.fraction.get(k, 1.0) for k in keys}
        for k, peak in zip(keys, vals):
            steps = math.ceil(CAPACITY_STEP * self.margin * peak - 1e-9)
            self.fraction[k] = min(1.0, max(1, steps) / CAPACITY_STEP)
        self._peak, self._dropped = {}, None
        if vals[-1] <= 0:
            return None
        return (f"{int(vals[-1])} {self.what} did not fit the fixed-size training buffers "
                f"({', '.join(f'{k} {old[k]:.0%}' for k in keys)}) since the last resize and were {self.dropped_as}; "
                f"buffers now {', '.join(f'{k} {self.fraction[k]:.0%}' for k in keys)}. If this repeats, raise "
                f"{self.margin_key} (now {'auto: ' if self.auto else ''}{self.margin}) or set it to 0 (exact sizing, "
                f"with host syncs)")
