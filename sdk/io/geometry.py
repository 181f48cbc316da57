"""Slice geometry: orientation labels, stacking, gaps, gantry-tilt shear, canonical LPS axes.

Notation (all in patient LPS mm): ``r`` = row direction (the direction columns/x increase along,
first triplet of ImageOrientationPatient), ``c`` = column direction (y, second triplet), ``n = r x c``
the slice normal, ``P_k`` = ImagePositionPatient of slice k, ``dx``/``dy`` = column / row spacing.

Gantry tilt: the pixel ``(i, j)`` of slice ``k`` lies at ``P_k + i dx r + j dy c``. Write the offset of
each slice from the first as ``v_k = P_k - P_0 = a_k dx r + b_k dy c + w_k n`` with
``a_k = v_k.r / dx``, ``b_k = v_k.c / dy`` (in-plane offsets in pixels) and ``w_k = v_k.n``. Without
tilt ``a_k = b_k = 0``. With tilt the stack direction is not the normal. Pixel ``(i, j)`` of slice ``k`` is at
``P_0 + (i + a_k) dx r + (j + b_k) dy c + w_k n``, so the output pixel ``(i', j')`` of an orthogonal grid
anchored at ``P_0`` takes the input at ``(i' - a_k, j' - b_k)``: shifting slice ``k`` by ``(+b_k, +a_k)``
pixels (``scipy.ndimage.shift``, linear interpolation) puts pixel ``(i', j')`` of every slice at
``P_0 + i' dx r + j' dy c + w_k n``: an orthogonal grid with axes ``(r, c, n)`` and slice positions
``w_k``. The tilt angle is ``atan(|in-plane offset| / w)`` between the stack direction and the normal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

AXES = ("sagittal", "coronal", "axial")   # label of the dominant component of the normal (L, P, S)
OBLIQUE_COS = 0.8                          # |n . axis| below this (> ~37 deg off) -> "oblique"


def orientation_label(iop: Sequence[float]) -> str:
    """'axial' / 'coronal' / 'sagittal' / 'oblique' from an ImageOrientationPatient (6 numbers)."""
    r, c = _unit(iop[:3]), _unit(iop[3:6])
    n = np.cross(r, c)
    k = int(np.argmax(np.abs(n)))
    if abs(n[k]) < OBLIQUE_COS:
        return "oblique"
    return AXES[k]


def _unit(v: Sequence[float]) -> np.ndarray:
    a = np.asarray([float(x) for x in v], dtype=np.float64)
    norm = np.linalg.norm(a)
    return a / norm if norm > 0 else a


def frame(iop: Sequence[float]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit (r, c, n) from ImageOrientationPatient."""
    r, c = _unit(iop[:3]), _unit(iop[3:6])
    n = np.cross(r, c)
    return r, c, n / max(np.linalg.norm(n), 1e-12)


@dataclass(frozen=True)
class StackGeometry:
    """Geometry of an ordered slice stack in its own (r, c, n) frame.

    Attributes:
        order: permutation sorting the input slices by position along the normal (ascending).
        w_mm: position of each sorted slice along n relative to the first (0 for the first).
        a_px, b_px: in-plane offset of each sorted slice relative to the first, in pixels (x, y).
        normal_pos_mm: absolute position ``P_k . n`` of each sorted slice.
        tilt_deg: angle between the stack direction and the slice normal.
    """

    order: np.ndarray
    w_mm: np.ndarray
    a_px: np.ndarray
    b_px: np.ndarray
    normal_pos_mm: np.ndarray
    tilt_deg: float

    @property
    def sheared(self) -> bool:
        """True when slices are offset in-plane by more than 0.05 pixel (tilt to correct)."""
        return bool(np.max(np.abs(self.a_px), initial=0) > 0.05 or np.max(np.abs(self.b_px), initial=0) > 0.05)


def stack_geometry(positions: np.ndarray, iop: Sequence[float], spacing_yx: Tuple[float, float]) -> StackGeometry:
    """Sort slices along the normal and decompose their offsets (see module docstring).

    Args:
        positions: (k, 3) ImagePositionPatient per slice (any order).
        iop: ImageOrientationPatient shared by the slices.
        spacing_yx: (row spacing dy, column spacing dx) in mm.
    """
    r, c, n = frame(iop)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    proj = pos @ n
    order = np.argsort(proj, kind="stable")
    pos = pos[order]
    v = pos - pos[0]
    w = v @ n
    a = (v @ r) / spacing_yx[1]
    b = (v @ c) / spacing_yx[0]
    tilt = 0.0
    if len(pos) > 1 and abs(w[-1]) > 1e-6:
        inplane = np.hypot(a[-1] * spacing_yx[1], b[-1] * spacing_yx[0])
        tilt = float(np.degrees(np.arctan2(inplane, abs(w[-1]))))
    return StackGeometry(order, w, a, b, proj[order], tilt)


def find_gaps(z_mm: np.ndarray, thickness_mm: Optional[Sequence[Optional[float]]] = None,
              factor: float = 1.5) -> List[Tuple[int, float, float]]:
    """Gaps that mean missing slices: ``(index before the gap, gap mm, threshold mm)``.

    A gap between slices k and k+1 is a missing-slice gap when it exceeds ``factor`` x the reference
    spacing, the reference being the larger of the median spacing and the thinner of the two
    slices' SliceThickness (so a series whose protocol changes from 4 mm to 7 mm slices half-way,
    like the GE tilt sample, is uneven but not missing anything).
    """
    z = np.asarray(z_mm, dtype=np.float64)
    if z.size < 3:
        return []
    d = np.diff(z)
    med = float(np.median(d))
    gaps = []
    for k, gap in enumerate(d):
        ref = med
        if thickness_mm is not None:
            t0, t1 = thickness_mm[k], thickness_mm[k + 1]
            if t0 and t1:
                ref = max(ref, min(float(t0), float(t1)))
        if gap > factor * ref:
            gaps.append((k, float(gap), float(factor * ref)))
    return gaps


def shear_correct(stack: np.ndarray, a_px: np.ndarray, b_px: np.ndarray, fill: float) -> np.ndarray:
    """Shift each slice k by (+b_k rows, +a_k cols) with linear interpolation (float32 out).

    ``out[k, j, i] = stack[k, j - b_k, i - a_k]`` (see the module docstring).

    Pixels shifted in from outside the slice take ``fill`` (the slice minimum, i.e. air).
    """
    from scipy import ndimage

    out = np.empty(stack.shape, dtype=np.float32)
    for k in range(stack.shape[0]):
        src = stack[k].astype(np.float32, copy=False)
        if abs(a_px[k]) < 1e-6 and abs(b_px[k]) < 1e-6:
            out[k] = src
        else:
            ndimage.shift(src, (b_px[k], a_px[k]), output=out[k], order=1, mode="constant", cval=fill,
                          prefilter=False)
    return out


@dataclass(frozen=True)
class Canonical:
    """Result of :func:`canonicalise`: the re-ordered array and its geometry."""

    hu: np.ndarray
    z_mm: np.ndarray
    pixel_spacing_mm: Tuple[float, float]
    origin: Tuple[float, float, float]
    direction: np.ndarray
    flips: Tuple[str, ...]
    z_order: np.ndarray  # index into the input slices for each output slice


def canonicalise(hu: np.ndarray, origin0: np.ndarray, r: np.ndarray, c: np.ndarray, n: np.ndarray,
                 w_mm: np.ndarray, spacing_yx: Tuple[float, float]) -> Canonical:
    """Flip / transpose an orthogonal (z, y, x) stack towards LPS.

    Input: ``hu[k, j, i]`` sits at ``origin0 + i dx r + j dy c + w_k n`` with ``w`` ascending. For an
    axial-family stack (normal closest to S or I) the in-plane axes are transposed when rows run
    along P/A, and each axis is flipped when it points to R / A / I, so x -> L, y -> P, z -> S. Other
    stacks (coronal, sagittal, oblique) only get their in-plane axes flipped to point to the positive
    side of their dominant LPS axis; they keep their slice axis (the eligibility check flags them).
    ``z_mm`` is the absolute position of each output slice along the output z direction.
    """
    dy, dx = spacing_yx
    flips: List[str] = []
    ex, ey, ez = r.copy(), c.copy(), n.copy()
    sx, sy = dx, dy
    arr = hu
    w = np.asarray(w_mm, dtype=np.float64)
    org = np.asarray(origin0, dtype=np.float64).copy()
    z_order = np.arange(arr.shape[0])
    axial = int(np.argmax(np.abs(n))) == 2
    if axial and abs(r[1]) > abs(r[0]):
        # rows run along P/A: swap x and y
        arr = arr.transpose(0, 2, 1)
        ex, ey = ey, ex
        sx, sy = sy, sx
        flips.append("transpose-xy")
    target_x = 0 if axial else int(np.argmax(np.abs(ex)))
    target_y = 1 if axial else int(np.argmax(np.abs(ey)))
    if ex[target_x] < 0:
        org = org + (arr.shape[2] - 1) * sx * ex
        ex = -ex
        arr = arr[:, :, ::-1]
        flips.append("flip-x")
    if ey[target_y] < 0:
        org = org + (arr.shape[1] - 1) * sy * ey
        ey = -ey
        arr = arr[:, ::-1, :]
        flips.append("flip-y")
    if axial and ez[2] < 0:
        org = org + w[-1] * ez
        w = w[-1] - w[::-1]
        ez = -ez
        arr = arr[::-1]
        z_order = z_order[::-1]
        flips.append("flip-z")
    z_abs = float(org @ ez) + w
    direction = np.stack([ex, ey, ez], axis=1) + 0.0   # + 0.0 turns -0.0 into 0.0
    return Canonical(np.ascontiguousarray(arr), z_abs, (float(sy), float(sx)),
                     tuple(float(v) for v in org), direction, tuple(flips), z_order)
