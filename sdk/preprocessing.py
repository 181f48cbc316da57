"""The one owner of the models' input preprocessing: HU windows, sizes, normalisation.

    from sdk.preprocessing import Preprocessing
    pre = Preprocessing.from_manifest(bundle.manifest)   # what the bundle's models were trained with
    pre.classifier_window, pre.classifier_size, pre.classifier_mean, pre.classifier_std
    pre.segmenter_window, pre.segmenter_size

Every stage, kernel and renderer takes these values from a :class:`Preprocessing` (Triage builds
one from its bundle: ``Triage.preprocessing``) or, without a bundle, from the module defaults
below, which are the default bundle's values. Nothing else in the package writes a window or a
mean/std literal: they import :data:`CLASSIFIER_WINDOW` / :data:`SEGMENTER_WINDOW` from here.

This module imports nothing from the rest of ``sdk`` (it sits below every stage: no cycles).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Tuple

from .errors import BundleError

#: classifier lung window (lo, hi) in HU: W 1500 / L -600 -> channel 0 in [0, 1]
CLASSIFIER_WINDOW: Tuple[float, float] = (-1350.0, 150.0)
#: lung segmenter window (lo, hi) in HU, before its per-slice min-max + CLAHE preparation
SEGMENTER_WINDOW: Tuple[float, float] = (-1000.0, 400.0)
#: classifier input side (pixels) and per-channel normalisation (applied inside the ONNX graph,
#: channels grey / lung mask / grey x mask, not RGB)
CLASSIFIER_SIZE = 224
CLASSIFIER_MEAN: Tuple[float, float, float] = (0.5, 0.5, 0.5)
CLASSIFIER_STD: Tuple[float, float, float] = (0.5, 0.5, 0.5)
#: lung U-Net input side (pixels)
SEGMENTER_SIZE = 128


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _window(value: Any, where: str) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BundleError(f"{where}: a window must be [lo, hi] in HU, got {_shown(value)}") from exc
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise BundleError(f"{where}: a window must be [lo, hi] in HU (finite numbers), got {_shown(value)}")
    if not hi > lo:
        raise BundleError(f"{where}: window [lo, hi] needs hi > lo, got {_shown(value)}")
    return lo, hi


def _size(value: Any, where: str) -> int:
    """A side in pixels: a positive whole number."""
    ok = isinstance(value, (int, float, str)) and not isinstance(value, bool)
    try:
        n = int(value) if ok else 0
        ok = ok and n >= 1 and float(value) == n
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise BundleError(f"{where}: a size must be a positive whole number of pixels, got {_shown(value)}")
    return n


def _numbers(value: Any, where: str) -> Tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BundleError(f"{where}: must be a list of numbers (one per channel), got {_shown(value)}") from exc
    if not out or not all(math.isfinite(v) for v in out):
        raise BundleError(f"{where}: must be a list of finite numbers (one per channel), got {_shown(value)}")
    return out


def _section(value: Any, where: str, key: str) -> Mapping[str, Any]:
    """A manifest block that must be an object ({} when absent or null)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BundleError(f"{where}: manifest key {key} must be an object, got {_shown(value)}")
    return value


@dataclass(frozen=True)
class Preprocessing:
    """What the models expect (the bundle manifest's ``preprocessing`` section, typed).

    Attributes:
        classifier_window: HU window mapped to [0, 1] for the classifier's grey channel.
        classifier_size: classifier input side (pixels).
        classifier_mean / classifier_std: per-channel normalisation inside the classifier graph.
        segmenter_window: HU window of the lung U-Net's input (before min-max + CLAHE).
        segmenter_size: lung U-Net input side (pixels).
    """

    classifier_window: Tuple[float, float] = CLASSIFIER_WINDOW
    classifier_size: int = CLASSIFIER_SIZE
    classifier_mean: Tuple[float, ...] = CLASSIFIER_MEAN
    classifier_std: Tuple[float, ...] = CLASSIFIER_STD
    segmenter_window: Tuple[float, float] = SEGMENTER_WINDOW
    segmenter_size: int = SEGMENTER_SIZE

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], where: str = "bundle manifest") -> "Preprocessing":
        """From a bundle manifest: ``preprocessing.classifier`` (window, size, mean, std) and
        ``preprocessing.lungs`` (window; size from ``inputs.lungs.shape``); missing keys keep the
        defaults. Raises BundleError for malformed values, naming ``where`` (the manifest file) and
        the key."""
        if not isinstance(manifest, Mapping):
            raise BundleError(f"{where}: a manifest must be one JSON object, got {_shown(manifest)}")
        pre = _section(manifest.get("preprocessing"), where, "preprocessing")
        cls_pre = _section(pre.get("classifier"), where, "preprocessing.classifier")
        lung_pre = _section(pre.get("lungs"), where, "preprocessing.lungs")
        lung_in = _section(_section(manifest.get("inputs"), where, "inputs").get("lungs"), where, "inputs.lungs")
        d = cls()
        lung_shape = lung_in.get("shape")
        if lung_shape is not None and not isinstance(lung_shape, (list, tuple)):
            raise BundleError(f"{where}: manifest key inputs.lungs.shape must be a list [batch, 1, H, W], got "
                              f"{_shown(lung_shape)}")
        lung_size = lung_shape[-1] if lung_shape and isinstance(lung_shape[-1], int) else d.segmenter_size
        return cls(
            classifier_window=_window(cls_pre.get("window", d.classifier_window), f"{where}: preprocessing.classifier"),
            classifier_size=_size(cls_pre.get("size", d.classifier_size), f"{where}: preprocessing.classifier.size"),
            classifier_mean=_numbers(cls_pre.get("mean", d.classifier_mean), f"{where}: preprocessing.classifier.mean"),
            classifier_std=_numbers(cls_pre.get("std", d.classifier_std), f"{where}: preprocessing.classifier.std"),
            segmenter_window=_window(lung_pre.get("window", d.segmenter_window), f"{where}: preprocessing.lungs"),
            segmenter_size=_size(lung_pre.get("size", lung_size),
                                 f"{where}: {'preprocessing.lungs.size' if 'size' in lung_pre else 'inputs.lungs.shape'}"),
        )

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


__all__ = ["Preprocessing", "CLASSIFIER_WINDOW", "SEGMENTER_WINDOW", "CLASSIFIER_SIZE", "CLASSIFIER_MEAN",
           "CLASSIFIER_STD", "SEGMENTER_SIZE"]
