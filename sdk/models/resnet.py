"""ResNet-50 in plain torch.nn.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition" (CVPR 2016); the bottleneck
puts the stride on the 3x3 convolution ("ResNet v1.5"). Paper 000 (Li, Sun, Sun) uses a 2D
ResNet-50 whose 2048x7x7 last feature map is pooled with the lung-mask-weighted GAP.

No pretrained weights: none ship inside a PyPI package we can install offline (torchvision and
timm are excluded, see FIELD_NOTES), so the model starts from random (Kaiming) initialisation.

File order follows timm: docstring, ``__all__``, blocks, model, ``checkpoint_filter_fn``, builders.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ResNet", "Bottleneck", "resnet50", "checkpoint_filter_fn"]


# --- blocks ---------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride) -> 1x1 expand (x4), BN after each, ReLU, projection shortcut."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(y + shortcut)


# --- model ----------------------------------------------------------------------------------------
class ResNet(nn.Module):
    """ResNet backbone: ``forward_features(x) -> (N, 2048, S/32, S/32)`` (x already normalised)."""

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), in_chans: int = 3, zero_init_last: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        stages: List[nn.Module] = []
        for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks: List[nn.Module] = []
            for j in range(n):
                blocks.append(Bottleneck(cin, width, stride=(1 if i == 0 else 2) if j == 0 else 1))
                cin = width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def freeze_stages(self, n: int) -> None:
        """Freeze the stem and the first ``n`` residual stages."""
        mods: List[nn.Module] = [self.conv1, self.bn1] + [self.layer1, self.layer2, self.layer3, self.layer4][:n]
        for m in mods:
            for p in m.parameters():
                p.requires_grad_(False)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Keep the backbone tensors of a torchvision/timm-named ResNet-50 checkpoint (drops ``fc.*``).

    The module names here are torchvision's, so such a checkpoint loads by name when one is
    available locally; none is shipped or downloaded.
    """
    own = model.state_dict()
    return {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}


# --- builders -------------------------------------------------------------------------------------
def resnet50(in_chans: int = 3) -> ResNet:
    """ResNet-50 backbone, random initialisation (23.5 M parameters)."""
    return ResNet((3, 4, 6, 3), in_chans=in_chans)
