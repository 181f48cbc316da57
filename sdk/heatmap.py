"""Class activation heat maps: CAM grid -> slice resolution -> lung-masked PNG overlay.

The classifier's ``cam`` output (docs/conventions.md, rule 5) is exact for the mask-weighted GAP
head: the grid mean of ``cam[k]`` plus the bias is the logit of class ``k``. For a decision
between classes the map shown is the **class-discriminative** CAM of class ``k``:
``cam[k] - mean(cam[j] for j != k)`` (for two classes: the covid-minus-non-covid logit map, whose
grid mean plus the bias difference is the logit of P(covid)).

Up-sampling uses the bilinear rule of the conventions (cell-centre sampling, clamped edges, i.e.
``cv2.resize(..., INTER_LINEAR)`` = ``align_corners=False``). Values outside the lung mask are set
to 0. PNG overlays are an OpenCV colour map (JET) of the positive evidence over the lung-windowed
slice, blended only inside the lungs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from .errors import ConfigError, CtsdkError

PathLike = Union[str, Path]

__all__ = ["discriminative_cam", "upsample_cam", "slice_heatmap", "overlay", "write_png", "window_to_unit"]


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

    g = np.asarray(grey01, dtype=np.float32)
    h = np.asarray(heat, dtype=np.float32)
    if g.shape != h.shape:
        raise ConfigError(f"slice shape {g.shape} differs from heat map shape {h.shape}")
    base = cv2.cvtColor((np.clip(g, 0, 1) * 255.0 + 0.5).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    pos = np.clip(h, 0.0, None)
    top = float(vmax) if vmax is not None else float(pos.max())
    if top <= 0:
        return base
    colour = cv2.applyColorMap((np.clip(pos / top, 0, 1) * 255.0 + 0.5).astype(np.uint8), cv2.COLORMAP_JET)
    blend = cv2.addWeighted(base, 1.0 - alpha, colour, alpha, 0.0)
    region = pos > 0
    if mask is not None:
        region &= np.asarray(mask) > 0
    out = base.copy()
    out[region] = blend[region]
    return out


def write_png(path: PathLike, image: np.ndarray) -> Path:
    """Write a uint8 image as PNG; an OpenCV failure becomes a CtsdkError naming the path."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok = cv2.imwrite(str(path), image)
    if not ok:
        raise CtsdkError(f"{path}: could not write PNG (check the folder is writable)")
    return path
