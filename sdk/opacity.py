"""HU lung-opacity evidence: ground glass and consolidation inside the lung mask (no training).

    from sdk.opacity import measure_opacity
    op = measure_opacity(volume.hu, seg.labels, volume.spacing)   # labels: 1 = left, 2 = right lung
    op.ggo_fraction, op.consolidation_fraction, op.pattern["bilateral_index"], op.to_dict()

Everything here is a fixed rule on Hounsfield units; nothing was fitted to any data set, so the
numbers mean the same on every scanner that reports calibrated HU.

**Working grid.** To stay fast (one pass per rule, no 3D filters), the lung box is sampled every
``stride`` pixels in x and y (``stride = round(target_mm / pixel_mm)``, target 1.4 mm, so a
0.7 mm series is read on every second row and column: a 1/4 sample of the voxels, no averaging,
so no extra partial volume) and on every slice. Fractions are counts on that grid; the tests
measure their error against the full grid.

**Rules** (thresholds in :class:`OpacityConfig`; each step is one NumPy / OpenCV operation):

1. *Lung*: the segmenter's mask, minus the basal 10 % and apical 5 % of each lung's
   craniocaudal extent (``base_exclusion`` / ``apex_exclusion``: partial volume with the
   diaphragm, liver and spleen - and masks leaking into them - and tiny apical cross-sections
   read as opacity there; measured on normal-normal001, docs/triage.md). *Airways (and bullae)*:
   in-lung air below ``air_hu`` (-950 HU) at least ``airway_width_mm`` (4 mm) wide in-plane
   (what survives a 2D opening with a square of that size: bronchial lumens, not noise pixels).
   They leave the denominator.
2. *Dense* voxels: above ``dense_hu`` (-300 HU). Dense structures narrower than
   ``vessel_width_mm`` (7 mm) in-plane are **vessels / bronchial walls / fissures**: a 2D
   morphological opening of the dense mask with a disk of that diameter removes exactly those,
   in any in-plane orientation. What survives the opening and is at most ``consolidation_max_hu``
   (+50 HU, above that: calcification or contrast-filled vessels) is **consolidation**.
3. *Ground glass*: ``ggo_lo_hu`` <= HU <= ``dense_hu`` (-750...-300 HU), excluding a one-pixel rim
   around removed vessels and airways (partial volume there reads as ground glass), then a 3x3
   opening drops single pixels and one-pixel lines (noise, fissures, pleural partial volume).
4. Fractions are of the analysed lung (lung minus airways): overall, per slice
   (``slice_ggo_fraction`` / ``slice_consolidation_fraction`` / ``slice_lung_voxels``: one value
   per native slice, counted on the same working grid in the same pass; NaN where the slice has
   no analysed lung - outside the mask, or in the trimmed basal/apical ends), per lung (labels 1 left,
   2 right; a binary mask is split at the x centroid), per zone: *upper / lower* = above / below
   the middle of that lung's craniocaudal extent; *peripheral / central* = the outer third of each
   lung's cross-section by 2D distance to the lung boundary (depth <= 1/3 of that slice's
   deepest point) / the rest.
5. Pattern features (``pattern``):
   - ``bilateral_index`` = min(opacity_left, opacity_right) / max(...) (0 unilateral, 1 symmetric);
   - ``peripheral_index`` = f_peripheral / (f_peripheral + f_central) of the opacity fraction
     (0.5 uniform, > 0.5 peripheral predominance); ``lower_index`` likewise lower vs upper;
   - ``ggo_share`` = ground glass / (ground glass + consolidation);
   - ``largest_consolidation_fraction`` = the largest 3D connected consolidation component
     (26-connectivity, found on a 2x coarser in-plane grid, counted on the working grid) as a
     fraction of the lung it lies in (lobar /
     segmental consolidation: a large single component); ``consolidation_components``;
   - ``involved_lungs``: lungs whose opacity fraction is at least ``involved_fraction`` (1 %).

The voxel map (0 none, 1 ground glass, 2 consolidation) is kept on the result (``label_map``, on
the working grid, with its placement) for heat-map overlays and the DICOM SEG; ``to_dict()`` holds
only numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import ConfigError

__all__ = ["OpacityConfig", "LungOpacity", "measure_opacity", "GGO", "CONSOLIDATION", "full_label_slice"]

GGO, CONSOLIDATION = 1, 2
LEFT, RIGHT = 1, 2
#: the most threads :func:`measure_opacity` splits its slices over (``workers``)
OPACITY_WORKERS_MAX = 8


@dataclass(frozen=True)
class OpacityConfig:
    """Thresholds of the opacity rules (HU, mm); see the module docstring."""

    ggo_lo_hu: float = -750.0
    dense_hu: float = -300.0
    consolidation_max_hu: float = 50.0
    air_hu: float = -950.0
    airway_width_mm: float = 4.0
    vessel_width_mm: float = 7.0
    target_pixel_mm: float = 1.4
    involved_fraction: float = 0.01
    base_exclusion: float = 0.10
    apex_exclusion: float = 0.05


@dataclass
class LungOpacity:
    """Opacity measurements of one series (fractions are of the analysed lung volume, 0..1).

    Attributes:
        lung_ml: analysed lung volume (lung mask minus airways) in ml.
        ggo_fraction / consolidation_fraction / opacity_fraction: whole lungs.
        ggo_ml / consolidation_ml: volumes in ml.
        per_lung: {"left"|"right": {"lung_ml", "ggo_fraction", "consolidation_fraction", "opacity_fraction"}}.
        per_zone: same keys for "upper", "lower", "central", "peripheral".
        pattern: pattern features (module docstring, step 5).
        removed: {"vessels_ml", "airways_ml"} taken out before counting.
        grid: {"stride": [z, y, x], "spacing_mm": [z, y, x]} of the working grid.
        config: the thresholds used.
        label_map: (z, y', x') uint8 0/1/2 on the working grid (not serialised).
        origin: (y0, x0) native index of ``label_map[:, 0, 0]``; native pixel (y, x) of the map's
            (i, j) is ``(y0 + i*stride, x0 + j*stride)``.
        slice_ggo_fraction / slice_consolidation_fraction: (z,) float64, per native slice, the
            share of that slice's analysed lung (working grid) in ground glass / consolidation;
            NaN where the slice has no analysed lung. Not in ``to_dict()`` (per-slice values
            travel with the slice scores, ``sdk.triage.SliceScore``).
        slice_lung_voxels: (z,) int64 analysed-lung voxels per slice on the working grid (0: none).
    """

    lung_ml: float
    ggo_fraction: float
    consolidation_fraction: float
    opacity_fraction: float
    ggo_ml: float
    consolidation_ml: float
    per_lung: Dict[str, Dict[str, float]]
    per_zone: Dict[str, Dict[str, float]]
    pattern: Dict[str, float]
    removed: Dict[str, float]
    grid: Dict[str, Any]
    config: Dict[str, float]
    label_map: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    origin: Tuple[int, int] = (0, 0)
    native_shape: Tuple[int, int, int] = (0, 0, 0)
    slice_ggo_fraction: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    slice_consolidation_fraction: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    slice_lung_voxels: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    def slice_fractions(self, z: int) -> Tuple[float, float]:
        """(ground glass, consolidation) fraction of native slice ``z``'s analysed lung (NaN, NaN
        when it has none or was not measured)."""
        g, c = self.slice_ggo_fraction, self.slice_consolidation_fraction
        if g is None or c is None or not 0 <= z < g.shape[0]:
            return float("nan"), float("nan")
        return float(g[z]), float(c[z])

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe dict (no arrays); floats rounded to 6 digits."""
        def r(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: r(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [r(x) for x in v]
            if isinstance(v, (bool, np.bool_)):
                return bool(v)
            if isinstance(v, (int, np.integer)):
                return int(v)
            if isinstance(v, (float, np.floating)):
                return round(float(v), 6) if np.isfinite(v) else None
            return v

        return r({k: getattr(self, k) for k in ("lung_ml", "ggo_fraction", "consolidation_fraction", "opacity_fraction",
                                               "ggo_ml", "consolidation_ml", "per_lung", "per_zone", "pattern",
                                               "removed", "grid", "config")})

    def full_slice(self, z: int) -> np.ndarray:
        """(rows, cols) uint8 label map of native slice ``z`` (nearest up-sampling of the working grid)."""
        return full_label_slice(self, z)


def full_label_slice(op: LungOpacity, z: int) -> np.ndarray:
    """Native-resolution 0/1/2 map of slice ``z``: each working-grid pixel fills its stride x stride block."""
    _, rows, cols = op.native_shape
    out = np.zeros((rows, cols), np.uint8)
    if op.label_map is None or not 0 <= z < op.label_map.shape[0]:
        return out
    s = int(op.grid["stride"][1])
    y0, x0 = op.origin
    blk = np.repeat(np.repeat(op.label_map[z], s, axis=0), s, axis=1)
    h, w = min(blk.shape[0], rows - y0), min(blk.shape[1], cols - x0)
    out[y0:y0 + h, x0:x0 + w] = blk[:h, :w]
    return out


# --- helpers -----------------------------------------------------------------------------------
def _disk(radius_px: int) -> np.ndarray:
    import cv2

    d = 2 * radius_px + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d))


def _frac(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else 0.0


def _stats(hist: np.ndarray, ml_per_voxel: float) -> Dict[str, float]:
    """Volume and fractions from a histogram whose last axis is the label (0 none, 1 GGO, 2 cons.)."""
    counts = hist.reshape(-1, 3).sum(axis=0).astype(np.float64)
    n = float(counts.sum())
    return {"lung_ml": n * ml_per_voxel, "ggo_fraction": _frac(counts[GGO], n),
            "consolidation_fraction": _frac(counts[CONSOLIDATION], n),
            "opacity_fraction": _frac(counts[GGO] + counts[CONSOLIDATION], n)}


def _ratio_index(a: float, b: float) -> float:
    """a / (a + b), 0.5 when both are zero (no predominance)."""
    return 0.5 if a + b <= 0 else float(a) / float(a + b)


def _split_lr(mask: np.ndarray) -> np.ndarray:
    """Binary mask -> 1 (left = high x) / 2 (right) at the mask's x centroid."""
    xs = np.nonzero(mask.any(axis=(0, 1)))[0]
    cx = int(round(np.average(np.arange(mask.shape[2]), weights=mask.sum(axis=(0, 1))))) if xs.size else mask.shape[2] // 2
    out = np.zeros(mask.shape, np.uint8)
    out[:, :, cx:][mask[:, :, cx:]] = LEFT
    out[:, :, :cx][mask[:, :, :cx]] = RIGHT
    return out


# --- the measurement ---------------------------------------------------------------------------
def measure_opacity(
    hu: np.ndarray,
    lung_labels: Any,
    spacing_mm: Sequence[float],
    *,
    superior_is_high_z: bool = True,
    config: OpacityConfig = OpacityConfig(),
    keep_map: bool = True,
    workers: int = 1,
) -> LungOpacity:
    """Measure ground glass and consolidation in the lungs (rules in the module docstring).

    Args:
        hu: (z, y, x) HU volume.
        lung_labels: (z, y, x) 0 background / 1 left / 2 right lung (``LungSegmentation.labels``),
            or a boolean/0-1 mask (split at the x centroid); or a lazy source with ``shape`` and
            ``strided(step) -> labels[:, ::step, ::step]`` (:class:`sdk.lungs.unet3d.CubeLabels`:
            only the voxels read here are sampled).
        spacing_mm: (z, y, x) voxel size in mm (z: the median slice step).
        superior_is_high_z: whether increasing z index goes towards the head (LPS +z along the
            slice normal; True for ctsdk volumes of axial series).
        config: thresholds.
        keep_map: keep the 0/1/2 ``label_map`` (heat-map overlay, DICOM SEG).
        workers: threads the slices are split over (at most :data:`OPACITY_WORKERS_MAX`; every
            rule is per slice, so the numbers do not depend on it). 1 on the CPU path, where the
            classifier already keeps the cores busy; the GPU path's host has cores to spare.

    Raises:
        ConfigError: shapes differ, the spacing is not positive, or the mask is empty.
    """
    hu = np.asarray(hu)
    strided = getattr(lung_labels, "strided", None)   # a lazy source (sdk.lungs.unet3d.CubeLabels)
    lab = lung_labels if strided is not None else np.asarray(lung_labels)
    if hu.shape != tuple(lab.shape) or hu.ndim != 3:
        raise ConfigError(f"HU volume {hu.shape} and lung labels {tuple(lab.shape)} must be the same 3-D shape")
    dz, dy, dx = (float(s) for s in spacing_mm)
    if min(dz, dy, dx) <= 0:
        raise ConfigError(f"voxel spacing must be positive, got {tuple(spacing_mm)}")
    # the in-plane stride, then the lung bounding box on that grid (no pass over the native grid)
    s = max(1, int(round(config.target_pixel_mm / min(dy, dx))))
    # one strided read (a lazy source samples only these voxels); every later pass is contiguous
    sub = np.ascontiguousarray(strided(s) if strided is not None else lab[:, ::s, ::s])
    rows_any = sub.any(axis=2)                      # (z, y): one pass over the sampled grid
    zs = np.nonzero(rows_any.any(axis=1))[0]
    if zs.size == 0:
        raise ConfigError("the lung mask is empty: no opacity can be measured")
    ys = np.nonzero(rows_any[zs[0]:zs[-1] + 1].any(axis=0))[0]
    xs = np.nonzero(sub[zs[0]:zs[-1] + 1, ys[0]:ys[-1] + 1].any(axis=(0, 1)))[0]
    z0, z1, y0, y1, x0, x1 = zs[0], zs[-1] + 1, ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
    py, px = dy * s, dx * s
    ml = dz * py * px / 1000.0
    # working arrays in the "tall image" layout: every slice followed by `pad` empty rows, so one
    # OpenCV call handles all slices and a kernel of radius <= pad never mixes two of them
    pad = max(3, int(np.ceil(config.vessel_width_mm / 2.0 / min(py, px))) + 1)
    nz, rows, cols = z1 - z0, y1 - y0, x1 - x0
    lb = np.zeros((nz, rows + pad, cols), np.uint8)
    lb[:, :rows] = sub[z0:z1, y0:y1, x0:x1]
    if sub.dtype == bool or lb.max(initial=0) <= 1:  # a binary mask: split at the x centroid
        lb = _split_lr(lb > 0)
    present = _trim_ends(lb, superior_is_high_z, config)
    # every rule below is per slice: slices the trimming emptied are dropped (they count nothing)
    kept = np.nonzero(lb.reshape(nz, -1).max(axis=1))[0]
    if kept.size:
        lb = lb[kept[0]:kept[-1] + 1]
        present = present[:, kept[0]:kept[-1] + 1]
        z0, z1 = z0 + kept[0], z0 + kept[-1] + 1
        nz = z1 - z0
    H = rows + pad
    h = np.full((nz, H, cols), -1000, hu.dtype)   # slice rows filled per slab below; pad rows stay air
    t = _HuThresholds(h.dtype, config)
    kernels = (np.ones((max(1, int(round(config.airway_width_mm / min(py, px)))),) * 2, np.uint8),
               _disk(max(1, int(round(config.vessel_width_mm / 2.0 / min(py, px))))), np.ones((3, 3), np.uint8))
    up = _upper_rows(present, nz, superior_is_high_z)
    h_rows, lb_rows = h.reshape(nz * H, cols), lb.reshape(nz * H, cols)

    def slab(a: int, b: int) -> _Slab:
        """Every per-slice rule for slices [a, b). OpenCV runs on the tall image from the previous
        slice's empty rows on (``lead``), so it sees exactly what one whole-stack call sees."""
        h[a:b, :rows] = hu[z0 + a:z0 + b, ::s, ::s][:, y0:y1, x0:x1]
        lead = pad if a > 0 else 0
        r0, r1 = a * H - lead, b * H
        analysed, airway, vessels, consolidation, ggo, label_map = (
            m[lead:].reshape(b - a, H, cols) for m in _rules_rows(h_rows[r0:r1], lb_rows[r0:r1], t, kernels))
        return _Slab(
            n_lung=np.count_nonzero(analysed.reshape(b - a, -1), axis=1),
            n_ggo=np.count_nonzero(ggo.reshape(b - a, -1), axis=1),
            n_cons=np.count_nonzero(consolidation.reshape(b - a, -1), axis=1),
            vessels=int(np.count_nonzero(vessels)), airways=int(np.count_nonzero(airway)),
            hist=_zone_rows(lb_rows[r0:r1], lead, up[:, a:b], label_map, analysed),
            consolidation=consolidation, label_map=label_map)

    parts = _map_slabs(slab, nz, workers)
    hist = sum(p.hist for p in parts)
    n_lung, n_ggo, n_cons = (np.zeros(hu.shape[0], np.int64) for _ in range(3))
    for arr, key in ((n_lung, "n_lung"), (n_ggo, "n_ggo"), (n_cons, "n_cons")):
        arr[z0:z1] = np.concatenate([getattr(p, key) for p in parts])
    consolidation = parts[0].consolidation if len(parts) == 1 else np.concatenate([p.consolidation for p in parts])
    label_map = parts[0].label_map if len(parts) == 1 else np.concatenate([p.label_map for p in parts])
    with np.errstate(invalid="ignore", divide="ignore"):
        den = np.where(n_lung > 0, n_lung, np.nan)
        slice_ggo, slice_cons = n_ggo / den, n_cons / den
    per_lung = {name: _stats(hist[v], ml) for name, v in (("left", LEFT), ("right", RIGHT))}
    per_zone = {"upper": _stats(hist[:, 1], ml), "lower": _stats(hist[:, 0], ml),
                "peripheral": _stats(hist[:, :, 1], ml), "central": _stats(hist[:, :, 0], ml)}
    total = _stats(hist, ml)
    pattern = _pattern(consolidation, lb, hist, per_lung, per_zone, total, config)
    full = np.zeros((hu.shape[0], rows, cols), np.uint8) if keep_map else None
    if full is not None:
        full[z0:z1] = label_map[:, :rows]
    return LungOpacity(
        lung_ml=total["lung_ml"], ggo_fraction=total["ggo_fraction"],
        consolidation_fraction=total["consolidation_fraction"], opacity_fraction=total["opacity_fraction"],
        ggo_ml=float(hist[..., GGO].sum()) * ml, consolidation_ml=float(hist[..., CONSOLIDATION].sum()) * ml,
        per_lung=per_lung, per_zone=per_zone, pattern=pattern,
        removed={"vessels_ml": float(sum(p.vessels for p in parts)) * ml, "airways_ml": float(sum(p.airways for p in parts)) * ml},
        grid={"stride": [1, s, s], "spacing_mm": [dz, py, px]},
        config={k: float(v) for k, v in asdict(config).items()},
        label_map=full, origin=(int(y0) * s, int(x0) * s), native_shape=tuple(int(v) for v in hu.shape),
        slice_ggo_fraction=slice_ggo, slice_consolidation_fraction=slice_cons, slice_lung_voxels=n_lung,
    )


class _HuThresholds:
    """The config's HU thresholds as values of the volume's dtype: for integer HU, ``h < t`` is
    ``h < ceil(t)`` and ``h <= t`` is ``h <= floor(t)`` exactly, and the comparison stays in the
    integer type (a Python float would cast every voxel to float64)."""

    def __init__(self, dtype: np.dtype, config: OpacityConfig) -> None:
        self.air = self._conv(dtype, config.air_hu, np.ceil)                  # h < air
        self.dense = self._conv(dtype, config.dense_hu, np.floor)             # h > dense, h <= dense
        self.consolidation_max = self._conv(dtype, config.consolidation_max_hu, np.floor)  # h <= max
        self.ggo_lo = self._conv(dtype, config.ggo_lo_hu, np.ceil)            # h >= lo

    @staticmethod
    def _conv(dtype: np.dtype, value: float, rounding: Any) -> Any:
        if not np.issubdtype(dtype, np.integer):
            return float(value)      # float HU: the comparison as before
        info = np.iinfo(dtype)
        v = float(rounding(value))
        if info.min <= v <= info.max:
            return dtype.type(v)
        return float(value)          # out of the dtype's range: keep the exact (slower) float test


def _trim_ends(lb: np.ndarray, superior_is_high_z: bool, config: OpacityConfig) -> np.ndarray:
    """Drop (in place) the basal ``base_exclusion`` and apical ``apex_exclusion`` share of each
    lung's craniocaudal extent: partial volume with the diaphragm / liver / spleen (and masks
    leaking into them) and tiny apical cross-sections read as opacity there.

    Returns (3, z) bool: whether label v is still on slice z after the trimming."""
    present = np.zeros((3, lb.shape[0]), bool)
    for v in (LEFT, RIGHT):
        present[v] = (lb == v).any(axis=(1, 2))
        zs = np.nonzero(present[v])[0]
        if zs.size == 0:
            continue
        n = zs[-1] - zs[0] + 1
        n_base, n_apex = int(round(config.base_exclusion * n)), int(round(config.apex_exclusion * n))
        lo, hi = (n_base, n_apex) if superior_is_high_z else (n_apex, n_base)
        for sl in (slice(zs[0], zs[0] + lo), slice(zs[-1] + 1 - hi, zs[-1] + 1)):
            part = lb[sl]
            part[part == v] = 0
            present[v, sl] = False
    return present


def _upper_rows(present: np.ndarray, nz: int, superior_is_high_z: bool) -> np.ndarray:
    """(3, z) bool: slice z is in lung v's upper half (above / below the middle of its extent)."""
    zi = np.arange(nz)
    up = np.zeros((3, nz), bool)
    for v in (LEFT, RIGHT):
        zs = np.nonzero(present[v])[0]
        if zs.size:
            mid = 0.5 * (zs[0] + zs[-1])
            up[v] = zi > mid if superior_is_high_z else zi < mid
    return up


def _rules_rows(h: np.ndarray, lb: np.ndarray, t: "_HuThresholds",
                kernels: Tuple[np.ndarray, np.ndarray, np.ndarray]) -> Tuple[np.ndarray, ...]:
    """Rules 1-3 on rows of the tall image (slices with their empty rows; every rule is per slice).
    Returns (analysed, airway, vessels, consolidation, ground glass, 0/1/2 label map) over the same rows."""
    import cv2

    k_air, k_disk, k3 = kernels
    # (in-place NumPy steps into one scratch mask: every fresh array costs page faults)
    lung = lb > 0
    tmp = np.less(h, t.air)
    tmp &= lung                                                # 1. air inside the lung ...
    airway = cv2.morphologyEx(tmp.view(np.uint8), cv2.MORPH_OPEN, k_air).view(bool)   # ... at least airway_width wide
    analysed = np.greater(lung, airway, out=lung)              # lung & ~airway (bool a > b)
    dense = np.greater(h, t.dense, out=tmp)                    # 2. dense: the vessel-width opening keeps
    dense &= analysed                                          #    consolidation, the rest is vessels
    opened = cv2.morphologyEx(dense.view(np.uint8), cv2.MORPH_OPEN, k_disk).view(bool)
    consolidation = np.less_equal(h, t.consolidation_max)
    consolidation &= opened
    vessels = np.greater(dense, opened, out=opened)            # dense & ~opened
    # 3. ground glass, minus a one-pixel rim around vessels and airways, minus single pixels
    rim = cv2.dilate(np.bitwise_or(vessels, airway, out=tmp).view(np.uint8), k3).view(bool)
    ggo = np.greater_equal(h, t.ggo_lo, out=tmp)
    ggo &= analysed
    np.greater(ggo, rim, out=ggo)                              # & ~rim
    ggo &= np.less_equal(h, t.dense, out=rim)                  # analysed & ~dense
    ggo = cv2.morphologyEx(ggo.view(np.uint8), cv2.MORPH_OPEN, k3).view(bool)
    label_map = consolidation.view(np.uint8) * np.uint8(CONSOLIDATION)   # disjoint: ggo is not dense
    label_map |= ggo.view(np.uint8)
    return analysed, airway, vessels, consolidation, ggo, label_map


@dataclass
class _Slab:
    """What :func:`measure_opacity` keeps of one run of slices."""

    n_lung: np.ndarray
    n_ggo: np.ndarray
    n_cons: np.ndarray
    vessels: int
    airways: int
    hist: np.ndarray
    consolidation: np.ndarray
    label_map: np.ndarray


def _zone_rows(lb_rows: np.ndarray, lead: int, up: np.ndarray, label_map: np.ndarray, analysed: np.ndarray) -> np.ndarray:
    """(side, upper, peripheral, label) = (3, 2, 2, 3) voxel counts of the analysed lung in a run of
    slices (zones in the module docstring): ``lb_rows`` are their tall-image rows after ``lead``
    rows of the previous slice's empty rows; ``up``, ``label_map``, ``analysed`` are the slices'.

    *Upper* depends only on (lung, slice), so it is applied per run of slices (at most 3) instead of
    per voxel; *peripheral* compares the 2D depth with that (lung, slice)'s threshold on a signed
    depth map (right lung negated), so both lungs' per-slice maxima come from one max and one min."""
    import cv2

    nz, rows, cols = analysed.shape
    lb = lb_rows[lead:].reshape(nz, rows, cols)
    # depth = 2D distance to the lung boundary; peripheral = outer third of that slice's deepest point
    d = cv2.distanceTransform((lb_rows > 0).view(np.uint8), cv2.DIST_L2, 3)[lead:].reshape(nz, rows, cols)
    scratch = np.equal(lb, RIGHT)
    np.negative(d, out=d, where=scratch)
    thr_left = d.max(axis=(1, 2)) / 3.0            # float32, as the per-lung maxima of the depth
    thr_right = -d.min(axis=(1, 2)) / 3.0
    periph = np.less_equal(d, thr_left[:, None, None])
    periph &= np.greater_equal(d, -thr_right[:, None, None], out=scratch)
    # (side, peripheral, label) counts of the analysed voxels, per run of slices with one `up` row
    hist = np.zeros((3, 2, 2, 3), np.int64)
    key = up[LEFT].view(np.uint8) * 2 + up[RIGHT].view(np.uint8)
    starts = np.concatenate(([0], np.flatnonzero(np.diff(key)) + 1, [nz]))
    for a, b in zip(starts[:-1], starts[1:]):
        counts = _joint_counts((lb[a:b], periph[a:b].view(np.uint8), label_map[a:b]), (3, 2, 3),
                               analysed[a:b].view(np.uint8))
        for v in (LEFT, RIGHT):
            hist[v, int(up[v, a])] += counts[v]
    return hist


def _map_slabs(fn: Any, nz: int, workers: int) -> List[Any]:
    """``fn(a, b)`` over ``workers`` runs of slices covering [0, nz), on the ``opacity`` thread pool
    (OpenCV and NumPy release the GIL); one call on [0, nz) when ``workers`` is 1."""
    n = max(1, min(int(workers), nz))
    if n == 1:
        return [fn(0, nz)]
    from .pools import shared_pool

    edges = np.linspace(0, nz, n + 1).round().astype(int)
    pool = shared_pool("opacity", OPACITY_WORKERS_MAX)
    return [f.result() for f in [pool.submit(fn, int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]]


def _joint_counts(images: Tuple[np.ndarray, ...], bins: Tuple[int, ...], mask: np.ndarray) -> np.ndarray:
    """Joint histogram of small non-negative uint8 (z, rows, cols) maps over the voxels where
    ``mask`` is nonzero (value v of map i in bin v, values < bins[i]): the ``np.bincount`` of the
    combined code, by OpenCV's 8-bit histogram (no code array, no cast to 64-bit indices). Its
    float32 bins are exact below 2**24, so the slices are counted in chunks of fewer voxels."""
    import cv2

    nz, rows, cols = mask.shape
    step = max(1, (1 << 23) // max(1, rows * cols))
    total = np.zeros(bins, np.int64)
    ranges = [r for n in bins for r in (0, n)]
    for a in range(0, nz, step):
        parts = [np.ascontiguousarray(im[a:a + step]).reshape(-1, cols) for im in images]
        m = np.ascontiguousarray(mask[a:a + step]).reshape(-1, cols)
        total += cv2.calcHist(parts, list(range(len(parts))), m, list(bins), ranges).astype(np.int64)
    return total


def _pattern(consolidation: np.ndarray, lb: np.ndarray, hist: np.ndarray, per_lung: Dict[str, Dict[str, float]],
             per_zone: Dict[str, Dict[str, float]], total: Dict[str, float], config: OpacityConfig) -> Dict[str, float]:
    fl, fr = per_lung["left"]["opacity_fraction"], per_lung["right"]["opacity_fraction"]
    hi = max(fl, fr)
    largest, n_comp = 0.0, 0
    if consolidation.any():
        from scipy import ndimage

        zi = np.nonzero(consolidation.any(axis=(1, 2)))[0]
        yi = np.nonzero(consolidation.any(axis=(0, 2)))[0]
        xi = np.nonzero(consolidation.any(axis=(0, 1)))[0]
        box = (slice(zi[0], zi[-1] + 1), slice(yi[0], yi[-1] + 1), slice(xi[0], xi[-1] + 1))
        cons = consolidation[box]
        # components on a 2x coarser in-plane grid (2x2 max pooling: 4x less work, consolidation
        # is at least vessel_width wide so no component is lost), sizes counted at full grid
        nzb, nyb, nxb = cons.shape
        padded = np.zeros((nzb, (nyb + 1) // 2 * 2, (nxb + 1) // 2 * 2), np.uint8)
        padded[:, :nyb, :nxb] = cons
        quads = (padded[:, 0::2, 0::2], padded[:, 1::2, 0::2], padded[:, 0::2, 1::2], padded[:, 1::2, 1::2])
        count = quads[0] + quads[1] + quads[2] + quads[3]      # consolidation voxels per coarse cell
        coarse, n_comp = ndimage.label(count > 0, structure=np.ones((3, 3, 3), bool))
        occupied = coarse > 0
        sizes = np.bincount(coarse[occupied], weights=count[occupied], minlength=n_comp + 1)[1:]
        k = int(np.argmax(sizes)) + 1
        padded[:, :nyb, :nxb] &= lb[box] == LEFT              # left-lung consolidation voxels
        left_count = quads[0] + quads[1] + quads[2] + quads[3]
        in_k = coarse == k
        n_left = int(left_count[in_k].sum())
        which = (n_left, int(count[in_k].sum()) - n_left)
        side = LEFT if which[0] >= which[1] else RIGHT
        lung_n = float(hist[side].sum())
        largest = _frac(sizes[k - 1], lung_n)
    g = total["ggo_fraction"]
    c = total["consolidation_fraction"]
    return {
        "bilateral_index": 0.0 if hi <= 0 else min(fl, fr) / hi,
        "peripheral_index": _ratio_index(per_zone["peripheral"]["opacity_fraction"], per_zone["central"]["opacity_fraction"]),
        "lower_index": _ratio_index(per_zone["lower"]["opacity_fraction"], per_zone["upper"]["opacity_fraction"]),
        "ggo_share": _ratio_index(g, c) if g + c > 0 else 0.0,
        "largest_consolidation_fraction": largest,
        "consolidation_components": int(n_comp),
        "involved_lungs": int((fl >= config.involved_fraction) + (fr >= config.involved_fraction)),
    }
