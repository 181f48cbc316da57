"""Real CT slices for parity checks (export, FP16, INT8): never random when real data exists.

Sources, in order of preference:

1. HU slices of the COVID-CT-MD series in ``../shared/data/dicom/covid-ct-md`` read with
   :func:`sdk.io.load_series` and turned into classifier inputs with
   :func:`sdk.volume.resample.classifier_inputs` (window and nearest-mask rules of
   docs/conventions.md), lung mask from HU (see :func:`hu_lung_mask`);
2. the 8-bit slices listed in ``../shared/data/images_index.csv`` (grey = pixel / 255, resized
   bilinearly, mask from :func:`grey_lung_mask`);
3. uniform random values, only when neither exists (the report's ``source`` says so).

Masks here only have to look like lungs (the parity check compares two implementations of the
same network on the same input); training/calibration use the classifier's own cached masks.
"""
from __future__ import annotations

import csv
import functools
import logging
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..paths import shared_data_root  # re-exported: the one owner of the data folder

log = logging.getLogger("sdk.export")


def _fill_holes(m: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.binary_fill_holes(m)


def grey_lung_mask(grey: np.ndarray) -> np.ndarray:
    """Rough lung mask of one (H, W) grey slice in [0, 1]: dark pixels inside the body.

    Body = largest bright component (Otsu threshold) with holes filled; lungs = dark pixels inside
    it, opened, keeping the two largest components.
    """
    from scipy import ndimage as ndi

    g = np.asarray(grey, np.float32)
    hist, edges = np.histogram(g, bins=64, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    thr = float(centres[np.argmax(w0 * w1 * (m0 - m1) ** 2)])
    bright = g > thr
    lab, n = ndi.label(bright)
    if n == 0:
        return np.zeros(g.shape, np.uint8)
    sizes = ndi.sum(bright, lab, range(1, n + 1))
    body = _fill_holes(lab == (1 + int(np.argmax(sizes))))
    lungs = ndi.binary_opening(body & ~bright, iterations=2)
    lab, n = ndi.label(lungs)
    if n > 2:
        sizes = ndi.sum(lungs, lab, range(1, n + 1))
        keep = 1 + np.argsort(sizes)[-2:]
        lungs = np.isin(lab, keep)
    return _fill_holes(lungs).astype(np.uint8)


def hu_lung_mask(hu: np.ndarray) -> np.ndarray:
    """Rough per-slice lung mask of a (z, y, x) HU volume: air (< -400 HU) inside the body."""
    from scipy import ndimage as ndi

    out = np.zeros(hu.shape, np.uint8)
    for k, s in enumerate(np.asarray(hu)):
        body = _fill_holes(ndi.binary_opening(s > -400, iterations=2))
        lab, n = ndi.label(body)
        if n == 0:
            continue
        sizes = ndi.sum(body, lab, range(1, n + 1))
        body = _fill_holes(lab == (1 + int(np.argmax(sizes))))
        out[k] = ndi.binary_opening(body & (s < -400), iterations=2)
    return out


def _series_inputs(n: int, size: int) -> Optional[np.ndarray]:
    """Classifier inputs from the COVID-CT-MD HU series (None when sdk.io / the data is missing)."""
    root = shared_data_root() / "dicom" / "covid-ct-md"
    try:
        from ..io import load_series  # type: ignore[attr-defined]
        from ..volume.resample import classifier_inputs
    except (ImportError, AttributeError):
        return None
    series = [p for p in sorted(root.glob("*")) if p.is_dir() and p.name != "labels"]
    if not series:
        return None
    per = max(1, -(-n // len(series)))
    parts: List[np.ndarray] = []
    for folder in series:
        try:
            vol = load_series(str(folder))
        except Exception as exc:  # reader still being written by its owner: fall back, say so
            log.warning("parity samples: cannot read %s (%s); using 2D images", folder, exc)
            return None
        hu = np.asarray(vol.hu)
        # slices evenly spread over the middle 60 % of the scan (where the lungs are), masks only there
        lo, hi = int(0.2 * len(hu)), max(int(0.8 * len(hu)) - 1, int(0.2 * len(hu)))
        idx = np.unique(np.linspace(lo, hi, per).round().astype(int))
        mask = np.zeros(hu.shape, np.uint8)
        mask[idx] = hu_lung_mask(hu[idx])
        parts.append(classifier_inputs(hu, mask, idx, size=size))
    return np.concatenate(parts)[:n]


def index_rows(csv_path: Optional[Path] = None) -> List[dict]:
    """Rows of ``images_index.csv`` (path resolved against the CSV's folder)."""
    path = csv_path or shared_data_root() / "images_index.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["abs_path"] = str((path.parent / r["path"]).resolve())
    return rows


def load_grey(path: str, size: int) -> np.ndarray:
    """An 8-bit image file as (size, size) float32 grey in [0, 1] (bilinear, cell-centre grid)."""
    import cv2

    img = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if img is None:
        from ..errors import ConfigError

        raise ConfigError(f"{path}: not a readable image")
    interp = cv2.INTER_AREA if min(img.shape) > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp).astype(np.float32) / 255.0


def three_channel(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W) grey + mask -> (3, H, W): grey, mask, grey x mask (paper 001)."""
    m = (np.asarray(mask) != 0).astype(np.float32)
    return np.stack([grey, m, grey * m]).astype(np.float32)


def _image_inputs(n: int, cin: int, size: int) -> Optional[np.ndarray]:
    rows = index_rows()
    if not rows:
        return None
    rng = np.random.default_rng(0)
    pick = rng.choice(len(rows), size=min(n, len(rows)), replace=False)
    out = []
    for i in sorted(pick):
        g = load_grey(rows[i]["abs_path"], size)
        out.append(three_channel(g, grey_lung_mask(g)) if cin == 3 else np.repeat(g[None], cin, 0))
    return np.stack(out)


def parity_inputs(n: int, cin: int, spatial: Sequence[int]) -> Tuple[np.ndarray, str]:
    """``(x, source)``: ``n`` real inputs of shape ``(cin, *spatial)`` in [0, 1], and where they came
    from (cached per process: the FP32 and FP16 checks of one export see the same slices)."""
    x, source = _parity_inputs(int(n), int(cin), tuple(int(s) for s in spatial))
    return x.copy(), source


@functools.lru_cache(maxsize=4)
def _parity_inputs(n: int, cin: int, spatial: Tuple[int, ...]) -> Tuple[np.ndarray, str]:
    square2d = len(spatial) == 2 and spatial[0] == spatial[1]
    if square2d and cin == 3:
        x = _series_inputs(n, spatial[0])
        if x is not None and len(x):
            return x.astype(np.float32), "covid-ct-md HU slices (sdk.io + classifier_inputs, HU lung mask)"
    if square2d and cin in (1, 3):
        x = _image_inputs(n, cin, spatial[0])
        if x is not None and len(x):
            return x, "images_index.csv 8-bit slices (grey/255, Otsu lung mask)"
    rng = np.random.default_rng(0)
    log.warning("parity samples: no real data for input (%d, %s); using random values", cin, spatial)
    return rng.random((n, cin, *spatial), dtype=np.float32), "uniform random (no real data found)"


__all__ = ["grey_lung_mask", "hu_lung_mask", "index_rows", "load_grey", "parity_inputs", "shared_data_root", "three_channel"]
