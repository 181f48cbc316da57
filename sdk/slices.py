"""Slice selection: which axial slices of a volume go to the slice classifier.

Two rules, combined as ``rule=``:

- ``"lung"`` (default): a slice is kept when its lung area (from the lung mask) is at least
  ``min_area_fraction`` of the largest slice's lung area and at least ``min_area_mm2``; gaps of up
  to ``max_gap`` slices inside the kept range are filled so the selection is one contiguous-ish
  lung range.
- ``"paper002"``: paper 002's dark-pixel rule restated in HU for any matrix size. The paper
  counts pixels below 300 on the 0..4095 scale of 512 x 512 images in the box x 120..370,
  y 240..340, and keeps slices whose count exceeds ``(max(count) - min(count)) / 1.5`` over the
  patient. Restatement:

  * "below 300" with RescaleIntercept -1024 is ``HU < -724``;
  * the box is expressed in millimetres from the image centre, assuming the paper's 512^2
    images had ``reference_spacing_mm`` = 0.7 mm pixels (its dataset does not state a spacing;
    0.7 mm is a typical adult chest FOV of 358 mm): x in [-95.2, +79.8] mm, y in [-11.2, +58.8]
    mm (x to the patient's Left, y to Posterior), then converted to pixels with the volume's own
    pixel spacing and matrix, and clipped to the image;
  * the count becomes an area in mm^2 (count x pixel area), so the rule does not depend on the
    matrix size; the threshold is the paper's ``(max - min) / 1.5`` of that area, literally
    (it is *not* ``min + (max - min) / 1.5``).
- ``"both"``: slices passing both rules; ``"either"``: slices passing either.

The result records every per-slice number, so callers can audit the choice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .errors import ConfigError

__all__ = ["SliceSelection", "select_slices", "select_by_lung_area", "lung_rule", "paper002_dark_area", "RULES", "DARK_HU", "PAPER_BOX_MM"]

RULES = ("lung", "paper002", "both", "either")
#: paper 002's dark threshold (300 on the 0..4095 scale, intercept -1024) in HU
DARK_HU = 300 - 1024
#: paper 002's box, 512^2 pixels x 120..370, y 240..340 (centre 256), at 0.7 mm / pixel
REFERENCE_SPACING_MM = 0.7
PAPER_BOX_MM = {
    "x": ((120 - 256) * REFERENCE_SPACING_MM, (370 - 256) * REFERENCE_SPACING_MM),
    "y": ((240 - 256) * REFERENCE_SPACING_MM, (340 - 256) * REFERENCE_SPACING_MM),
}


@dataclass(frozen=True)
class SliceSelection:
    """Selected slices and the per-slice evidence.

    Attributes:
        indices: selected slice indices (ascending, z order).
        z_mm: their positions along the slice normal (mm).
        lung_area_mm2: lung area of *every* slice (len z).
        dark_area_mm2: paper 002 dark area in the central box of every slice (len z).
        lung_ok / dark_ok: per-slice booleans of the two rules (len z).
        rule: the rule used; details: thresholds and parameters, JSON-safe.
    """

    indices: np.ndarray
    z_mm: np.ndarray
    lung_area_mm2: np.ndarray
    dark_area_mm2: np.ndarray
    lung_ok: np.ndarray
    dark_ok: np.ndarray
    rule: str
    details: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.indices.size)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "rule": self.rule,
            "indices": [int(i) for i in self.indices],
            "z_mm": [round(float(z), 3) for z in self.z_mm],
            "lung_area_mm2": [round(float(a), 1) for a in self.lung_area_mm2[self.indices]],
            "details": self.details,
        }


def _box_pixels(n_rows: int, n_cols: int, spacing: Tuple[float, float]) -> Tuple[slice, slice]:
    """The paper's box in pixel indices of a (rows, cols) image with (row, col) spacing in mm."""
    dy, dx = float(spacing[0]), float(spacing[1])
    cy, cx = n_rows / 2.0, n_cols / 2.0
    y0 = int(np.clip(np.floor(cy + PAPER_BOX_MM["y"][0] / dy), 0, n_rows))
    y1 = int(np.clip(np.ceil(cy + PAPER_BOX_MM["y"][1] / dy), 0, n_rows))
    x0 = int(np.clip(np.floor(cx + PAPER_BOX_MM["x"][0] / dx), 0, n_cols))
    x1 = int(np.clip(np.ceil(cx + PAPER_BOX_MM["x"][1] / dx), 0, n_cols))
    return slice(y0, max(y1, y0 + 1)), slice(x0, max(x1, x0 + 1))


def paper002_dark_area(hu: np.ndarray, pixel_spacing_mm: Tuple[float, float], dark_hu: float = DARK_HU) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """Paper 002's rule on a (z, y, x) HU array.

    Returns:
        (dark_area_mm2 (z,), keep (z,) bool, details) with the box and threshold used.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ConfigError(f"paper002_dark_area expects a (z, y, x) HU array, got shape {hu.shape}")
    ys, xs = _box_pixels(hu.shape[1], hu.shape[2], pixel_spacing_mm)
    px_mm2 = float(pixel_spacing_mm[0]) * float(pixel_spacing_mm[1])
    area = (hu[:, ys, xs] < dark_hu).reshape(hu.shape[0], -1).sum(1) * px_mm2
    thr = (float(area.max()) - float(area.min())) / 1.5
    keep = area > thr
    details = {
        "dark_hu": float(dark_hu),
        "box_px": {"y": [ys.start, ys.stop], "x": [xs.start, xs.stop]},
        "box_mm_from_centre": {k: [round(v[0], 2), round(v[1], 2)] for k, v in PAPER_BOX_MM.items()},
        "dark_threshold_mm2": thr,
    }
    return area.astype(np.float64), keep, details


def _fill_gaps(keep: np.ndarray, max_gap: int) -> np.ndarray:
    """Fill runs of False of length <= max_gap that lie between two True slices."""
    out = keep.copy()
    idx = np.nonzero(keep)[0]
    for a, b in zip(idx[:-1], idx[1:]):
        if 1 < b - a <= max_gap + 1:
            out[a:b] = True
    return out


def lung_rule(lung_area_mm2: np.ndarray, min_area_fraction: float = 0.05,
              min_area_mm2: float = 300.0) -> Tuple[np.ndarray, float, float]:
    """The lung rule on per-slice lung areas: ``(keep (z,) bool, threshold mm², max area mm²)``."""
    area = np.asarray(lung_area_mm2, dtype=np.float64)
    amax = float(area.max()) if area.size else 0.0
    thr = max(min_area_fraction * amax, min_area_mm2)
    return (area >= thr) & (area > 0), thr, amax


def select_by_lung_area(lung_area_mm2: np.ndarray, *, min_area_fraction: float = 0.05, min_area_mm2: float = 300.0,
                        max_gap: int = 2) -> np.ndarray:
    """Indices chosen by ``select_slices(..., rule="lung")`` from the per-slice lung areas alone
    (the kernel path reduces the mask to areas where the mask lives and selects from those)."""
    keep, _, _ = lung_rule(lung_area_mm2, min_area_fraction, min_area_mm2)
    keep = _fill_gaps(keep, max_gap) if max_gap > 0 else keep
    return np.nonzero(keep)[0]


def select_slices(
    volume: Any,
    lung_mask: np.ndarray,
    *,
    rule: str = "lung",
    min_area_fraction: float = 0.05,
    min_area_mm2: float = 300.0,
    max_gap: int = 2,
    max_slices: Optional[int] = None,
    lung_voxels: Optional[np.ndarray] = None,
) -> SliceSelection:
    """Choose the slices to classify.

    Args:
        volume: :class:`sdk.volume.Volume` (``hu`` (z, y, x), ``z_mm``, ``pixel_spacing_mm``).
        lung_mask: (z, y, x) lung mask at the volume's grid (e.g. ``segment(volume).mask``).
        rule: one of :data:`RULES` (see the module docstring).
        min_area_fraction: lung rule, fraction of the largest slice's lung area.
        min_area_mm2: lung rule, absolute minimum lung area.
        max_gap: fill gaps of up to this many slices between selected slices.
        max_slices: keep at most this many, evenly spaced over the selection (None = all).
        lung_voxels: (z,) lung voxels per slice of ``lung_mask`` when the caller has them
            (``LungSegmentation.slice_voxels``); None: counted here.

    Returns:
        :class:`SliceSelection`.
    """
    if rule not in RULES:
        raise ConfigError(f"unknown slice selection rule {rule!r}; valid: {', '.join(RULES)}")
    hu = np.asarray(volume.hu)
    mask = np.asarray(lung_mask)
    if mask.shape != hu.shape:
        raise ConfigError(f"lung_mask shape {mask.shape} does not match the volume's {hu.shape}; segment the same volume")
    if not (0.0 <= min_area_fraction <= 1.0):
        raise ConfigError(f"min_area_fraction must be in [0, 1], not {min_area_fraction}")
    if max_slices is not None and max_slices < 1:
        raise ConfigError(f"max_slices must be >= 1 or None, not {max_slices}")
    ps = tuple(float(v) for v in volume.pixel_spacing_mm)
    if lung_voxels is None:
        # per-slice lung pixel counts without a bool copy of the mask (a 38 MB fresh allocation per series)
        lung_voxels = np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1)
    elif np.shape(lung_voxels) != (mask.shape[0],):
        raise ConfigError(f"lung_voxels has shape {np.shape(lung_voxels)}, the mask has {mask.shape[0]} slices")
    lung_area = np.asarray(lung_voxels, dtype=np.int64) * ps[0] * ps[1]
    lung_ok, area_thr, amax = lung_rule(lung_area, min_area_fraction, min_area_mm2)
    dark_area, dark_ok, dark_details = paper002_dark_area(hu, ps)
    keep = {"lung": lung_ok, "paper002": dark_ok, "both": lung_ok & dark_ok, "either": lung_ok | dark_ok}[rule]
    keep = _fill_gaps(keep, max_gap) if max_gap > 0 else keep
    idx = np.nonzero(keep)[0]
    if max_slices is not None and idx.size > max_slices:
        pick = np.unique(np.round(np.linspace(0, idx.size - 1, max_slices)).astype(int))
        idx = idx[pick]
    details = {
        "rule": rule,
        "lung_area_threshold_mm2": area_thr,
        "max_lung_area_mm2": amax,
        "min_area_fraction": min_area_fraction,
        "min_area_mm2": min_area_mm2,
        "max_gap": max_gap,
        "max_slices": max_slices,
        "n_lung_ok": int(lung_ok.sum()),
        "n_dark_ok": int(dark_ok.sum()),
        "paper002": dark_details,
    }
    z = np.asarray(volume.z_mm, dtype=np.float64)
    return SliceSelection(
        indices=idx, z_mm=z[idx], lung_area_mm2=lung_area.astype(np.float64), dark_area_mm2=dark_area,
        lung_ok=lung_ok, dark_ok=dark_ok, rule=rule, details=details,
    )
