"""Is a loaded series something the triage models were built for? (paper 000's exclusion criteria)

Paper 000 excluded "a. the contrast scan and b. slice thickness more than 3mm" from training and
validation. ctsdk reports the same criteria, plus the ones any chest-CT triage needs: the series must
be CT, axial, long enough to cover the lungs, and the field of view must contain lungs.

:func:`check` returns a result, never raises for an ineligible series: ``eligible`` is False with one
human-readable reason per failed criterion, and ``checks`` holds the measured values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .volume.core import Volume

__all__ = ["Eligibility", "check", "header_eligible", "lung_fraction", "MAX_THICKNESS_MM", "MIN_SLICES", "MIN_LUNG_FRACTION"]

MAX_THICKNESS_MM = 3.0        # paper 000: slice thickness > 3 mm excluded
MIN_SLICES = 20               # fewer planes cannot cover both lungs at <= 3 mm (20 x 3 mm = 6 cm)
MIN_LUNG_FRACTION = 0.05      # lung-like voxels (-950..-500 HU) / body voxels
LUNG_HU = (-950.0, -500.0)
BODY_HU = -500.0              # body = voxels above this, holes filled per slice
NO_CONTRAST_WORDS = {"", "NONE", "NO", "N/A", "NA", "0", "NIL", "WITHOUT", "NON", "NONE GIVEN", "C-",
                     "NO CONTRAST", "NON-CONTRAST", "NONCONTRAST", "UNENHANCED"}


@dataclass(frozen=True)
class Eligibility:
    """Outcome of :func:`check`.

    Attributes:
        eligible: True when every criterion passes.
        reasons: one sentence per failed criterion (empty when eligible).
        checks: criterion -> {"ok": bool, "value": measured value, "limit": threshold}.
    """

    eligible: bool
    reasons: List[str] = field(default_factory=list)
    checks: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"eligible": self.eligible, "reasons": list(self.reasons), "checks": self.checks}


def _orientation(direction: np.ndarray) -> str:
    n = np.asarray(direction, dtype=np.float64)[:, 2]
    k = int(np.argmax(np.abs(n)))
    if abs(n[k]) < 0.8:
        return "oblique"
    return ("sagittal", "coronal", "axial")[k]


def _contrast_fields(agent: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for part in agent.split(";"):
        key, _, value = part.partition("=")
        if key.strip():
            out[key.strip()] = value.strip()
    return out


def contrast_given(agent: str, description: str = "") -> bool:
    """True when the contrast tags (SeriesMeta.contrast_agent) or the description say contrast.

    Rules, first match wins:
    1. ContrastBolusAgent present: contrast unless it reads like "none" ("NONE", "NO", "C-", ...).
    2. ContrastBolusIngredient or ContrastBolusAgentSequence present -> contrast.
    3. ContrastBolusRoute present (e.g. "IV") and not "none"-like -> contrast (a route implies a bolus).
    4. SeriesDescription has a token "C+", "CE", "CONTRAST" (but not "NON"/"W/O" contrast) -> contrast.
    """
    f = _contrast_fields(agent or "")
    if "ContrastBolusAgent" in f:
        return f["ContrastBolusAgent"].upper() not in NO_CONTRAST_WORDS
    if f.get("ContrastBolusIngredient") or f.get("ContrastBolusAgentSequence"):
        return True
    route = f.get("ContrastBolusRoute", "")
    if route and route.upper() not in NO_CONTRAST_WORDS:
        return True
    desc = (description or "").upper().replace("/", " ").replace("_", " ").split()
    if any(t in ("C+", "CE", "W/C", "CONTRAST") for t in desc):
        return not any(t in ("NON", "WO", "W/O", "NONCONTRAST", "C-") for t in desc)
    return False


def lung_fraction(hu: np.ndarray, step: Optional[int] = None) -> float:
    """Fraction of body voxels with lung-like HU (-950..-500), on a sub-sampled grid.

    The body is the largest 2-D region above -500 HU per slice with its holes filled (so the lungs,
    which are inside the body, count). Sub-sampling (every ``step``-th voxel in y and x, default so
    that ~128 samples per row remain) keeps this cheap.
    """
    from scipy import ndimage

    if hu.size == 0:
        return 0.0
    s = step or max(1, hu.shape[2] // 128)
    zs = np.linspace(0, hu.shape[0] - 1, num=min(hu.shape[0], 32)).round().astype(int)
    body_n = lung_n = 0
    for z in np.unique(zs):                    # only the sampled slices are converted
        sl = np.asarray(hu[z, ::s, ::s], dtype=np.float32)
        solid = sl > BODY_HU
        lab, n = ndimage.label(solid)
        if n == 0:
            continue
        sizes = ndimage.sum_labels(solid, lab, index=np.arange(1, n + 1))
        body = ndimage.binary_fill_holes(lab == (int(np.argmax(sizes)) + 1))
        body_n += int(body.sum())
        lung_n += int((body & (sl >= LUNG_HU[0]) & (sl <= LUNG_HU[1])).sum())
    return float(lung_n / body_n) if body_n else 0.0


def check(volume: Volume, *, lung_fraction_value: Optional[float] = None) -> Eligibility:
    """Apply the eligibility criteria to ``volume`` (see module docstring and docs/ingest.md).

    ``lung_fraction_value``: :func:`lung_fraction` of ``volume.hu`` when the caller computed it
    already (e.g. in a helper thread while other work ran, as ``sdk.Triage`` does); None: computed
    here. Either way the result is the same."""
    checks, reasons = _header_checks(volume)
    frac = lung_fraction(volume.hu) if lung_fraction_value is None else float(lung_fraction_value)
    ok = frac >= MIN_LUNG_FRACTION
    checks["lung_fraction"] = {"ok": ok, "value": round(frac, 4), "limit": MIN_LUNG_FRACTION}
    if not ok:
        reasons.append(f"field of view without lungs (lung-like voxels {frac:.1%} of the body < "
                       f"{MIN_LUNG_FRACTION:.0%})")
    return Eligibility(eligible=not reasons, reasons=reasons, checks=checks)


def header_eligible(volume: Volume) -> bool:
    """Whether every criterion except the lung fraction passes (header values and geometry only:
    no pass over the voxels). False means :func:`check` will say not eligible whatever the voxels."""
    return not _header_checks(volume)[1]


def _header_checks(volume: Volume) -> Tuple[Dict[str, Dict[str, Any]], List[str]]:
    """(checks, reasons) of the criteria read from the header and the geometry (all but the lung
    fraction)."""
    meta = volume.meta
    checks: Dict[str, Dict[str, Any]] = {}
    reasons: List[str] = []

    modality = (meta.modality or "CT").upper()
    ok = modality == "CT"
    checks["modality"] = {"ok": ok, "value": modality, "limit": "CT"}
    if not ok:
        reasons.append(f"not CT (Modality {modality})")

    thick = meta.slice_thickness_mm
    if thick is None and volume.shape[0] > 1:
        thick = float(volume.spacing[0])
    span = meta.slice_thickness_range_mm
    thickest = span[1] if span is not None else thick   # every slice must pass, not the median one
    ok = thickest is not None and thickest <= MAX_THICKNESS_MM + 1e-6
    checks["slice_thickness_mm"] = {"ok": ok, "value": thickest, "limit": MAX_THICKNESS_MM}
    if span is not None and span[0] != span[1]:
        checks["slice_thickness_mm"].update(range=list(span), median=thick)
    if not ok:
        said = (f"{span[0]:g}-{span[1]:g} mm (median {thick:g} mm), thickest {span[1]:g} mm"
                if span is not None and span[0] != span[1] and thick is not None else
                f"{round(thickest, 2)} mm" if thickest is not None else "unknown")
        reasons.append(f"slice thickness {said} > {MAX_THICKNESS_MM:g} mm (paper 000 excludes thicker slices)")

    contrast = contrast_given(meta.contrast_agent, meta.series_description)
    checks["contrast"] = {"ok": not contrast, "value": meta.contrast_agent, "limit": "no contrast agent"}
    if contrast:
        why = meta.contrast_agent or f"description {meta.series_description!r}"
        reasons.append(f"contrast-enhanced series ({why}); paper 000 excludes contrast scans")

    n = volume.shape[0]
    ok = n >= MIN_SLICES
    checks["n_slices"] = {"ok": ok, "value": n, "limit": MIN_SLICES}
    if not ok:
        reasons.append(f"too few slices ({n} < {MIN_SLICES}); the series cannot cover the lungs")

    orient = _orientation(volume.direction)
    ok = orient == "axial"
    checks["orientation"] = {"ok": ok, "value": orient, "limit": "axial"}
    if not ok:
        reasons.append(f"{orient} series; triage needs axial slices")
    return checks, reasons
