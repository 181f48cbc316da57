"""Prior-study comparison (paper 003: images of one patient at different times carry information).

``compare(current, current_mask, prior, prior_mask)`` answers "did the lungs get worse?":

1. **Grids.** Each study's lung mask and opacity indicator (``HU > threshold_hu`` inside the lung,
   at native resolution) are area-averaged onto an isotropic ``grid_mm`` grid in the study's own
   physical frame (slice positions from ``z_mm``, so uneven z is handled).
2. **Rigid registration, prior -> current, on the lung masks.** Start from centre-of-mass
   alignment, then minimise ``1 - soft Dice`` of the two lung-fraction grids over 3 rotations
   (about the current lungs' centre, bounded by ``max_rotation_deg``) and 3 translations (bounded
   by ``max_translation_mm``) with SciPy's bounded Powell, at most ``max_evaluations`` cost
   evaluations. Registration is reported (angles, shift, Dice before/after), never hidden.
3. **Burden per lung.** Fraction of lung volume above ``threshold_hu`` (-700 HU: ground glass and
   denser), computed exactly at native resolution on each study's own mask, for the left and right
   lung (mask labels 1 = left, 2 = right as :mod:`sdk.lungs` writes them; a 0/1 mask is split
   into two components or at the x centroid; x increases towards the patient's Left).
4. **Change.** ``delta = current - prior`` (fraction of lung volume). Per lung: ``worse`` when
   ``delta > stable_band``, ``improved`` when ``delta < -stable_band``, else ``stable``. Overall:
   ``worse`` if any lung is worse, else ``improved`` if any improved, else ``stable``. The default
   band, 0.03 (3 percentage points of lung volume), sits above the burden change from breathing
   depth and vessel partial volume between two scans of unchanged lungs (documented in
   docs/integration.md, with the numbers measured by the tests).
5. **Difference map.** Registered opacity-fraction grids, ``current - prior`` inside the lungs,
   Gaussian-smoothed (``diff_smooth_mm``, 6 mm) so that the +/- pairs left by residual
   misregistration of vessels cancel: new opacity in ml (positive part), resolved opacity in ml
   (negative part) - supplementary numbers with a noise floor (docs/integration.md); the change
   label comes from the registration-independent burden of step 4 - and a PNG (coronal mean projection and the axial
   level with the largest new opacity; red = new, blue = resolved).

Requirements: both inputs must be volumes (at least ``min_slices`` slices covering
``min_extent_mm``); single slices or thick-slab localisers raise :class:`~sdk.errors.ConfigError`
rather than produce a number that means nothing.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import ConfigError, ResultWriteError

log = logging.getLogger("sdk.prior")

PathLike = Union[str, Path]
LEFT, RIGHT = 1, 2
CHANGES = ("improved", "stable", "worse")

__all__ = ["PriorConfig", "PriorComparison", "compare", "lung_labels", "opacity_burden", "classify_change",
           "rigid_register", "to_grid", "euler_matrix", "CHANGES"]


@dataclass(frozen=True)
class PriorConfig:
    """Parameters of the comparison (HU, fractions, mm, degrees)."""

    threshold_hu: float = -700.0
    stable_band: float = 0.03
    grid_mm: float = 4.0
    registration_grid_mm: float = 4.0
    diff_smooth_mm: float = 6.0
    max_rotation_deg: float = 10.0
    max_translation_mm: float = 40.0
    max_evaluations: int = 400
    min_slices: int = 8
    min_extent_mm: float = 60.0

    def __post_init__(self) -> None:
        if not self.stable_band >= 0:
            raise ConfigError(f"PriorConfig.stable_band must be >= 0, not {self.stable_band}")
        if not (self.grid_mm > 0 and self.registration_grid_mm > 0):
            raise ConfigError(f"PriorConfig grid sizes must be > 0, not {self.grid_mm} / {self.registration_grid_mm}")
        if self.max_evaluations < 1:
            raise ConfigError(f"PriorConfig.max_evaluations must be >= 1, not {self.max_evaluations}")


@dataclass
class PriorComparison:
    """Result of :func:`compare`. ``to_dict()`` is JSON-safe (the grids are not included)."""

    change: str
    lungs: Dict[str, Dict[str, float]]
    overall: Dict[str, float]
    new_opacity_ml: float
    resolved_opacity_ml: float
    registration: Dict[str, Any]
    config: PriorConfig
    slice_scores: Optional[Dict[str, float]] = None
    timings_ms: Dict[str, float] = field(default_factory=dict)
    heatmap_path: Optional[str] = None
    diff_grid: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def summary(self) -> str:
        parts = [f"{name} lung {d['prior_burden'] * 100:.1f}% -> {d['current_burden'] * 100:.1f}% ({d['change']})"
                 for name, d in self.lungs.items()]
        return (f"{self.change}: " + "; ".join(parts)
                + f"; new opacity {self.new_opacity_ml:.1f} ml, resolved {self.resolved_opacity_ml:.1f} ml")

    def to_dict(self) -> Dict[str, Any]:
        return {
            "change": self.change,
            "summary": self.summary,
            "lungs": {k: {kk: _py(vv) for kk, vv in v.items()} for k, v in self.lungs.items()},
            "overall": {k: _py(v) for k, v in self.overall.items()},
            "new_opacity_ml": float(self.new_opacity_ml),
            "resolved_opacity_ml": float(self.resolved_opacity_ml),
            "registration": {k: _py(v) for k, v in self.registration.items()},
            "thresholds": {"threshold_hu": self.config.threshold_hu, "stable_band": self.config.stable_band},
            "slice_scores": self.slice_scores,
            "timings_ms": {k: round(float(v), 1) for k, v in self.timings_ms.items()},
            "heatmap_path": self.heatmap_path,
        }

    def save_heatmap(self, path: PathLike) -> Path:
        """PNG of the registered difference (coronal mean projection + axial level of most new opacity)."""
        if self.diff_grid is None:
            raise ConfigError("this comparison holds no difference grid (rebuilt from a dict?)")
        path = Path(path)
        _plot_difference(self.diff_grid, self.config.grid_mm, self.summary, path)
        self.heatmap_path = str(path)
        return path


def _py(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_py(x) for x in v]
    return v


# --- masks and burden ---------------------------------------------------------------------------
def lung_labels(mask: np.ndarray) -> np.ndarray:
    """uint8 map 0 / LEFT (1) / RIGHT (2) from a labelled or binary lung mask.

    A mask containing the value 2 is taken as already labelled (sdk.lungs convention). A binary
    mask is split into its two largest connected components when the second is at least 10 % of
    the first, else at the x centroid; the component with the larger mean x is the Left lung.
    """
    from scipy import ndimage as ndi

    m = np.asarray(mask)
    if m.ndim != 3:
        raise ConfigError(f"lung mask must be 3-D (z, y, x), got shape {m.shape}")
    if (m == RIGHT).any():
        out = np.zeros(m.shape, np.uint8)
        out[m == LEFT] = LEFT
        out[m == RIGHT] = RIGHT
        return out
    lung = m > 0
    xs = np.arange(m.shape[2])
    lab, n = ndi.label(lung)
    parts: Tuple[np.ndarray, np.ndarray]
    if n >= 2:
        sizes = np.bincount(lab.ravel())[1:]
        o = np.argsort(sizes)[::-1]
        if sizes[o[1]] >= 0.1 * sizes[o[0]]:
            a, b = lab == o[0] + 1, lab == o[1] + 1
            rest = lung & ~a & ~b
            parts = (a, b)
            if rest.any():  # small islands join the nearer lung by x
                ca, cb = (_centroid_x(p, xs) for p in parts)
                near_a = np.abs(xs - ca) <= np.abs(xs - cb)
                parts = (a | (rest & near_a[None, None, :]), b | (rest & ~near_a[None, None, :]))
        else:
            parts = _split_at_centroid(lung, xs)
    else:
        parts = _split_at_centroid(lung, xs)
    a, b = parts
    left, right = (a, b) if _centroid_x(a, xs) > _centroid_x(b, xs) else (b, a)
    out = np.zeros(m.shape, np.uint8)
    out[left] = LEFT
    out[right] = RIGHT
    return out


def _centroid_x(m: np.ndarray, xs: np.ndarray) -> float:
    return float((m.sum(axis=(0, 1)) * xs).sum() / max(int(m.sum()), 1))


def _split_at_centroid(lung: np.ndarray, xs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    cx = _centroid_x(lung, xs)
    return lung & (xs[None, None, :] < cx), lung & (xs[None, None, :] >= cx)


def opacity_burden(hu: np.ndarray, labels: np.ndarray, threshold_hu: float, voxel_ml: float) -> Dict[str, Dict[str, float]]:
    """Per lung (``left``, ``right``, ``both``): lung volume (ml), opacified volume (ml), burden fraction."""
    op = np.asarray(hu) > threshold_hu
    out: Dict[str, Dict[str, float]] = {}
    for name, sel in (("left", labels == LEFT), ("right", labels == RIGHT), ("both", labels > 0)):
        n = int(sel.sum())
        k = int((op & sel).sum())
        out[name] = {"volume_ml": n * voxel_ml, "opacity_ml": k * voxel_ml, "burden": k / n if n else float("nan")}
    return out


def classify_change(delta: float, band: float) -> str:
    """"worse" above +band, "improved" below -band, else "stable" (NaN -> "stable" is not allowed)."""
    if not np.isfinite(delta):
        raise ConfigError("burden change is not a number (an empty lung mask in one study?)")
    if delta > band:
        return "worse"
    if delta < -band:
        return "improved"
    return "stable"


# --- grids and registration ---------------------------------------------------------------------
def _voxel_ml(volume: Any) -> float:
    dz, dy, dx = volume.spacing
    return float(dz * dy * dx) / 1000.0


def _axis_groups(pos: np.ndarray, g: float) -> Tuple[np.ndarray, np.ndarray, float]:
    """Start indices (for np.add.reduceat) of each grid cell along one axis, counts, and the origin."""
    pos = np.asarray(pos, dtype=np.float64)
    origin = float(pos[0])
    cell = np.floor((pos - origin) / g + 1e-9).astype(np.int64)
    n_cells = int(cell[-1]) + 1
    starts = np.searchsorted(cell, np.arange(n_cells), side="left")
    counts = np.diff(np.append(starts, pos.size))
    return starts, counts, origin


def _interp_axis(f: np.ndarray, pos: np.ndarray, g: float, axis: int) -> Tuple[np.ndarray, float]:
    """Linear interpolation of ``f`` along ``axis`` at cell centres ``pos[0] - step/2 + (k + 0.5) g``.

    Used where the native spacing is coarser than the grid (thick slices): averaging would leave
    empty cells. Cells outside the sampled range take the nearest slice (clamped), like the
    resampling convention in docs/conventions.md.
    """
    step = float(np.median(np.diff(pos))) if pos.size > 1 else g
    lo = float(pos[0]) - step / 2.0
    extent = float(pos[-1] - pos[0]) + step
    n_cells = max(1, int(round(extent / g)))
    centres = lo + (np.arange(n_cells) + 0.5) * g
    src = np.interp(centres, pos, np.arange(pos.size, dtype=np.float64))
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, pos.size - 1)
    w = (src - i0).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = n_cells
    w = w.reshape(shape)
    out = np.take(f, i0, axis=axis) * (1 - w) + np.take(f, i1, axis=axis) * w
    return out.astype(np.float32), lo


def to_grid(field_zyx: np.ndarray, z_mm: np.ndarray, spacing_yx: Tuple[float, float], g: float) -> Tuple[np.ndarray, np.ndarray]:
    """Resample a (z, y, x) field onto an isotropic grid of ``g`` mm, axis by axis.

    Axes at least twice finer than the grid are **area-averaged** (every native voxel falls in the
    cell containing its centre; a cell's value is the mean of its voxels); coarser axes (thick
    slices) are **linearly interpolated** at the cell centres (averaging 1-2 samples per cell would
    shift each cell's centroid by up to half a cell). Returns (grid, origin_mm (z, y, x))
    where cell ``k`` spans ``[origin + k g, origin + (k+1) g)``, in the volume's own frame
    (z from ``z_mm``, y and x from the first voxel centre at 0).
    """
    f = np.asarray(field_zyx, dtype=np.float32)
    axes_pos = [np.asarray(z_mm, np.float64), np.arange(f.shape[1]) * float(spacing_yx[0]),
                np.arange(f.shape[2]) * float(spacing_yx[1])]
    origin = []
    for axis, pos in enumerate(axes_pos):
        step = float(np.median(np.diff(pos))) if pos.size > 1 else g
        if step > g / 2.0:  # fewer than 2 samples per cell: averaging would alias (biased centroids)
            f, o = _interp_axis(f, pos, g, axis)
            origin.append(o)
            continue
        starts, counts, o = _axis_groups(pos, g)
        s = np.add.reduceat(f, starts, axis=axis)
        shape = [1, 1, 1]
        shape[axis] = counts.size
        with np.errstate(invalid="ignore", divide="ignore"):
            f = np.where(counts.reshape(shape) > 0, s / np.maximum(counts, 1).reshape(shape), 0.0).astype(np.float32)
        origin.append(o)
    return f, np.asarray(origin)


def euler_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation matrix (z, y, x index frame) from angles about the z, y and x axes, in degrees."""
    a, b, c = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])  # about z: mixes y, x
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])  # about y: mixes z, x
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])  # about x: mixes z, y
    return rz @ ry @ rx


def _centre_of_mass(grid: np.ndarray, g: float, origin: np.ndarray) -> np.ndarray:
    """Centre of mass of a grid in the volume's own frame (mm, (z, y, x))."""
    idx = np.indices(grid.shape).reshape(3, -1).astype(np.float64)
    w = grid.reshape(-1).astype(np.float64)
    total = w.sum()
    if total <= 0:
        raise ConfigError("empty lung mask: nothing to register")
    return np.asarray(origin, np.float64) + (idx @ w / total + 0.5) * g


@dataclass(frozen=True)
class GridSpec:
    """An isotropic grid in a volume's own frame: cell ``k`` spans ``[origin + k g, origin + (k+1) g)``."""

    shape: Tuple[int, int, int]
    g: float
    origin: np.ndarray


class _Warp:
    """Samples a prior grid at the current grid's cell centres under a rigid transform.

    The transform is ``p = R(angles) (c - c_cur) + c_pri + t`` in mm (each study's own frame), so
    the same parameters apply to grids of any spacing. ``where`` (a boolean mask over the current
    grid) restricts the sampled cells, e.g. to the current lungs during registration.
    """

    def __init__(self, cur: GridSpec, pri: GridSpec, c_cur: np.ndarray, c_pri: np.ndarray,
                 where: Optional[np.ndarray] = None):
        self.pri = pri
        self.c_pri = c_pri
        self.shape = cur.shape
        idx = np.indices(cur.shape).reshape(3, -1) if where is None else np.stack(np.nonzero(where))
        centres = np.asarray(cur.origin, np.float64)[:, None] + (idx + 0.5) * cur.g
        self.pts = (centres - c_cur[:, None]) / pri.g
        self.flat = where is not None

    def __call__(self, prior_grid: np.ndarray, params: np.ndarray, order: int = 1) -> np.ndarray:
        from scipy import ndimage as ndi

        r = euler_matrix(params[:3])
        shift = (self.c_pri + params[3:6] - np.asarray(self.pri.origin, np.float64)) / self.pri.g - 0.5
        coords = r @ self.pts + shift[:, None]
        out = ndi.map_coordinates(prior_grid, coords, order=order, mode="constant", cval=0.0)
        return out if self.flat else out.reshape(self.shape)


def _soft_dice(a: np.ndarray, b: np.ndarray) -> float:
    s = float(a.sum() + b.sum())
    return 2.0 * float((a * b).sum()) / s if s > 0 else 0.0


def rigid_register(cur_lung: np.ndarray, cur_spec: GridSpec, pri_lung: np.ndarray, pri_spec: GridSpec,
                   cfg: PriorConfig) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Dict[str, Any]]:
    """Rigid prior -> current registration of two lung-fraction grids (see the module docstring).

    Returns (params = [rot_z, rot_y, rot_x (deg), t_z, t_y, t_x (mm)], c_cur, c_pri, report);
    the translation is relative to centre-of-mass alignment, centres in each study's frame (mm).
    """
    from scipy import ndimage as ndi
    from scipy.optimize import minimize

    # a little smoothing makes the cost smooth in the parameters, so Powell's line searches converge
    cur_lung = ndi.gaussian_filter(cur_lung.astype(np.float32), 1.0)
    pri_lung = ndi.gaussian_filter(pri_lung.astype(np.float32), 1.0)
    c_cur = _centre_of_mass(cur_lung, cur_spec.g, cur_spec.origin)
    c_pri = _centre_of_mass(pri_lung, pri_spec.g, pri_spec.origin)
    # rigid maps preserve volume, so the warped prior's total is the prior's own total: the soft
    # Dice needs the warped prior only where the current lung is (a third of its bounding box)
    where = cur_lung > 1e-3
    fast = _Warp(cur_spec, pri_spec, c_cur, c_pri, where)
    target = cur_lung[where]
    denom = float(cur_lung.sum() + pri_lung.sum() * (pri_spec.g / cur_spec.g) ** 3)
    x0 = np.zeros(6)
    n_eval = [0]

    def cost(p: np.ndarray) -> float:
        n_eval[0] += 1
        return 1.0 - 2.0 * float(np.dot(target, fast(pri_lung, p))) / denom

    dice_com = 1.0 - cost(x0)
    r, t = cfg.max_rotation_deg, cfg.max_translation_mm
    bounds = [(-r, r)] * 3 + [(-t, t)] * 3
    res = minimize(cost, x0, method="Powell", bounds=bounds,
                   options={"maxfev": cfg.max_evaluations, "xtol": 0.05, "ftol": 1e-4})
    params = np.asarray(res.x, dtype=np.float64)
    dice_after = 1.0 - float(res.fun)
    if dice_after < dice_com:  # never return something worse than the initial alignment
        params, dice_after = x0, dice_com
    report = {
        "method": "centre-of-mass + rigid (bounded Powell, 1 - soft Dice of the lung masks)",
        "grid_mm": cur_spec.g,
        "rotation_deg": params[:3].round(3).tolist(),
        "translation_mm": params[3:].round(3).tolist(),
        "com_offset_mm": (c_pri - c_cur).round(2).tolist(),
        "dice_com": round(dice_com, 4),
        "dice": round(dice_after, 4),
        "evaluations": int(n_eval[0]),
        "converged": bool(res.success),
    }
    return params, c_cur, c_pri, report


# --- the comparison -----------------------------------------------------------------------------
def _check_volume(volume: Any, mask: np.ndarray, which: str, cfg: PriorConfig) -> None:
    hu = getattr(volume, "hu", None)
    if hu is None or np.asarray(hu).ndim != 3:
        raise ConfigError(f"{which} study: expected an sdk.volume.Volume, got {type(volume).__name__}")
    if np.asarray(mask).shape != hu.shape:
        raise ConfigError(f"{which} study: lung mask shape {np.asarray(mask).shape} differs from the volume's {hu.shape}")
    nz = hu.shape[0]
    extent = volume.extent_mm[0]
    if nz < cfg.min_slices or extent < cfg.min_extent_mm:
        raise ConfigError(
            f"{which} study ({getattr(volume.meta, 'series_uid', '') or 'series'}): {nz} slice(s) covering "
            f"{extent:.0f} mm - a prior comparison needs a chest volume (>= {cfg.min_slices} slices, "
            f">= {cfg.min_extent_mm:.0f} mm); single slices cannot be registered or give a lung burden")
    if not (np.asarray(mask) > 0).any():
        raise ConfigError(f"{which} study: the lung mask is empty (lung segmentation found no lung)")


def compare(
    current_volume: Any,
    current_lung_mask: np.ndarray,
    prior_volume: Any,
    prior_lung_mask: np.ndarray,
    *,
    config: Optional[PriorConfig] = None,
    heatmap_path: Optional[PathLike] = None,
    current_slice_scores: Optional[Sequence[Mapping[str, Any]]] = None,
    prior_slice_scores: Optional[Sequence[Mapping[str, Any]]] = None,
    positive_class: str = "covid",
) -> PriorComparison:
    """Compare a current study with a prior one of the same patient (see the module docstring).

    Args:
        current_volume, prior_volume: :class:`sdk.volume.Volume` (HU, canonical LPS).
        current_lung_mask, prior_lung_mask: (z, y, x) masks on each volume's grid, labelled
            (1 left, 2 right) or binary.
        config: thresholds and registration limits.
        heatmap_path: write the difference PNG there.
        current_slice_scores, prior_slice_scores: ``TriageResult.slice_scores`` dicts of both
            studies; when given, the mean ``positive_class`` probability of each is reported too.

    Raises:
        ConfigError: an input is not a volume (single slice), masks mismatch or are empty.
    """
    cfg = config or PriorConfig()
    _check_volume(current_volume, current_lung_mask, "current", cfg)
    _check_volume(prior_volume, prior_lung_mask, "prior", cfg)
    t0 = time.perf_counter()
    timings: Dict[str, float] = {}
    cur_lab, pri_lab = lung_labels(current_lung_mask), lung_labels(prior_lung_mask)
    b_cur = opacity_burden(current_volume.hu, cur_lab, cfg.threshold_hu, _voxel_ml(current_volume))
    b_pri = opacity_burden(prior_volume.hu, pri_lab, cfg.threshold_hu, _voxel_ml(prior_volume))
    timings["burden"] = (time.perf_counter() - t0) * 1000
    lungs: Dict[str, Dict[str, float]] = {}
    for name in ("left", "right", "both"):
        delta = b_cur[name]["burden"] - b_pri[name]["burden"]
        lungs[name] = {
            "prior_burden": b_pri[name]["burden"], "current_burden": b_cur[name]["burden"], "delta": delta,
            "prior_volume_ml": b_pri[name]["volume_ml"], "current_volume_ml": b_cur[name]["volume_ml"],
            "prior_opacity_ml": b_pri[name]["opacity_ml"], "current_opacity_ml": b_cur[name]["opacity_ml"],
            "change": classify_change(delta, cfg.stable_band),
        }
    overall_lungs = lungs.pop("both")
    per = [lungs["left"]["change"], lungs["right"]["change"]]
    change = "worse" if "worse" in per else "improved" if "improved" in per else "stable"

    # registration and difference map on isotropic grids (same rigid parameters in mm, so the two
    # grid sizes may differ: PriorConfig.registration_grid_mm / grid_mm)
    t1 = time.perf_counter()

    def grids(volume: Any, lab: np.ndarray, g: float) -> Tuple[np.ndarray, np.ndarray, GridSpec]:
        lung, origin = to_grid(lab > 0, volume.z_mm, volume.pixel_spacing_mm, g)
        op, _ = to_grid((volume.hu > cfg.threshold_hu) & (lab > 0), volume.z_mm, volume.pixel_spacing_mm, g)
        return lung, op, GridSpec(lung.shape, g, origin)

    cur_lung_r, _, cur_r = grids(current_volume, cur_lab, cfg.registration_grid_mm)
    pri_lung_r, _, pri_r = grids(prior_volume, pri_lab, cfg.registration_grid_mm)
    cur_lung_g, cur_op_g, cur_g = grids(current_volume, cur_lab, cfg.grid_mm)
    pri_lung_g, pri_op_g, pri_g = grids(prior_volume, pri_lab, cfg.grid_mm)
    timings["grids"] = (time.perf_counter() - t1) * 1000
    t2 = time.perf_counter()
    params, c_cur, c_pri, reg = rigid_register(cur_lung_r, cur_r, pri_lung_r, pri_r, cfg)
    timings["registration"] = (time.perf_counter() - t2) * 1000
    warp = _Warp(cur_g, pri_g, c_cur, c_pri)
    pri_op_w = warp(pri_op_g, params)
    pri_lung_w = warp(pri_lung_g, params)
    reg["dice_fine_grid"] = round(_soft_dice(cur_lung_g, pri_lung_w), 4)
    inside = np.maximum(cur_lung_g, pri_lung_w) > 0.05
    diff = np.where(inside, cur_op_g - pri_op_w, 0.0).astype(np.float32)
    if cfg.diff_smooth_mm > 0:  # residual misregistration of vessels leaves +/- pairs: let them cancel
        from scipy import ndimage as ndi

        diff = ndi.gaussian_filter(diff, cfg.diff_smooth_mm / cfg.grid_mm, mode="constant").astype(np.float32)
    g = cfg.grid_mm
    cell_ml = g ** 3 / 1000.0
    new_ml = float(np.clip(diff, 0, None).sum() * cell_ml)
    resolved_ml = float(np.clip(-diff, 0, None).sum() * cell_ml)

    scores = None
    if current_slice_scores is not None and prior_slice_scores is not None:
        def mean_pos(ss: Sequence[Mapping[str, Any]]) -> float:
            vals = [float(s.get("probabilities", {}).get(positive_class, np.nan)) for s in ss]
            vals = [v for v in vals if np.isfinite(v)]
            return float(np.mean(vals)) if vals else float("nan")

        cur_m, pri_m = mean_pos(current_slice_scores), mean_pos(prior_slice_scores)
        scores = {"positive_class": positive_class, "prior_mean": pri_m, "current_mean": cur_m, "delta": cur_m - pri_m}

    timings["total"] = (time.perf_counter() - t0) * 1000
    result = PriorComparison(change=change, lungs=lungs, overall=overall_lungs, new_opacity_ml=new_ml,
                             resolved_opacity_ml=resolved_ml, registration=reg, config=cfg, slice_scores=scores,
                             timings_ms=timings, diff_grid=diff)
    if heatmap_path is not None:
        result.save_heatmap(heatmap_path)
    log.info("prior comparison: %s", result.summary)
    return result


def _plot_difference(diff: np.ndarray, g: float, title: str, path: Path) -> None:
    """Coronal mean projection (superior up, patient right on the left) + axial level of most new opacity."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    coronal = diff.mean(axis=1)[::-1]  # (z, x), z ascending = superior -> flip so superior is up
    new_per_z = np.clip(diff, 0, None).sum(axis=(1, 2))
    z_best = int(np.argmax(new_per_z)) if new_per_z.max() > 0 else diff.shape[0] // 2
    axial = diff[z_best]
    lim = max(float(np.abs(diff).max()), 1e-6)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, img, name, ext in (
        (axes[0], coronal, "coronal mean (superior up)", [0, diff.shape[2] * g, 0, diff.shape[0] * g]),
        (axes[1], axial, f"axial level z={z_best * g:.0f} mm (most new opacity)", [0, diff.shape[2] * g, diff.shape[1] * g, 0]),
    ):
        im = ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim, extent=ext, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("x (mm, patient left ->)")
    fig.colorbar(im, ax=axes, shrink=0.8, label="opacity fraction: current - prior (red new, blue resolved)")
    fig.suptitle(title + "\nResearch use only - not for diagnosis", fontsize=8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
    except OSError as exc:
        raise ResultWriteError(f"{path}: cannot write the prior difference PNG ({exc})") from exc
    finally:
        plt.close(fig)
