"""Class activation heat maps: CAM grid -> slice resolution -> lung-masked PNG overlay.

The classifier's ``cam`` output (docs/conventions.md, rule 5) is exact for the mask-weighted GAP
head: the grid mean of ``cam[k]`` plus the bias is the logit of class ``k``. For a decision
between classes the map shown is the **class-discriminative** CAM of class ``k``:
``cam[k] - mean(cam[j] for j != k)`` (for two classes: the covid-minus-non-covid logit map, whose
grid mean plus the bias difference is the logit of P(covid)).

Up-sampling uses the bilinear rule of the conventions (cell-centre sampling, clamped edges, i.e.
``cv2.resize(..., INTER_LINEAR)`` = ``align_corners=False``). Values outside the lung mask are set
to 0. PNG overlays are an OpenCV colour map (JET) of the positive evidence over the lung-windowed
slice, blended only inside the lungs, with a weight ``min(1, 1.6 alpha) * sqrt(heat / vmax)`` that
grows with the evidence (weak evidence stays see-through, strong evidence is solid).

**Reading panel** (:func:`reading_panel`, what ``TriageResult.save_heatmaps`` writes): a title
line (slice index, z in mm, the slice's P(covid), the series label), the CAM overlay, the HU
opacity overlay beside it (ground glass yellow, consolidation red, :mod:`sdk.opacity`) and a
colour bar for the CAM in its units (logit contribution per pixel). The CAM scale is one per
series and robust: the 99th percentile of the positive evidence inside the lungs over all
selected slices (:func:`robust_scale`), so a few hot pixels do not wash every other slice out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from .errors import ConfigError, ResultWriteError

PathLike = Union[str, Path]

__all__ = ["check_alpha", "discriminative_cam", "upsample_cam", "slice_heatmap", "overlay", "write_png", "window_to_unit",
           "robust_scale", "opacity_overlay", "colour_bar", "reading_panel", "GGO_BGR", "CONSOLIDATION_BGR"]

GGO_BGR = (0, 215, 255)            # yellow-orange
CONSOLIDATION_BGR = (40, 40, 230)  # red


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """``alpha`` as a float when it is a number from 0 to 1 (the colour map's weight), else
    ConfigError naming it (NaN, inf, a negative or a string would blend garbage or fail in NumPy)."""
    import math
    import numbers

    ok = isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and math.isfinite(alpha) and 0.0 <= alpha <= 1.0
    if not ok:
        raise ConfigError(f"{name} must be a number from 0 (no colour) to 1 (full weight), got {alpha!r} "
                          f"({type(alpha).__name__})")
    return float(alpha)


def discriminative_cam(cam: np.ndarray, k: int) -> np.ndarray:
    """(K, h, w) CAM -> (h, w) evidence for class ``k`` against the mean of the others."""
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 3:
        raise ConfigError(f"CAM must be (K, h, w), got shape {cam.shape}")
    n_classes = cam.shape[0]
    if not 0 <= k < n_classes:
        raise ConfigError(f"class index {k} out of range for a {n_classes}-class CAM")
    if n_classes == 1:
        return cam[0]
    others = np.delete(cam, k, axis=0).mean(axis=0)
    return cam[k] - others


def upsample_cam(grid: np.ndarray, out_hw: Tuple[int, int]) -> np.ndarray:
    """Bilinear (align_corners=False) up-sampling of an (h, w) grid to (H, W), float32."""
    import cv2

    g = np.asarray(grid, dtype=np.float32)
    if g.ndim != 2:
        raise ConfigError(f"CAM grid must be 2-D, got shape {g.shape}")
    h_out, w_out = int(out_hw[0]), int(out_hw[1])
    return cv2.resize(g, (w_out, h_out), interpolation=cv2.INTER_LINEAR)


def slice_heatmap(cam: np.ndarray, k: int, mask: Optional[np.ndarray], out_hw: Tuple[int, int]) -> np.ndarray:
    """Class-discriminative CAM of class ``k`` up-sampled to ``out_hw`` and zeroed outside ``mask``."""
    heat = upsample_cam(discriminative_cam(cam, k), out_hw)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != heat.shape:
            raise ConfigError(f"lung mask shape {m.shape} differs from the heat map's {heat.shape}")
        heat = np.where(m > 0, heat, np.float32(0.0)).astype(np.float32)
    return heat


def window_to_unit(hu: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    """``clip((HU - lo) / (hi - lo), 0, 1)`` as float32 (docs/conventions.md)."""
    lo, hi = float(window[0]), float(window[1])
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)


def overlay(
    grey01: np.ndarray,
    heat: np.ndarray,
    mask: Optional[np.ndarray] = None,
    *,
    vmax: Optional[float] = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """BGR uint8 image: JET colour map of ``max(heat, 0) / vmax`` blended over the grey slice.

    Args:
        grey01: (H, W) slice in [0, 1] (lung window).
        heat: (H, W) heat map (e.g. from :func:`slice_heatmap`).
        mask: blend only where mask > 0 (None: everywhere heat > 0).
        vmax: value mapped to the top of the colour map (default: the slice's max positive heat;
            pass one value for a series so slices are comparable).
        alpha: weight of the colour map.
    """
    import cv2

    alpha = check_alpha(alpha)
    g = np.asarray(grey01, dtype=np.float32)
    h = np.asarray(heat, dtype=np.float32)
    if g.shape != h.shape:
        raise ConfigError(f"slice shape {g.shape} differs from heat map shape {h.shape}")
    base = cv2.cvtColor((np.clip(g, 0, 1) * 255.0 + 0.5).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    pos = np.clip(h, 0.0, None)
    top = float(vmax) if vmax is not None else float(pos.max())
    if top <= 0:
        return base
    unit = np.clip(pos / top, 0, 1)
    colour = cv2.applyColorMap((unit * 255.0 + 0.5).astype(np.uint8), cv2.COLORMAP_JET)
    region = pos > 0
    if mask is not None:
        region &= np.asarray(mask) > 0
    # weight grows with the evidence (square root): near 0 for faint evidence, min(1, 1.6 alpha) at the top
    w = (min(1.0, 1.6 * alpha) * np.sqrt(unit))[..., None]
    blend = (base.astype(np.float32) * (1.0 - w) + colour.astype(np.float32) * w + 0.5).astype(np.uint8)
    out = base.copy()
    out[region] = blend[region]
    return out


def robust_scale(heats: "list[np.ndarray]", masks: "list[np.ndarray]", q: float = 99.0) -> Optional[float]:
    """The ``q``-th percentile of the positive heat inside the masks over all slices (None if none)."""
    vals = [np.asarray(h)[(np.asarray(m) > 0) & (np.asarray(h) > 0)] for h, m in zip(heats, masks)]
    vals = [v for v in vals if v.size]
    if not vals:
        return None
    top = float(np.percentile(np.concatenate(vals), q))
    return top if top > 0 else None


def opacity_overlay(grey01: np.ndarray, labels: np.ndarray, mask: Optional[np.ndarray] = None, alpha: float = 0.6) -> np.ndarray:
    """BGR image: ground glass (label 1) yellow, consolidation (label 2) red over the grey slice,
    plus the lung outline (thin green) when a mask is given."""
    import cv2

    alpha = check_alpha(alpha)
    g = np.asarray(grey01, dtype=np.float32)
    base = cv2.cvtColor((np.clip(g, 0, 1) * 255.0 + 0.5).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    out = base.astype(np.float32)
    lab = np.asarray(labels)
    for v, bgr in ((1, GGO_BGR), (2, CONSOLIDATION_BGR)):
        m = lab == v
        out[m] = out[m] * (1 - alpha) + np.asarray(bgr, np.float32) * alpha
    out = (out + 0.5).astype(np.uint8)
    if mask is not None:
        contours, _ = cv2.findContours((np.asarray(mask) > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, (80, 200, 80), 1)
    return out


def colour_bar(height: int, vmax: float, width: int = 110, unit: str = "logit/px") -> np.ndarray:
    """BGR strip: the JET scale from 0 (bottom) to ``vmax`` (top) with 5 labelled ticks and the unit."""
    import cv2

    top, bottom = 40, 30
    bar = np.full((height, width, 3), 24, np.uint8)
    n = max(2, height - top - bottom)
    ramp = np.linspace(255, 0, n).astype(np.uint8)[:, None]
    bar[top:top + n, 8:30] = cv2.applyColorMap(np.repeat(ramp, 22, axis=1), cv2.COLORMAP_JET)
    for k in range(5):
        y = top + int(round((n - 1) * (1 - k / 4)))
        cv2.line(bar, (30, y), (36, y), (230, 230, 230), 1)
        cv2.putText(bar, f"{vmax * k / 4:.2f}", (39, y + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (230, 230, 230), 1, cv2.LINE_AA)
    cv2.putText(bar, "CAM", (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (230, 230, 230), 1, cv2.LINE_AA)
    cv2.putText(bar, unit, (6, 32), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (230, 230, 230), 1, cv2.LINE_AA)
    cv2.putText(bar, "(>0 only)", (6, height - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (200, 200, 200), 1, cv2.LINE_AA)
    return bar


def _label(img: np.ndarray, text: str, org: Tuple[int, int], colour: Tuple[int, int, int], scale: float = 0.55) -> None:
    """Text on a dark box (readable over any background)."""
    import cv2

    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x, y = org
    cv2.rectangle(img, (x - 3, y - h - 4), (x + w + 3, y + base + 2), (24, 24, 24), -1)
    cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def reading_panel(cam_bgr: np.ndarray, opacity_bgr: Optional[np.ndarray], vmax: Optional[float], title: str,
                  opacity_note: str = "") -> np.ndarray:
    """Title line over [CAM overlay | opacity overlay | colour bar] (BGR uint8).

    The panels are scaled to at least 384 px high so the text stays readable on small slices.
    """
    import cv2

    h, w = cam_bgr.shape[:2]
    scale = max(1.0, 384.0 / h)
    def fit(img: np.ndarray) -> np.ndarray:
        return img if scale == 1.0 else cv2.resize(img, (int(round(img.shape[1] * scale)), int(round(img.shape[0] * scale))),
                                                   interpolation=cv2.INTER_NEAREST)
    left = fit(cam_bgr)
    hh, ww = left.shape[:2]
    _label(left, "CAM: evidence for covid", (8, 20), (255, 255, 255))
    parts = [left]
    if opacity_bgr is not None:
        right = fit(opacity_bgr)
        _label(right, "HU opacity:", (8, 20), (255, 255, 255))
        _label(right, "ground glass", (8, 44), GGO_BGR)
        _label(right, "consolidation", (8, 68), CONSOLIDATION_BGR)
        if opacity_note:
            _label(right, opacity_note, (8, hh - 10), (255, 255, 255), 0.5)
        parts += [np.full((hh, 4, 3), 24, np.uint8), right]
    parts.append(colour_bar(hh, vmax if vmax else 0.0))
    body = np.hstack(parts)
    head = np.full((34, body.shape[1], 3), 24, np.uint8)
    cv2.putText(head, title, (8, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.62, (255, 255, 255), 1, cv2.LINE_AA)
    return np.vstack([head, body])


def write_png(path: PathLike, image: np.ndarray) -> Path:
    """Write a uint8 image as PNG; a folder that cannot be made or an OpenCV failure becomes a
    ResultWriteError (a CtsdkError) naming the path."""
    import cv2

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultWriteError(f"{path}: could not write PNG: cannot make its folder {path.parent} "
                               f"({exc.strerror or exc}); give a folder you can create and write to") from exc
    ok = cv2.imwrite(str(path), image)
    if not ok:
        raise ResultWriteError(f"{path}: could not write PNG (check the folder is writable)")
    return path
