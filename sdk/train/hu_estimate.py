"""Estimate the grey -> HU mapping of an 8-bit CT image from its anatomy, and re-render it in HU.

The 2D training images are 8-bit exports with unknown windows; at triage the classifier sees HU
windowed by our own code. Each image's window is estimated from two tissue peaks that every chest
slice has, then the image is mapped back to (approximate) HU and rendered through the runtime's
own resize + window (:func:`render_hu_image`):

- **lung parenchyma**: the mode of the grey values inside the lung mask (U-Net mask, eroded) ->
  ``LUNG_HU`` (about -850 HU; the mode, not the mean, so that opacities do not drag it);
- **soft tissue**: the mode of the grey values outside the lungs that are brighter than the lung
  peak by at least a quarter of the remaining range and not saturated -> ``SOFT_HU`` (chest wall
  muscle / fat / mediastinum blend, about 0 HU);
- **air outside the body**, when the window shows it unsaturated (a separate dark peak below the
  lung peak) -> ``AIR_HU`` (-1000 HU) as a third point of a least-squares line.

A linear map ``HU = a * grey + b`` (grey in [0, 1]) is fitted through the peaks. Images where a
peak cannot be found, is saturated (the lung peak at 0: a mediastinal window), or the fitted
window is implausible are **dropped** with a reason (:class:`HuEstimate.reason`).

The estimate is validated on real DICOM slices rendered to 8-bit with random windows
(:func:`validate_on_dicom`, docs/training.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "LUNG_HU",
    "SOFT_HU",
    "AIR_HU",
    "HuEstimate",
    "estimate_hu_map",
    "grey_to_hu",
    "render_8bit",
    "letterbox_hu",
    "render_hu_image",
    "validate_on_dicom",
]

#: anchor values (HU) of the peaks; physical values, not fitted to the validation data
LUNG_HU = -850.0
SOFT_HU = 0.0
AIR_HU = -1000.0
#: plausible range of an estimated window width (HU spanned by grey 0..1)
WIDTH_RANGE = (500.0, 4000.0)


@dataclass(frozen=True)
class HuEstimate:
    """``HU = slope * grey + intercept`` (grey in [0, 1]) or ``ok=False`` with the reason."""

    ok: bool
    slope: float = float("nan")
    intercept: float = float("nan")
    g_lung: float = float("nan")
    g_soft: float = float("nan")
    g_air: Optional[float] = None
    reason: str = ""

    @property
    def window(self) -> Tuple[float, float]:
        """The HU that grey 0 and grey 1 stand for."""
        return (self.intercept, self.intercept + self.slope)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _mode(values: np.ndarray, lo: float, hi: float, bins: int = 128, smooth: int = 5) -> Tuple[float, float]:
    """(mode, peak share) of ``values`` in [lo, hi] from a box-smoothed histogram."""
    h, edges = np.histogram(values, bins=bins, range=(lo, hi))
    if h.sum() == 0:
        return float("nan"), 0.0
    k = np.ones(smooth) / smooth
    hs = np.convolve(h.astype(np.float64), k, mode="same")
    i = int(np.argmax(hs))
    return float(0.5 * (edges[i] + edges[i + 1])), float(hs[i] * smooth / h.sum())


def _erode(mask: np.ndarray, it: int) -> np.ndarray:
    import cv2

    m = (np.asarray(mask) > 0).astype(np.uint8)
    return cv2.erode(m, np.ones((3, 3), np.uint8), iterations=it) > 0 if it > 0 else m > 0


def estimate_hu_map(grey: np.ndarray, lung_mask: np.ndarray, *, min_lung_fraction: float = 0.02) -> HuEstimate:
    """Estimate ``HU = slope * grey + intercept`` of one 8-bit image (grey in [0, 1], native size)
    from its lung mask (same shape). See the module docstring for the rule."""
    g = np.asarray(grey, dtype=np.float32)
    m = np.asarray(lung_mask) > 0
    if g.shape != m.shape:
        return HuEstimate(False, reason=f"mask {m.shape} != image {g.shape}")
    if m.mean() < min_lung_fraction:
        return HuEstimate(False, reason=f"lung mask covers {m.mean():.3f} < {min_lung_fraction} of the image")
    sat = 1.5 / 255.0
    inner = _erode(m, max(1, int(round(min(g.shape) / 100))))
    lung_vals = g[inner if inner.sum() >= 50 else m]
    g_lung, _ = _mode(lung_vals, 0.0, 1.0)
    if not np.isfinite(g_lung) or g_lung <= 2 * sat or g_lung >= 1 - 2 * sat:
        return HuEstimate(False, g_lung=g_lung, reason="lung peak saturated (not a lung window)")
    rest = g[~_dilate(m, 3)]
    lo_soft = g_lung + 0.25 * (1.0 - g_lung)
    soft_vals = rest[(rest > lo_soft) & (rest < 1.0 - sat)]
    if soft_vals.size < 0.01 * g.size:
        return HuEstimate(False, g_lung=g_lung, reason="no soft-tissue peak (too few unsaturated pixels brighter than lung)")
    g_soft, _ = _mode(soft_vals, lo_soft, 1.0 - sat)
    pts = [(g_lung, LUNG_HU), (g_soft, SOFT_HU)]
    g_air: Optional[float] = None
    dark = rest[(rest > sat) & (rest < g_lung - 0.04)]
    if dark.size >= 0.02 * g.size:
        cand, share = _mode(dark, sat, g_lung - 0.04)
        # a genuine air peak sits where the lung/soft line puts about -1000 HU
        a2 = (SOFT_HU - LUNG_HU) / (g_soft - g_lung)
        hu_cand = LUNG_HU + a2 * (cand - g_lung)
        if np.isfinite(cand) and share > 0.05 and AIR_HU - 150.0 <= hu_cand <= AIR_HU + 80.0:
            g_air = cand
            pts.append((g_air, AIR_HU))
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    slope, intercept = np.polyfit(x, y, 1)
    width = float(slope)
    if not (WIDTH_RANGE[0] <= width <= WIDTH_RANGE[1]):
        return HuEstimate(False, slope, intercept, g_lung, g_soft, g_air, reason=f"implausible window width {width:.0f} HU")
    return HuEstimate(True, float(slope), float(intercept), g_lung, g_soft, g_air)


def _dilate(mask: np.ndarray, it: int) -> np.ndarray:
    import cv2

    return cv2.dilate((np.asarray(mask) > 0).astype(np.uint8), np.ones((3, 3), np.uint8), iterations=it) > 0


def grey_to_hu(grey: np.ndarray, est: HuEstimate) -> np.ndarray:
    """Apply the estimated map (float32 HU). Saturated grey stays at the window's edge HU."""
    return (np.asarray(grey, np.float32) * np.float32(est.slope) + np.float32(est.intercept)).astype(np.float32)


def render_8bit(hu: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    """An 8-bit export of HU in ``window`` (lo, hi) -> grey in [0, 1] quantised to 1/255."""
    lo, hi = window
    g = np.clip((np.asarray(hu, np.float64) - lo) / (hi - lo), 0.0, 1.0)
    return (np.round(g * 255.0) / 255.0).astype(np.float32)


def letterbox_hu(hu: np.ndarray, mask: np.ndarray, fill_hu: float = -1000.0) -> Tuple[np.ndarray, np.ndarray]:
    """Pad a non-square HU image (and its mask) to a square with air, centred (no resampling)."""
    h, w = hu.shape
    n = max(h, w)
    out = np.full((n, n), fill_hu, np.float32)
    om = np.zeros((n, n), np.uint8)
    y0, x0 = (n - h) // 2, (n - w) // 2
    out[y0:y0 + h, x0:x0 + w] = hu
    om[y0:y0 + h, x0:x0 + w] = (np.asarray(mask) > 0)
    return out, om


def render_hu_image(grey: np.ndarray, mask: np.ndarray, est: HuEstimate, size: int = 224) -> Tuple[np.ndarray, np.ndarray]:
    """An 8-bit training image -> (HU (S, S) float32, mask (S, S) uint8) at classifier resolution,
    through the runtime's rules: grey -> estimated HU, letterboxed with air to a square, then
    ``sdk.volume.resample.resize_slices`` (bilinear, the rule of ``classifier_inputs``) and the
    runtime's nearest indices for the mask. Window it with ``sdk.train.real_slices.render_inputs``."""
    from ..volume.resample import nearest_indices, resize_slices

    hu, m = letterbox_hu(grey_to_hu(grey, est), mask)
    r = resize_slices(hu[None], (size, size))[0].astype(np.float32)
    ny, nx = nearest_indices(m.shape[0], size), nearest_indices(m.shape[1], size)
    return r, m[ny][:, nx].astype(np.uint8)


def validate_on_dicom(slices: Sequence[Tuple[str, np.ndarray, np.ndarray]], *, n_windows: int = 5, seed: int = 0,
                      width_range: Tuple[float, float] = (1000.0, 2000.0),
                      level_range: Tuple[float, float] = (-800.0, -400.0),
                      mask_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> Dict[str, Any]:
    """Render real HU slices to 8-bit with random lung windows, estimate the map back, and measure
    the HU error.

    ``slices``: (series name, HU (H, W), lung mask (H, W) or None); a None mask is made by
    ``mask_fn(grey)`` from the rendered 8-bit image (the 2D U-Net, as for training images). Per (slice, window): the mean absolute
    HU error of the estimated map over the slice's pixels that the window does not saturate, and
    the error at -850 HU and at 0 HU. Returns per-case records and the median / p95 summaries.
    """
    rng = np.random.default_rng(seed)
    cases: List[Dict[str, Any]] = []
    for name, hu, mask in slices:
        for _ in range(n_windows):
            w = float(rng.uniform(*width_range))
            lvl = float(rng.uniform(*level_range))
            win = (lvl - w / 2, lvl + w / 2)
            g = render_8bit(hu, win)
            est = estimate_hu_map(g, mask if mask is not None else mask_fn(g))
            rec: Dict[str, Any] = {"series": name, "window": [round(win[0], 1), round(win[1], 1)], "ok": est.ok, "reason": est.reason}
            if est.ok:
                inside = (g > 0) & (g < 1)
                true_hu = np.asarray(hu, np.float64)[inside]
                est_hu = grey_to_hu(g[inside], est).astype(np.float64)
                true_slope = win[1] - win[0]
                rec.update({
                    "mae_hu": float(np.mean(np.abs(est_hu - true_hu))),
                    "err_at_-850": float((-850 - win[0]) / true_slope * est.slope + est.intercept + 850),
                    "err_at_0": float((0 - win[0]) / true_slope * est.slope + est.intercept),
                    "est_window": [round(v, 1) for v in est.window],
                })
            cases.append(rec)
    ok = [c for c in cases if c["ok"]]

    def summary(key: str) -> Dict[str, float]:
        v = np.abs(np.array([c[key] for c in ok], np.float64))
        return {"median": float(np.median(v)), "p95": float(np.percentile(v, 95)), "max": float(v.max())} if v.size else {}

    return {"n": len(cases), "n_ok": len(ok), "dropped": len(cases) - len(ok),
            "mae_hu": summary("mae_hu"), "abs_err_at_-850": summary("err_at_-850"), "abs_err_at_0": summary("err_at_0"),
            "width_range": list(width_range), "level_range": list(level_range), "seed": seed, "cases": cases}
