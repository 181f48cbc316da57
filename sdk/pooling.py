"""NumPy references of the lung-mask-weighted global average pooling (paper 000) and its CAM.

docs/conventions.md, "Lung-mask-weighted GAP":

1. mask (N, 1, H, W) in [0, 1] -> feature grid (h, w) by area averaging;
2. 3×3 Gaussian, sigma 1, normalised to sum 1, zero padding;
3. normalise to sum 1 per sample; a sum below 1e-6 (empty mask) gives uniform ``1 / (h·w)``;
4. ``p[n, c] = sum_yx f[n, c, y, x] · w[n, y, x]``;
5. ``cam[n, k, y, x] = sum_c W[k, c] · f[n, c, y, x] · w[n, y, x] · (h·w)``.

The CUDA kernels ``kernels/mask_weights.cu`` and ``kernels/masked_gap.cu`` are tested against
these. Arithmetic is float64; outputs are float32.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from .errors import ConfigError
from .volume.resample import apply_taps, axis_taps, uniform_axis

__all__ = ["EMPTY_MASK_SUM", "gaussian_kernel3", "area_pool", "mask_weights", "masked_gap", "cam"]

#: Below this smoothed-mask sum a sample counts as empty and gets uniform weights.
EMPTY_MASK_SUM = 1e-6


def gaussian_kernel3(sigma: float = 1.0) -> np.ndarray:
    """3×3 kernel ``exp(-(dx² + dy²) / (2 sigma²))`` normalised to sum 1 (float64)."""
    d = np.arange(-1, 2, dtype=np.float64)
    g = np.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2.0 * sigma * sigma))
    return g / g.sum()


def _as_nchw(x: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[1] != 1:
        raise ConfigError(f"{what}: expected (N, 1, H, W) or (N, H, W), not shape {np.shape(x)}")
    if 0 in a.shape:
        raise ConfigError(f"{what}: empty array of shape {a.shape}")
    return a


def area_pool(mask: np.ndarray, grid_hw: Tuple[int, int]) -> np.ndarray:
    """Area-average (N, 1, H, W) -> (N, 1, h, w) (float64; exact fractional-overlap box filter)."""
    m = _as_nchw(mask, "area_pool")
    h, w = (int(v) for v in grid_hw)
    if h < 1 or w < 1:
        raise ConfigError(f"area_pool: grid_hw must be positive, not {tuple(grid_hw)}")
    x = apply_taps(m, 3, axis_taps(uniform_axis(m.shape[3], w), "area"))
    return apply_taps(x, 2, axis_taps(uniform_axis(m.shape[2], h), "area"))


def _smooth3(x: np.ndarray) -> np.ndarray:
    """3×3 Gaussian (sigma 1) over the last two axes with zero padding."""
    g = gaussian_kernel3()
    h, w = x.shape[-2:]
    p = np.zeros(x.shape[:-2] + (h + 2, w + 2), dtype=np.float64)
    p[..., 1:-1, 1:-1] = x
    out = np.zeros(x.shape, dtype=np.float64)
    for dy in range(3):
        for dx in range(3):
            out += g[dy, dx] * p[..., dy:dy + h, dx:dx + w]
    return out


def mask_weights(mask: np.ndarray, grid_hw: Sequence[int] = (7, 7)) -> np.ndarray:
    """Pooling weights (N, 1, h, w) float32 from a lung mask (N, 1, H, W) in [0, 1].

    Area-average to the feature grid, 3×3 Gaussian (sigma 1, zero padding), normalise to sum 1;
    an (almost) empty mask gives uniform weights.
    """
    h, w = (int(v) for v in grid_hw)
    s = _smooth3(area_pool(mask, (h, w)))
    total = s.sum(axis=(2, 3), keepdims=True)
    empty = total < EMPTY_MASK_SUM
    out = np.where(empty, 1.0 / (h * w), s / np.where(empty, 1.0, total))
    return out.astype(np.float32)


def _check_pair(features: np.ndarray, weights: np.ndarray, what: str) -> Tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features)
    wts = _as_nchw(weights, what)
    if f.ndim != 4:
        raise ConfigError(f"{what}: features must be (N, C, h, w), not shape {f.shape}")
    if (f.shape[0],) + f.shape[2:] != (wts.shape[0],) + wts.shape[2:]:
        raise ConfigError(
            f"{what}: features {f.shape} and weights {wts.shape} disagree on N or the (h, w) grid"
        )
    return f, wts


def masked_gap(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``p[n, c] = sum_yx f[n, c, y, x] · w[n, 0, y, x]`` -> (N, C) float32 (float64 accumulation)."""
    f, wts = _check_pair(features, weights, "masked_gap")
    p = np.einsum("nchw,nhw->nc", f.astype(np.float64), wts[:, 0].astype(np.float64))
    return p.astype(np.float32)


def cam(
    features: np.ndarray,
    weights: np.ndarray,
    fc_weight: np.ndarray,
    fc_bias: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Class activation maps (N, K, h, w) float32 whose grid mean plus the bias is the logit.

    ``cam[n, k] = sum_c W[k, c] · f[n, c] · w[n] · (h·w)``; ``fc_bias`` is accepted for symmetry
    with the classifier head and is not added to the map (add it to the mean to get the logit).
    """
    f, wts = _check_pair(features, weights, "cam")
    W = np.asarray(fc_weight, dtype=np.float64)
    if W.ndim != 2 or W.shape[1] != f.shape[1]:
        raise ConfigError(f"cam: fc_weight must be (K, C={f.shape[1]}), not shape {W.shape}")
    if fc_bias is not None and np.shape(fc_bias) != (W.shape[0],):
        raise ConfigError(f"cam: fc_bias must be (K={W.shape[0]},), not shape {np.shape(fc_bias)}")
    hw = f.shape[2] * f.shape[3]
    weighted = f.astype(np.float64) * wts.astype(np.float64) * hw
    return np.einsum("kc,nchw->nkhw", W, weighted).astype(np.float32)
