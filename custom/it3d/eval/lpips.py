"""LPIPS (Zhang et al. 2018, "vgg" variant) with a pure-torch VGG16 feature stack.

Weights are read from a directory (or a single file) holding ONE state dict, in
``lpips_vgg16.safetensors`` (preferred) or ``lpips_vgg16.pt``. Expected keys:

* ``features.{i}.weight`` / ``features.{i}.bias`` for the 13 convolutions of VGG16,
  with torchvision's indices i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
  (exactly the ``features.*`` entries of torchvision's ``vgg16`` state dict);
* ``lin{k}.model.1.weight`` (k = 0..4), shape (1, C_k, 1, 1): the LPIPS linear heads
  (exactly the keys of the official ``lpips/weights/v0.1/vgg.pth``).

Channel widths are read from the weight shapes, so a narrow random copy with the same
layer layout (the tiny model of ``it3d.testing.tiny_eval``) loads through the same code.

Converting the official weights (no torchvision needed, run once on any machine)::

    python -m it3d.eval.lpips convert --vgg vgg16-397923af.pth --lin vgg.pth --out models/lpips-vgg16

where ``vgg16-397923af.pth`` is torchvision's ImageNet VGG16 checkpoint and ``vgg.pth``
the official LPIPS v0.1 linear heads. Point the evaluation at ``models/lpips-vgg16``
(``--lpips``) or put it under ``$IT3D_MODEL_ROOT/lpips-vgg16``.
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..core import hub, io
from ..core.errors import It3dError
from ..core.typing import Float, Tensor

DEFAULT_ID = "lpips-vgg16"
WEIGHT_FILES = ("lpips_vgg16.safetensors", "lpips_vgg16.pt")
# VGG16 "D" layout: convs per block; max-pool between blocks (torchvision indices follow from it)
BLOCKS = (2, 2, 3, 3, 3)
TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
# LPIPS ScalingLayer constants (inputs in [-1, 1])
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# ImageNet normalisation used when the features feed the contextual loss
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailable(It3dError):
    """Raised when a metric's weights cannot be found; the metric is then reported as unavailable."""


def conv_indices() -> List[int]:
    """torchvision ``features`` indices of the 13 convolutions."""
    out, i = [], 0
    for n in BLOCKS:
        for _ in range(n):
            out.append(i)
            i += 2  # conv, relu
        i += 1  # max-pool
    return out


class VGG16Features(nn.Module):
    """VGG16 conv stack up to relu5_3 with torchvision's module indices; returns the named taps."""

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512, 512)) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        self.tap_index: Dict[int, str] = {}
        cin = 3
        for b, (n, w) in enumerate(zip(BLOCKS, widths)):
            if b > 0:
                layers.append(nn.MaxPool2d(2, 2))
            for j in range(n):
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(inplace=False)]
                cin = w
            self.tap_index[len(layers) - 1] = TAPS[b]
        self.features = nn.Sequential(*layers)
        self.widths = tuple(widths)

    def forward(self, x: Float[Tensor, "B 3 H W"], until: Optional[str] = None) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            name = self.tap_index.get(i)
            if name is not None:
                out[name] = x
                if name == until:
                    break
        return out


class LinHead(nn.Module):
    """LPIPS ``NetLinLayer``: dropout + 1x1 conv without bias (key ``model.1.weight``)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(c, 1, 1, bias=False))


class LPIPS(nn.Module):
    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512, 512)) -> None:
        super().__init__()
        self.net = VGG16Features(widths)
        for k, w in enumerate(widths):
            self.add_module(f"lin{k}", LinHead(w))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _unit(f: Tensor, eps: float = 1e-10) -> Tensor:
        return f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + eps)

    def forward(self, a: Float[Tensor, "B H W 3"], b: Float[Tensor, "B H W 3"]) -> Float[Tensor, "B"]:
        """LPIPS distance between images in [0, 1] (B H W 3); 0 for identical images."""
        x = torch.cat([a, b], 0).permute(0, 3, 1, 2).to(self.shift.dtype) * 2.0 - 1.0
        feats = self.net((x - self.shift) / self.scale)
        n = a.shape[0]
        total = torch.zeros(n, device=a.device, dtype=self.shift.dtype)
        for k, name in enumerate(TAPS):
            f = self._unit(feats[name])
            d = (f[:n] - f[n:]) ** 2
            total = total + getattr(self, f"lin{k}").model(d).mean(dim=(1, 2, 3))
        return total

    def vgg_features(self, img: Float[Tensor, "B H W 3"], layers: Sequence[str]) -> Dict[str, Tensor]:
        """Backbone features (ImageNet-normalised input) for the contextual distance."""
        mean = torch.tensor(IMAGENET_MEAN, device=img.device, dtype=self.shift.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=img.device, dtype=self.shift.dtype).view(1, 3, 1, 1)
        x = (img.permute(0, 3, 1, 2).to(self.shift.dtype) - mean) / std
        last = max(layers, key=TAPS.index)
        feats = self.net(x, until=last)
        return {k: feats[k] for k in layers}


def state_dict_widths(sd: Dict[str, Tensor]) -> List[int]:
    idx = conv_indices()
    missing = [f"features.{i}.weight" for i in idx if f"features.{i}.weight" not in sd]
    missing += [f"lin{k}.model.1.weight" for k in range(5) if f"lin{k}.model.1.weight" not in sd]
    if missing:
        raise WeightsUnavailable(f"LPIPS state dict lacks keys {missing[:3]}{'...' if len(missing) > 3 else ''} "
                                 f"(expected torchvision vgg16 'features.*' + official lpips 'lin*.model.1.weight')")
    ends = [sum(BLOCKS[: b + 1]) - 1 for b in range(5)]
    return [int(sd[f"features.{idx[e]}.weight"].shape[0]) for e in ends]


def weights_file(path: str) -> str:
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise WeightsUnavailable(f"LPIPS weights not found in {path} (expected one of {', '.join(WEIGHT_FILES)})")
    raise WeightsUnavailable(
        f"LPIPS weights '{path}' not found: pass --lpips DIR, or put them under $IT3D_MODEL_ROOT/{DEFAULT_ID} "
        f"(convert the official ones with: python -m it3d.eval.lpips convert --vgg VGG16.pth --lin vgg.pth --out DIR)")


def read_state_dict(path: str) -> Dict[str, Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


_loaded: Dict[tuple, LPIPS] = {}


def load_lpips(id_or_path: str = DEFAULT_ID, device="cpu") -> LPIPS:
    """Build LPIPS from a weights dir/file (or an id under ``$IT3D_MODEL_ROOT``); cached per process."""
    path = hub.local_dir(id_or_path) or id_or_path
    key = (os.path.abspath(path), str(device))
    if key not in _loaded:
        sd = read_state_dict(weights_file(path))
        model = LPIPS(state_dict_widths(sd))
        keep = {k: v for k, v in sd.items() if k.startswith(("features.", "lin"))}
        net_sd = {f"net.{k}" if k.startswith("features.") else k: v.float() for k, v in keep.items()}
        model.load_state_dict(net_sd, strict=True)
        _loaded[key] = model.to(device).eval().requires_grad_(False)
    return _loaded[key]


def save_weights(sd: Dict[str, Tensor], out_dir: str) -> str:
    from safetensors.torch import save_file

    state_dict_widths(sd)  # checks the keys
    path = os.path.join(out_dir, WEIGHT_FILES[0])
    with io.atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp)
    return path


def convert_official(vgg_path: str, lin_path: str, out_dir: str) -> str:
    """torchvision vgg16 state dict + official LPIPS vgg.pth -> ``out_dir/lpips_vgg16.safetensors``."""
    vgg = read_state_dict(vgg_path)
    lin = read_state_dict(lin_path)
    sd = {k: v for k, v in vgg.items() if k.startswith("features.")}
    sd.update({k: v for k, v in lin.items() if k.startswith("lin")})
    return save_weights(sd, out_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m it3d.eval.lpips")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="merge torchvision vgg16 + official LPIPS heads into one safetensors file")
    c.add_argument("--vgg", required=True, help="torchvision vgg16 checkpoint (e.g. vgg16-397923af.pth)")
    c.add_argument("--lin", required=True, help="official LPIPS v0.1 vgg.pth")
    c.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    print(convert_official(args.vgg, args.lin, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
