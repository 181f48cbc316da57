"""U-Nets for lung segmentation (torch; training / export only).

- ``unet2d_lung``: a small 2D U-Net (Ronneberger et al. 2015) for single CT slices, the learned
  segmenter ctsdk ships as ONNX (``runs/seg/unet2d_lung.onnx``). Input ``(N, 1, H, W)`` grey in
  ``[0, 1]`` prepared by :func:`sdk.lungs.unet2d.prepare_slices`; output ``(N, 1, H, W)`` logits.
  H and W must be multiples of ``2 ** (levels - 1)``.
- ``unet3d_lung``: the 3D U-Net at 128^3 used by paper 000, the GPU path's lung segmenter. Input
  ``(N, 1, 128, 128, 128)`` windowed [0, 1] from the resample kernel (``sdk.lungs.unet3d.RESAMPLE``);
  output logits. Distilled from the hybrid segmenter by ``sdk.train.seg3d`` (the self-contained
  trainer ``sdk/train/seg3d_kit.py`` keeps a key-for-key copy of this class); shipped as
  ``lungs3d_fp32.onnx`` / ``lungs3d_fp16.onnx``. See docs/segmentation.md, "3D U-Net".

Both use Conv-BN-ReLU pairs, max-pool down-sampling and transposed-conv up-sampling with skip
concatenation, so they export to ONNX opset 17 with a dynamic batch axis.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

__all__ = ["UNet", "unet2d_lung", "unet3d_lung"]


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, dims: int) -> None:
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        super().__init__(
            conv(cin, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True),
            conv(cout, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """A plain U-Net.

    Args:
        dims: 2 or 3.
        in_channels: input channels (1 for CT).
        out_channels: output logit channels (1 = lung vs background).
        base: channels at the first level; level ``i`` has ``base * 2 ** i``.
        levels: resolution levels including the bottleneck (4 = three down-samplings).
    """

    def __init__(self, dims: int = 2, in_channels: int = 1, out_channels: int = 1, base: int = 16, levels: int = 4) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"UNet dims must be 2 or 3, not {dims}")
        if levels < 2:
            raise ValueError(f"UNet needs at least 2 levels, not {levels}")
        self.dims, self.levels, self.base = dims, levels, base
        pool = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
        up = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        ch: List[int] = [base * 2 ** i for i in range(levels)]
        self.down = nn.ModuleList([_DoubleConv(in_channels if i == 0 else ch[i - 1], ch[i], dims) for i in range(levels)])
        self.pool = pool(2)
        self.up = nn.ModuleList([up(ch[i + 1], ch[i], 2, stride=2) for i in range(levels - 1)])
        self.dec = nn.ModuleList([_DoubleConv(2 * ch[i], ch[i], dims) for i in range(levels - 1)])
        self.head = conv(ch[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: List[torch.Tensor] = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.levels - 1:
                skips.append(x)
                x = self.pool(x)
        for i in reversed(range(self.levels - 1)):
            x = self.up[i](x)
            x = self.dec[i](torch.cat([skips[i], x], dim=1))
        return self.head(x)


def unet2d_lung(base: int = 16, levels: int = 4, in_channels: int = 1, out_channels: int = 1) -> UNet:
    """2D lung U-Net: 1-channel slice in, 1 logit channel out (lung)."""
    return UNet(2, in_channels, out_channels, base, levels)


def unet3d_lung(base: int = 8, levels: int = 4, in_channels: int = 1, out_channels: int = 1) -> UNet:
    """3D lung U-Net for 128^3 isotropic volumes (paper 000's architecture; trained by sdk.train.seg3d)."""
    return UNet(3, in_channels, out_channels, base, levels)
