"""Build an encoding from its config dict (``otype: HashGrid | Frequency``) and small MLPs."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..core.config import ConfigError, _to_container
from ..core.registry import suggest

OTYPES = ("HashGrid", "Frequency")


def build_encoding(cfg: Any, n_input_dims: int = 3, path: str = "encoding") -> nn.Module:
    """-> module with ``n_output_dims`` and ``forward(x: N x n_input_dims, twice_differentiable=False)``."""
    raw = dict(_to_container(cfg) or {})
    otype = raw.get("otype", "HashGrid")
    if otype == "HashGrid":
        from .hash_grid import HashGridEncoding

        return HashGridEncoding(raw, n_input_dims, path)
    if otype == "Frequency":
        from .frequency import FrequencyEncoding

        return FrequencyEncoding(raw, n_input_dims, path)
    raise ConfigError(f"{path}.otype: unknown encoding '{otype}'{suggest(otype, OTYPES)} (known: {', '.join(OTYPES)})")


def validate_encoding(cfg: Any, path: str = "encoding") -> None:
    """Check an encoding config (strict keys) without building it."""
    from ..core.config import parse_structured
    from .frequency import FrequencyConfig
    from .hash_grid import HashGridConfig

    raw = dict(_to_container(cfg) or {})
    otype = raw.get("otype", "HashGrid")
    known = {"HashGrid": HashGridConfig, "Frequency": FrequencyConfig}
    if otype not in known:
        raise ConfigError(f"{path}.otype: unknown encoding '{otype}'{suggest(otype, OTYPES)} (known: {', '.join(OTYPES)})")
    parse_structured(known[otype], raw, path)


ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "softplus": nn.Softplus, "tanh": nn.Tanh}


def make_mlp(n_in: int, n_out: int, n_neurons: int = 64, n_layers: int = 3, activation: str = "relu",
             path: str = "mlp") -> nn.Sequential:
    """``n_layers`` linear layers (``n_layers - 1`` hidden layers of ``n_neurons``), no output activation."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"{path}: unknown activation '{activation}'{suggest(activation, ACTIVATIONS)}")
    if n_layers < 1:
        raise ConfigError(f"{path}: need at least one layer, got {n_layers}")
    dims = [n_in] + [n_neurons] * (n_layers - 1) + [n_out]
    layers = []
    for i in range(n_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < n_layers - 1:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)
