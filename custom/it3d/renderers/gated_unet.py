"""2D U-Net with gated convolutions (the deferred renderer's image network).

A gated convolution computes ``act(conv_f(x)) * sigmoid(conv_g(x))`` (one convolution with
twice the output channels, split in two). The U-Net has ``len(channels) - 1`` down steps
(stride-2 gated convs; odd sizes round up) and as many up steps (bilinear up-sampling to the
skip's exact size, concatenation with the skip, gated conv), then a 1x1 convolution to the
output channels.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import It3dError
from ..core.typing import Float, Tensor


class GatedConv2d(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, 2 * out_ch, kernel_size, stride=stride, padding=kernel_size // 2)
        self.act = nn.ELU()

    def forward(self, x: Float[Tensor, "B Ci H W"]) -> Float[Tensor, "B Co h w"]:
        feat, gate = self.conv(x).chunk(2, dim=1)
        return self.act(feat) * torch.sigmoid(gate)


class GatedUNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int] = (32, 64, 128, 256),
                 zero_init_output: bool = False) -> None:
        super().__init__()
        channels = list(channels)
        if len(channels) < 2:
            raise It3dError(f"gated U-Net: channels needs at least 2 entries (one per level), got {channels}")
        self.inp = nn.Sequential(GatedConv2d(in_channels, channels[0]), GatedConv2d(channels[0], channels[0]))
        self.down = nn.ModuleList(
            nn.Sequential(GatedConv2d(a, b, stride=2), GatedConv2d(b, b)) for a, b in zip(channels[:-1], channels[1:])
        )
        self.up = nn.ModuleList(
            nn.Sequential(GatedConv2d(b + a, a), GatedConv2d(a, a))
            for a, b in zip(reversed(channels[:-1]), reversed(channels[1:]))
        )
        self.out = nn.Conv2d(channels[0], out_channels, 1)
        if zero_init_output:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: Float[Tensor, "B Ci H W"]) -> Float[Tensor, "B Co H W"]:
        x = self.inp(x)
        skips = [x]
        for block in self.down:
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return self.out(x)
