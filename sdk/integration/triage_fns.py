"""Triage functions the listener and the batch runner call: ``fn(files) -> TriageOutput | dict``.

The listener and ``triage-batch`` do not care what a triage function computes: they need a JSON-safe
result and, optionally, heat-map overlays for the DICOM Secondary Capture objects. The default is
the real :class:`sdk.triage.Triage` (:func:`make_triage_fn`); integrators can plug their own with
``--triage-fn module:function``. :func:`inventory` is a model-free commissioning mode: it checks
that series arrive and are stored complete, and reports what a triage run would get.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from ..errors import ConfigError

log = logging.getLogger("sdk.integration")

__all__ = ["Overlay", "OpacityMap", "opacity_from_result", "TriageOutput", "TriageFn", "normalise_output", "make_triage_fn", "inventory", "ingest_check",
           "overlays_from_result", "RESEARCH_ONLY"]

from ..result import RESEARCH_ONLY  # noqa: E402 - re-exported: the one owner is sdk.result


@dataclass(frozen=True)
class Overlay:
    """One heat-map overlay to export as a Secondary Capture.

    Attributes:
        rgb: (H, W, 3) uint8 image, RGB order.
        source_file: the DICOM instance the overlay was computed on (referenced by the SC).
        description: short text for the SC's Derivation Description / Image Comments.
        z_mm: slice position along the normal (``Volume.z_mm``); used to find the source instance
            when ``source_file`` is not known.
    """

    rgb: np.ndarray
    source_file: Optional[Path] = None
    description: str = "heat map"
    z_mm: Optional[float] = None

    def __post_init__(self) -> None:
        a = np.asarray(self.rgb)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise ConfigError(f"Overlay.rgb must be (H, W, 3) uint8, got {a.shape} {a.dtype}")


@dataclass(frozen=True)
class OpacityMap:
    """The HU opacity map to export as a DICOM Segmentation (0 none, 1 ground glass, 2 consolidation).

    Attributes:
        z_mm: (n,) positions (``Volume.z_mm``) of the slices in ``labels``; each is matched to the
            source instance at that position.
        labels: (n, rows, cols) uint8 label slices (slices without opacity may be left out).
    """

    z_mm: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        lab = np.asarray(self.labels)
        if lab.ndim != 3 or lab.dtype != np.uint8 or lab.shape[0] != len(np.asarray(self.z_mm)):
            raise ConfigError(f"OpacityMap.labels must be (n, rows, cols) uint8 with n = len(z_mm), got {lab.shape} {lab.dtype}")


def opacity_from_result(result: Any) -> Optional[OpacityMap]:
    """The opacity map of a :class:`sdk.triage.TriageResult` (None without one or without image data)."""
    if not getattr(result, "eligible", False) or getattr(result, "lung_opacity", None) is None or not hasattr(result, "opacity_map"):
        return None
    try:
        z, labels = result.opacity_map()
    except ConfigError as exc:  # Triage(heatmaps=False) keeps no image data
        log.info("no opacity map for the DICOM SEG: %s", exc)
        return None
    return OpacityMap(np.asarray(z, dtype=np.float64), labels)


@dataclass
class TriageOutput:
    """What a triage function returns: the JSON-safe result, optional overlays and opacity map."""

    result: Dict[str, Any]
    overlays: List[Overlay] = field(default_factory=list)
    opacity: Optional[OpacityMap] = None


TriageFn = Callable[[Sequence[Path]], Union[TriageOutput, Mapping[str, Any]]]


def normalise_output(out: Any) -> TriageOutput:
    """Accept a TriageOutput, a plain dict, or an object with ``to_dict()`` (e.g. TriageResult)."""
    if isinstance(out, TriageOutput):
        return out
    if isinstance(out, Mapping):
        return TriageOutput(dict(out))
    if hasattr(out, "to_dict"):
        return TriageOutput(dict(out.to_dict()), overlays_from_result(out), opacity_from_result(out))
    raise ConfigError(f"a triage function returned {type(out).__name__}; expected a dict, TriageOutput or TriageResult")


def overlays_from_result(result: Any, max_overlays: int = 3) -> List[Overlay]:
    """Heat-map overlays of a :class:`sdk.triage.TriageResult`: its ``max_overlays`` top slices.

    Uses ``result.save_heatmaps(tmp, top=max_overlays)`` (the facade's own rendering: JET over the
    lung-windowed slice, one colour scale per series) and tags each overlay with the slice's
    ``z_mm`` so the Secondary Capture can reference the source instance at that position. A result
    without heat maps (not eligible, or ``heatmaps=False``) gives none, with a log line.
    """
    import tempfile

    scores = list(getattr(result, "slice_scores", None) or [])
    if not scores or not getattr(result, "eligible", False) or not hasattr(result, "save_heatmaps"):
        return []
    import cv2

    z_by_index = {int(s.index): float(s.z_mm) for s in scores}
    label = str(getattr(result, "label", ""))
    overlays: List[Overlay] = []
    with tempfile.TemporaryDirectory(prefix="ctsdk-heat-") as tmp:
        try:
            paths = result.save_heatmaps(tmp, top=max_overlays)
        except Exception as exc:  # heat maps are a bonus: the result stands without them
            log.warning("heat maps not available for this result: %s", exc)
            return []
        for p in paths:
            bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
            try:
                z = int(Path(p).stem.split("_")[-1])
            except ValueError:
                z = -1
            if bgr is None:
                log.warning("could not read back heat map %s", p)
                continue
            overlays.append(Overlay(np.ascontiguousarray(bgr[..., ::-1]), None,
                                    f"class activation heat map (label {label}), slice index {z}",
                                    z_mm=z_by_index.get(z)))
    return overlays


def make_triage_fn(heatmaps: bool = True) -> Callable[[Sequence[Path]], TriageOutput]:
    """Build the default triage function: one :class:`sdk.triage.Triage` loaded once, reused.

    ``heatmaps=False`` skips the CAM overlays (the listener's SC objects need them; a batch run
    does not, and they cost 25-47 % of a series on the CPU).
    """
    from ..triage import Triage  # heavy: imported when a worker starts, not at `import sdk`

    engine = Triage(heatmaps=heatmaps)

    def triage_files(files: Sequence[Path]) -> TriageOutput:
        result = engine.run([str(f) for f in files])
        if not heatmaps:
            return TriageOutput(dict(result.to_dict()))
        return TriageOutput(dict(result.to_dict()), overlays_from_result(result), opacity_from_result(result))

    return triage_files


make_triage_fn.is_factory = True  # type: ignore[attr-defined]


def make_batch_triage_fn() -> Callable[[Sequence[Path]], TriageOutput]:
    """The default for ``ctsdk triage-batch``: the real Triage without heat-map overlays."""
    return make_triage_fn(heatmaps=False)


make_batch_triage_fn.is_factory = True  # type: ignore[attr-defined]
BATCH_TRIAGE_FN = "sdk.integration.triage_fns:make_batch_triage_fn"


def instance_number(ds: Any) -> Optional[int]:
    """The source's InstanceNumber as an int; None when absent or not one integer (anonymisers and
    damaged exports write UIDs, words or several values there; the number only breaks ties)."""
    try:
        return int(str(ds.get("InstanceNumber", "")).strip())
    except (TypeError, ValueError, OverflowError):   # OverflowError: pydicom converting an IS of 'inf'
        return None


def inventory(files: Sequence[Path]) -> Dict[str, Any]:
    """Model-free commissioning result: what arrived, read from the headers only.

    ``label`` is ``"not_triaged"``; use it to check a scanner's connectivity, AE titles and
    storage before models are installed (``ctsdk listen --triage-fn sdk.integration.triage_fns:inventory``).
    """
    import pydicom

    uids, modalities, numbers = set(), set(), []
    for f in files:
        ds = pydicom.dcmread(str(f), stop_before_pixels=True, force=True)
        uids.add(str(ds.get("SeriesInstanceUID", "")))
        modalities.add(str(ds.get("Modality", "")))
        number = instance_number(ds)
        if number is not None:
            numbers.append(number)
    return {
        "label": "not_triaged",
        "probabilities": {},
        "eligible": False,
        "reasons": ["inventory mode: no model was run"],
        "n_instances": len(files),
        "series_uids": sorted(uids),
        "modalities": sorted(modalities),
        "instance_numbers": [min(numbers), max(numbers)] if numbers else [],
        "statement": RESEARCH_ONLY,
    }


def ingest_check(files: Sequence[Path]) -> Dict[str, Any]:
    """Model-free check that a series would reach the models: real ingest + eligibility.

    Runs :func:`sdk.io.load_series` (decoding every slice, so unreadable or non-CT input raises
    the same typed :class:`~sdk.errors.SeriesError` a triage would) and :func:`sdk.eligibility.check`;
    ``label`` is ``"not_triaged"``. Use it to audit an archive before models are installed
    (``ctsdk triage-batch ROOT --triage-fn sdk.integration.triage_fns:ingest_check``).
    """
    import time

    from ..eligibility import check
    from ..io import load_series

    t0 = time.perf_counter()
    volume = load_series([str(f) for f in files])
    t1 = time.perf_counter()
    elig = check(volume)
    t2 = time.perf_counter()
    return {
        "label": "not_triaged",
        "probabilities": {},
        "eligible": bool(elig.eligible),
        "reasons": list(elig.reasons),
        "series_uid": volume.meta.series_uid,
        "shape": list(volume.shape),
        "spacing_mm": [float(s) for s in volume.spacing],
        "timings_ms": {"load": (t1 - t0) * 1000.0, "eligibility": (t2 - t1) * 1000.0, "total": (t2 - t0) * 1000.0},
        "warnings": list(volume.warnings),
        "statement": RESEARCH_ONLY,
    }
