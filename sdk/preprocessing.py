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


def _window(value: Any, where: str) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{where}: a window must be [lo, hi] in HU, got {value!r}") from exc
    if not hi > lo:
        raise BundleError(f"{where}: window [lo, hi] needs hi > lo, got {value!r}")
    return lo, hi


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
    def from_manifest(cls, manifest: Mapping[str, Any]) -> "Preprocessing":
        """From a bundle manifest: ``preprocessing.classifier`` (window, size, mean, std) and
        ``preprocessing.lungs`` (window; size from ``inputs.lungs.shape``); missing keys keep the
        defaults. Raises BundleError for malformed values."""
        pre = dict(manifest.get("preprocessing", {}) or {})
        cls_pre = dict(pre.get("classifier", {}) or {})
        lung_pre = dict(pre.get("lungs", {}) or {})
        d = cls()
        lung_shape = (((manifest.get("inputs") or {}).get("lungs") or {}).get("shape")) or []
        lung_size = lung_shape[-1] if lung_shape and isinstance(lung_shape[-1], int) else d.segmenter_size
        try:
            return cls(
                classifier_window=_window(cls_pre.get("window", d.classifier_window), "preprocessing.classifier"),
                classifier_size=int(cls_pre.get("size", d.classifier_size)),
                classifier_mean=tuple(float(v) for v in cls_pre.get("mean", d.classifier_mean)),
                classifier_std=tuple(float(v) for v in cls_pre.get("std", d.classifier_std)),
                segmenter_window=_window(lung_pre.get("window", d.segmenter_window), "preprocessing.lungs"),
                segmenter_size=int(lung_pre.get("size", lung_size)),
            )
        except (TypeError, ValueError) as exc:
            raise BundleError(f"bundle manifest: malformed preprocessing section ({exc})") from exc

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


__all__ = ["Preprocessing", "CLASSIFIER_WINDOW", "SEGMENTER_WINDOW", "CLASSIFIER_SIZE", "CLASSIFIER_MEAN",
           "CLASSIFIER_STD", "SEGMENTER_SIZE"]
