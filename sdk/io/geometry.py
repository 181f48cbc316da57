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
        tilt_deg: signed angle between the stack direction and the slice normal (see
            :func:`tilt_from_offsets` for the sign).
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
    return StackGeometry(order, w, a, b, proj[order], tilt_from_offsets(v, w, n))


def tilt_from_offsets(v: np.ndarray, w: np.ndarray, n: np.ndarray) -> float:
    """Signed gantry tilt in degrees from the slice positions (0 for one slice or no offset).

    The in-plane drift per mm along the normal is the least-squares slope ``s`` of the in-plane
    offsets ``v_k - w_k n`` against ``w_k``; the stack direction is ``n + s`` and the tilt is the
    angle between it and the normal, ``atan |s|``. **Sign convention**: positive when ``n x s``
    points to the patient's left (+x in LPS), i.e. the rotation that takes the stack direction to
    the slice normal is right-handed about patient left: for a supine, head-first patient the top
    (anterior edge) of the image plane lies towards the head. It is a property of the geometry,
    independent of how the pixels are stored; GE's GantryDetectorTilt has the same sign on
    ``dcm-qa-ct-ge-tilt`` (+18.5), other vendors may write the opposite sign for the same geometry.
    """
    v = np.asarray(v, dtype=np.float64).reshape(-1, 3)
    w = np.asarray(w, dtype=np.float64)
    den = float(w @ w)
    if v.shape[0] < 2 or den <= 1e-12:
        return 0.0
    inplane = v - w[:, None] * n[None, :]
    s = (w @ inplane) / den
    mag = float(np.degrees(np.arctan(np.linalg.norm(s))))
    sign = -1.0 if float(np.cross(n, s)[0]) < 0 else 1.0
    return sign * mag


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


MAX_SHEAR_GROWTH = 4.0   # refuse a tilt correction whose grid would exceed 4x the slice area


@dataclass(frozen=True)
class ShearGrid:
    """The in-plane grid that holds every shifted slice (nothing pushed out).

    Attributes:
        row0, col0: position of output pixel (0, 0) on the grid of the first slice, in pixels
            (<= 0: the grid grew up / left).
        rows, cols: output slice shape.
    """

    row0: int
    col0: int
    rows: int
    cols: int


def shear_grid(a_px: np.ndarray, b_px: np.ndarray, rows: int, cols: int) -> ShearGrid:
    """Smallest integer-aligned grid holding every input pixel after the shift ``(+b_k, +a_k)``."""
    lo_b = int(np.floor(min(0.0, float(np.min(b_px)))))
    hi_b = int(np.ceil(max(0.0, float(np.max(b_px)))))
    lo_a = int(np.floor(min(0.0, float(np.min(a_px)))))
    hi_a = int(np.ceil(max(0.0, float(np.max(a_px)))))
    return ShearGrid(lo_b, lo_a, rows + hi_b - lo_b, cols + hi_a - lo_a)


def shear_correct(stack: np.ndarray, a_px: np.ndarray, b_px: np.ndarray, fill: float,
                  grid: Optional[ShearGrid] = None) -> np.ndarray:
    """Shift each slice k by (+b_k rows, +a_k cols) onto ``grid`` with linear interpolation (float32).

    ``out[k, j, i] = stack[k, j + grid.row0 - b_k, i + grid.col0 - a_k]`` (see the module docstring);
    with the default grid (:func:`shear_grid`) every input pixel lands inside the output, so the
    correction loses nothing. Output pixels no input slice covers take ``fill`` (air).
    """
    from scipy import ndimage

    g = grid or shear_grid(a_px, b_px, stack.shape[1], stack.shape[2])
    out = np.full((stack.shape[0], g.rows, g.cols), fill, dtype=np.float32)
    for k in range(stack.shape[0]):
        src = stack[k].astype(np.float32, copy=False)
        dy, dx = float(b_px[k]) - g.row0, float(a_px[k]) - g.col0    # input (j, i) -> output (j + dy, i + dx)
        iy, ix = int(round(dy)), int(round(dx))
        if abs(dy - iy) < 1e-6 and abs(dx - ix) < 1e-6 and 0 <= iy and 0 <= ix:
            out[k, iy:iy + src.shape[0], ix:ix + src.shape[1]] = src[: g.rows - iy, : g.cols - ix]
        else:
            ndimage.affine_transform(src, np.ones(2), offset=(-dy, -dx), output_shape=(g.rows, g.cols),
                                     output=out[k], order=1, mode="constant", cval=fill, prefilter=False)
    return out


def _reorient_inplace(arr: np.ndarray, transpose: bool, flip_x: bool, flip_y: bool, flip_z: bool) -> np.ndarray:
    """``arr`` transposed in-plane, then flipped in x, y and z as :func:`canonicalise` does, written
    into its own buffer one slice at a time (scratch: one slice). Returns the reshaped view."""
    n, rows, cols = arr.shape
    out = arr.reshape(n, cols, rows) if transpose else arr     # same bytes: slice k stays at offset k
    if transpose or flip_x or flip_y:
        for k in range(n):
            t = arr[k].T if transpose else arr[k]
            if flip_x:
                t = t[:, ::-1]
            if flip_y:
                t = t[::-1, :]
            out[k] = np.array(t)                                  # read slice k fully, then write it back
    if flip_z:
        for k in range(n // 2):
            tmp = out[k].copy()
            out[k] = out[n - 1 - k]
            out[n - 1 - k] = tmp
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
                 w_mm: np.ndarray, spacing_yx: Tuple[float, float], *, inplace: bool = False) -> Canonical:
    """Flip / transpose an orthogonal (z, y, x) stack towards LPS.

    Input: ``hu[k, j, i]`` sits at ``origin0 + i dx r + j dy c + w_k n`` with ``w`` ascending. For an
    axial-family stack (normal closest to S or I) the in-plane axes are transposed when rows run
    along P/A, and each axis is flipped when it points to R / A / I, so x -> L, y -> P, z -> S. Other
    stacks (coronal, sagittal, oblique) only get their in-plane axes flipped to point to the positive
    side of their dominant LPS axis; they keep their slice axis (the eligibility check flags them).
    ``z_mm`` is the absolute position of each output slice along the output z direction.

    With ``inplace=True`` (and a C-contiguous ``hu``) the flips and the transpose are done slice by
    slice inside ``hu``'s own buffer (one slice of scratch memory instead of a second volume); the
    returned array is then a view of that buffer and ``hu`` must not be used any more.
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
    if inplace and hu.flags.c_contiguous and flips:
        arr = _reorient_inplace(hu, "transpose-xy" in flips, "flip-x" in flips, "flip-y" in flips, "flip-z" in flips)
    return Canonical(np.ascontiguousarray(arr), z_abs, (float(sy), float(sx)),
                     tuple(float(v) for v in org), direction, tuple(flips), z_order)
