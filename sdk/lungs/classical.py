"""Classical 3D lung segmentation (no weights; NumPy / SciPy / OpenCV), after paper 003's recipe.

Steps, at a reduced in-plane resolution (``work_size`` pixels, area down-sampling; z untouched):

1. **Threshold** air-like voxels: ``HU < threshold_hu`` (-320).
2. **Body / outside air**: 3D connected components of the air mask; a component touching the
   in-plane (y / x) border of any slice is outside air and is removed (the z ends are open: the
   lungs and trachea run off the top and bottom of a chest scan).
3. **Candidates**: the largest remaining components; small ones (bowel gas, table holes, noise)
   are dropped: only the largest component and a second one at least ``second_fraction`` of it
   are kept.
4. **Airways**: the trachea is found in the top (superior) slices as the small component near the
   midline; it is grown in 3D inside the candidates through very dark voxels (``HU < airway_hu``)
   and removed with the main bronchi when the grown region stays small (no leak into
   emphysematous lung), otherwise only the trachea slices above the lung apices are removed.
5. **Left / right**: two large components are the lungs; a single component (lungs touching at
   the anterior junction) is split by erosion until it separates, or else along the midline of
   each slice. ``x`` increases towards the patient's Left (docs/conventions.md).
6. **Morphology**: 3D closing and per-slice hole filling, so vessels and nodules inside the lung
   stay lung.
7. Back to the native grid: bilinear up-sampling of each lung's mask, threshold 0.5.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage as ndi

from ..errors import ConfigError

LEFT, RIGHT = 1, 2


@dataclass(frozen=True)
class ClassicalConfig:
    """Parameters of the classical segmenter (HU, mm, pixels)."""

    threshold_hu: float = -320.0
    airway_hu: float = -900.0
    work_size: int = 128            # in-plane working resolution (pixels); <= native
    min_lung_ml: float = 30.0       # a lung candidate smaller than this is noise
    second_fraction: float = 0.15   # second component kept as the other lung if >= this x largest
    trachea_max_mm2: float = 900.0  # cross-section of a trachea-only top slice
    airway_max_ml: float = 120.0    # a grown airway tree larger than this has leaked into lung
    closing_mm: float = 4.0


#: ``(hu (z, H, W), (h, w)) -> (z, h, w) float32``: in-plane down-sampling of the working grid
Downsample = Callable[[np.ndarray, Tuple[int, int]], np.ndarray]


#: threads of the per-slice lung steps (down- and up-sampling, the left/right split, the native mask
#: and its counts in sdk.lungs); 2: the cores this product is measured on
SLICE_THREADS = 2


def _per_slice(run: Callable[[List[int]], None], todo: List[int]) -> None:
    """``run(part)`` over interleaved parts of the slice indices ``todo`` on SLICE_THREADS
    threads (:func:`sdk.pools.shared_pool` "slices"; OpenCV, SciPy and NumPy's loops release the GIL).
    Each slice belongs to one part, so the result does not depend on the split; few slices run
    in the caller."""
    parts = [todo[i::SLICE_THREADS] for i in range(SLICE_THREADS)] if len(todo) > 8 else [todo]
    if len(parts) == 1:
        run(parts[0])
        return
    from ..pools import shared_pool

    list(shared_pool("slices").map(run, parts))


def _downsample(hu: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(z, H, W) -> (z, h, w) float32 by area averaging per slice (cv2.INTER_AREA), slices on
    :func:`_per_slice` threads."""
    import cv2

    z, h0, w0 = hu.shape
    h, w = size
    if (h, w) == (h0, w0):
        return hu.astype(np.float32)
    out = np.empty((z, h, w), np.float32)

    def run(part: List[int]) -> None:
        plane = np.empty((h0, w0), np.float32)   # per-worker buffer: no 1 MB temporary per slice
        for k in part:
            np.copyto(plane, hu[k], casting="unsafe")
            out[k] = cv2.resize(plane, (w, h), interpolation=cv2.INTER_AREA)

    _per_slice(run, list(range(z)))
    return out


def _upsample_labels(labels: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(z, h, w) label map (0/LEFT/RIGHT) -> (z, H, W): bilinear interpolation of each lung's 0/1
    mask, threshold 0.5 (LEFT wins ties)."""
    import cv2

    z, h, w = labels.shape
    H, W = size
    if (h, w) == (H, W):
        return labels.copy()
    out = np.zeros((z, H, W), np.uint8)
    todo = [k for k in range(z) if labels[k].any()]

    def run(part: List[int]) -> None:
        small = np.empty((h, w), np.float32)   # per-worker buffers: no 1 MB temporaries per slice
        big = np.empty((H, W), np.float32)
        hit = np.empty((H, W), bool)
        for k in part:
            for lab in (RIGHT, LEFT):
                np.equal(labels[k], lab, out=small, casting="unsafe")
                if small.any():
                    cv2.resize(small, (W, H), dst=big, interpolation=cv2.INTER_LINEAR)
                    np.greater(big, 0.5, out=hit)
                    np.copyto(out[k], lab, where=hit)

    _per_slice(run, todo)
    return out


def _ball(radius_vox: Tuple[float, float, float]) -> np.ndarray:
    """Ellipsoidal structuring element with the given radii in voxels (per axis)."""
    r = [max(0, int(round(v))) for v in radius_vox]
    zz, yy, xx = np.ogrid[-r[0] : r[0] + 1, -r[1] : r[1] + 1, -r[2] : r[2] + 1]
    d = np.zeros((2 * r[0] + 1, 2 * r[1] + 1, 2 * r[2] + 1))
    for c, ri in zip((zz, yy, xx), r):
        if ri > 0:
            d = d + (c / ri) ** 2
    return d <= 1.0


def _interior_air(air: np.ndarray) -> np.ndarray:
    """Air not connected (in 3D) to the in-plane border of any slice."""
    lab, n = ndi.label(air)
    if n == 0:
        return air
    border = np.zeros(n + 1, bool)
    for edge in (lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]):
        border[np.unique(edge)] = True
    border[0] = True
    return ~border[lab] & air


def _largest_components(mask: np.ndarray, voxel_ml: float, cfg: ClassicalConfig) -> np.ndarray:
    """Keep the largest component and a second one if large enough; returns a 0/1/2 label map.
    Labelled within the mask's bounding box (the same components, numbered in the same raster
    order, as labelling the whole volume)."""
    box = _bbox(mask, margin=0)
    if box is None:
        return np.zeros(mask.shape, np.uint8)
    lab, n = ndi.label(mask[box])
    sizes = np.bincount(lab.ravel())[1:] * voxel_ml
    order = np.argsort(sizes)[::-1]
    out = np.zeros(mask.shape, np.uint8)
    if sizes[order[0]] < cfg.min_lung_ml:
        return out
    sub = out[box]
    sub[lab == order[0] + 1] = 1
    if n > 1 and sizes[order[1]] >= max(cfg.min_lung_ml, cfg.second_fraction * sizes[order[0]]):
        sub[lab == order[1] + 1] = 2
    return out


def _remove_airways(cand: np.ndarray, hu: np.ndarray, px_mm2: float, voxel_ml: float, cfg: ClassicalConfig) -> Tuple[np.ndarray, Dict[str, float]]:
    """Remove trachea + main bronchi from the candidate mask (see module docstring, step 4)."""
    info: Dict[str, float] = {"airway_removed_ml": 0.0, "airway_mode": 0.0}
    area = cand.reshape(cand.shape[0], -1).sum(1) * px_mm2
    nz = np.nonzero(area)[0]
    if nz.size == 0:
        return cand, info
    top = int(nz[-1])  # most superior slice with candidate voxels
    # trachea-only slices: walk down from the top while the cross-section stays small and single
    k = top
    seed = None
    while k >= nz[0]:
        lab, n = ndi.label(cand[k])
        if n == 0 or area[k] > cfg.trachea_max_mm2 or n > 2:
            break
        seed = (k,) + tuple(int(round(c)) for c in ndi.center_of_mass(lab == 1))
        k -= 1
    if seed is None:
        return cand, info
    dark = cand & (hu < cfg.airway_hu)
    lab, _ = ndi.label(dark)
    sid = lab[seed] if dark[seed] else 0
    if sid == 0:  # seed not dark (partial volume): grow from any dark voxel of the top slices
        ids = np.unique(lab[k + 1 : top + 1])
        ids = ids[ids > 0]
        sid = int(ids[0]) if ids.size else 0
    out = cand.copy()
    if sid:
        tree = lab == sid
        ml = float(tree.sum() * voxel_ml)
        if ml <= cfg.airway_max_ml:
            # one dilation step within the tree's bounding box + 1 voxel: nothing farther can change
            box = _bbox(tree, margin=1)
            grown = np.zeros(tree.shape, bool)
            grown[box] = ndi.binary_dilation(tree[box], iterations=1)
            tree = grown & cand
            out &= ~tree
            info.update(airway_removed_ml=float(tree.sum() * voxel_ml), airway_mode=1.0)
            return out, info
    out[k + 1 : top + 1] = False  # leak or no dark core: drop the trachea-only slices only
    info.update(airway_removed_ml=float((cand.sum() - out.sum()) * voxel_ml), airway_mode=2.0)
    return out, info


def _erode_in_plane(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_erosion(mask, structure=np.ones((1, 3, 3)))`` (border value 0) in one OpenCV
    call (:func:`stacked_2d`: no slice sees its neighbour, every slice edge erodes as SciPy's zero
    border does)."""
    return stacked_2d(np.asarray(mask, dtype=np.uint8), np.ones((3, 3), np.uint8), erode=True).astype(bool)


def _label_2d(plane: np.ndarray) -> Tuple[np.ndarray, int]:
    """4-connected components of one 2D mask (``ndi.label``'s default structure) with OpenCV;
    component numbers may differ from SciPy's, the partition is the same."""
    import cv2

    n, lab = cv2.connectedComponents(plane.astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    return lab, int(n) - 1


def _split_left_right(lung: np.ndarray, max_erosions: int = 6) -> np.ndarray:
    """Split one connected two-lung mask into labels LEFT / RIGHT (x increases to patient Left)."""
    total = lung.sum()
    seeds = None
    er = lung.copy()
    for _ in range(max_erosions):
        er = _erode_in_plane(er)
        lab, n = ndi.label(er)
        if n >= 2:
            sizes = np.bincount(lab.ravel())[1:]
            o = np.argsort(sizes)[::-1]
            if sizes[o[1]] >= 0.1 * sizes[o[0]] and sizes[o[1]] > 0.02 * total:
                seeds = (lab == o[0] + 1, lab == o[1] + 1)
                break
    out = np.zeros(lung.shape, np.uint8)
    if seeds is not None:
        # per slice: a 2D component touching one seed takes its side; one touching both (the
        # junction) or none is split pixel-wise by the nearest seed pixel (2D distance transform)
        seed_lab = np.zeros(lung.shape, np.uint8)
        seed_lab[seeds[0]], seed_lab[seeds[1]] = 1, 2
        a = np.zeros(lung.shape, bool)
        b = np.zeros(lung.shape, bool)
        xs = np.arange(lung.shape[2])
        seed_cx = tuple(float((seeds[j].sum(axis=(0, 1)) * xs).sum() / max(seeds[j].sum(), 1)) for j in (0, 1))

        def run(part: List[int]) -> None:
            for k in part:
                _split_slice(lung[k], seed_lab[k], seed_cx, a[k], b[k])

        _per_slice(run, [k for k in range(lung.shape[0]) if lung[k].any()])
    else:  # per-slice cut at the mask's x centroid
        xs = np.arange(lung.shape[2])
        cx = float((lung.sum(axis=(0, 1)) * xs).sum() / max(total, 1))
        a = lung & (xs[None, None, :] < cx)
        b = lung & (xs[None, None, :] >= cx)
    xs = np.arange(lung.shape[2])
    ca = (a.sum(axis=(0, 1)) * xs).sum() / max(a.sum(), 1)
    cb = (b.sum(axis=(0, 1)) * xs).sum() / max(b.sum(), 1)
    left, right = (a, b) if ca > cb else (b, a)
    out[left], out[right] = LEFT, RIGHT
    return out


def _split_slice(lung: np.ndarray, seed_lab: np.ndarray, seed_cx: Tuple[float, float], a: np.ndarray,
                 b: np.ndarray) -> None:
    """One slice of :func:`_split_left_right`, written into ``a`` / ``b``: a 2D component touching
    one seed takes its side; one touching both (the junction) or none is split pixel-wise by the
    nearest seed pixel (2D distance transform), or by the seeds' x centroids ``seed_cx`` when the
    slice has no seed pixel."""
    lab2, n2 = _label_2d(lung)
    hits = np.bincount(lab2.ravel() * 3 + seed_lab.ravel(), minlength=(n2 + 1) * 3).reshape(n2 + 1, 3)
    only_a = (hits[:, 1] > 0) & (hits[:, 2] == 0)
    only_b = (hits[:, 2] > 0) & (hits[:, 1] == 0)
    only_a[0] = only_b[0] = False
    a[...] = only_a[lab2]
    b[...] = only_b[lab2]
    mixed = lung & ~a & ~b
    if not mixed.any():
        return
    if seed_lab.any():
        _, idx = ndi.distance_transform_edt(seed_lab == 0, return_indices=True)
        near = seed_lab[idx[0], idx[1]]
    else:
        xs = np.arange(lung.shape[1])
        ca, cb = seed_cx
        near = np.where(np.abs(xs - ca) < np.abs(xs - cb), 1, 2)[None, :].repeat(lung.shape[0], 0)
    a |= mixed & (near == 1)
    b |= mixed & (near == 2)


def _assign_left_right(two: np.ndarray) -> np.ndarray:
    """0/1/2 component map -> LEFT/RIGHT labels by x centroid (x increases to patient Left)."""
    xs = np.arange(two.shape[2])
    c = [float(((two == k).sum(axis=(0, 1)) * xs).sum() / max((two == k).sum(), 1)) for k in (1, 2)]
    out = np.zeros_like(two)
    left = 1 if c[0] > c[1] else 2
    out[two == left] = LEFT
    out[(two > 0) & (two != left)] = RIGHT
    return out


def _bbox(mask: np.ndarray, margin: int = 2) -> Optional[Tuple[slice, ...]]:
    """Bounding box of a mask, grown by ``margin`` voxels (None when empty)."""
    if not mask.any():
        return None
    box = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        idx = np.nonzero(mask.any(axis=other))[0]
        box.append(slice(max(0, int(idx[0]) - margin), min(mask.shape[ax], int(idx[-1]) + margin + 1)))
    return tuple(box)


#: 2D 4-connectivity in every slice, no connection across slices
_PLANE_CROSS = np.zeros((3, 3, 3), bool)
_PLANE_CROSS[1] = ndi.generate_binary_structure(2, 1)


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_fill_holes`` of every (y, x) slice, in one labelling pass.

    Identical to the per-slice call (background components in 4-connectivity that do not touch
    the slice's border are holes), but one ``ndi.label`` of the whole stack replaces the
    iterated dilations of ``binary_fill_holes`` (the slow part of the lung finishing steps).
    """
    mask = np.asarray(mask, bool)
    bg = ~mask
    lab, n = ndi.label(bg, structure=_PLANE_CROSS)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, bool)
    for edge in (lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]):
        outside[edge] = True
    outside[0] = True
    return mask | ~outside[lab]


@dataclass(frozen=True)
class WorkGrid:
    """The reduced in-plane grid the 3D steps run on."""

    native: Tuple[int, int, int]     # (z, H, W)
    h: int
    w: int
    spacing: Tuple[float, float, float]   # (dz, sy, sx) of the working grid, mm

    @property
    def px_mm2(self) -> float:
        return self.spacing[1] * self.spacing[2]

    @property
    def voxel_ml(self) -> float:
        return self.spacing[0] * self.spacing[1] * self.spacing[2] / 1000.0


def work_grid(shape: Tuple[int, int, int], spacing_zyx: Tuple[float, float, float], work_size: int) -> WorkGrid:
    """In-plane down-sampling so the larger side is ``work_size`` (never up-sampling)."""
    z, H, W = shape
    f = max(1.0, max(H, W) / work_size)
    h, w = max(1, int(round(H / f))), max(1, int(round(W / f)))
    dz, dy, dx = spacing_zyx
    return WorkGrid((z, H, W), h, w, (float(dz), dy * H / h, dx * W / w))


def lung_candidates(
    hu: np.ndarray, spacing_zyx: Tuple[float, float, float], cfg: ClassicalConfig, timings: Optional[Dict[str, float]] = None,
    downsample: Optional[Downsample] = None,
) -> Tuple[np.ndarray, np.ndarray, WorkGrid, Dict[str, float]]:
    """Steps 1-4 at the working grid: returns (small HU, candidate mask, grid, info).

    ``downsample(hu, (h, w)) -> (z, h, w) float32 HU`` replaces the per-slice OpenCV area
    down-sampling (the kernel path passes ctsdk's resample kernel, area rule, z unchanged)."""
    hu = np.asarray(hu)
    if hu.ndim != 3 or min(hu.shape) == 0:
        raise ConfigError(f"classical lung segmentation needs a non-empty (z, y, x) HU array, got shape {hu.shape}")
    t0 = time.perf_counter()
    grid = work_grid(hu.shape, spacing_zyx, cfg.work_size)
    small = (downsample or _downsample)(hu, (grid.h, grid.w))
    t1 = time.perf_counter()
    inner = _interior_air(small < cfg.threshold_hu)
    t2 = time.perf_counter()
    cand = _largest_components(inner, grid.voxel_ml, cfg) > 0
    cand, info = _remove_airways(cand, small, grid.px_mm2, grid.voxel_ml, cfg)
    t3 = time.perf_counter()
    if timings is not None:
        timings.update(downsample_ms=(t1 - t0) * 1e3, outside_air_ms=(t2 - t1) * 1e3, candidates_airways_ms=(t3 - t2) * 1e3)
    info.update(work_shape_z=float(grid.native[0]), work_h=float(grid.h), work_w=float(grid.w))
    return small, cand, grid, info


def finish_lungs(
    mask_small: np.ndarray, grid: WorkGrid, cfg: ClassicalConfig, timings: Optional[Dict[str, float]] = None
) -> Tuple[np.ndarray, int]:
    """Steps 3 and 5-7 on a working-grid mask: two largest components, left / right, closing,
    per-slice hole filling, bilinear up-sampling. Returns (native labels, n_components)."""
    t0 = time.perf_counter()
    two = _largest_components(mask_small, grid.voxel_ml, cfg)
    labels_small = np.zeros(two.shape, np.uint8)
    box = _bbox(two > 0, margin=3)
    if box is not None:
        sub = two[box]
        labels_small[box] = _assign_left_right(sub) if (sub == 2).any() else _split_left_right(sub == 1)
    t1 = time.perf_counter()
    dz, sy, sx = grid.spacing
    ball = _ball((cfg.closing_mm / dz, cfg.closing_mm / sy, cfg.closing_mm / sx))
    lab_out = np.zeros(labels_small.shape, np.uint8)
    if box is not None:
        sub_out = lab_out[box]
        closed = _close_sides(labels_small[box], ball)
        for k in (LEFT, RIGHT):  # left first: where the closed lungs overlap, left keeps the voxel
            if closed.get(k) is not None:
                sub_out[closed[k] & (sub_out == 0)] = k
    t2 = time.perf_counter()
    labels = _upsample_labels(lab_out, grid.native[1:])
    t3 = time.perf_counter()
    if timings is not None:
        timings.update(left_right_ms=(t1 - t0) * 1e3, morphology_ms=(t2 - t1) * 1e3, upsample_ms=(t3 - t2) * 1e3)
    return labels, int(two.max())


def stacked_2d(vol: np.ndarray, kernel: np.ndarray, erode: bool) -> np.ndarray:
    """2D dilation (or erosion, border value 0) of every (y, x) slice of a uint8 0/1 stack by
    ``kernel``, in one OpenCV call: the slices are stacked into one tall image with zero rows
    between them (at least the kernel's half height), so no slice reaches its neighbour."""
    import cv2

    nz, ny, nx = vol.shape
    sep = max(1, kernel.shape[0] // 2)
    tall = np.zeros((nz, ny + sep, nx), np.uint8)
    tall[:, :ny] = vol
    flat = tall.reshape(nz * (ny + sep), nx)
    if erode:
        res = cv2.erode(flat, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    else:
        res = cv2.dilate(flat, kernel)
    return res.reshape(nz, ny + sep, nx)[:, :ny]


def _binary_closing_ball(mask: np.ndarray, ball: np.ndarray) -> np.ndarray:
    """``ndi.binary_closing(mask, structure=ball)`` (border value 0) for a structuring element
    that is symmetric with odd sides (:func:`_ball`), as per-slice OpenCV morphology.

    A 3D dilation by the ball is the union over its z offsets ``dz`` of the 2D dilation of slice
    ``z + dz`` by the ball's section at ``dz``; the erosion is the intersection of the 2D erosions,
    where a section that falls outside the stack erodes to 0 (SciPy's border value 0). The same
    voxels as SciPy (tests), ~3x faster on a lung's box.
    """
    m8 = np.ascontiguousarray(mask, dtype=np.uint8)
    nz, rz = m8.shape[0], ball.shape[0] // 2
    sections = [np.ascontiguousarray(ball[i], dtype=np.uint8) for i in range(ball.shape[0])]
    dil = np.zeros(m8.shape, np.uint8)
    for i, k in enumerate(sections):
        dz = i - rz
        lo, hi = max(0, -dz), min(nz, nz - dz)
        if lo < hi and k.any():
            dil[lo:hi] |= stacked_2d(m8[lo + dz:hi + dz], k, erode=False)
    out = np.ones(m8.shape, np.uint8)
    for i, k in enumerate(sections):
        if not k.any():
            continue
        dz = i - rz
        lo, hi = max(0, -dz), min(nz, nz - dz)
        out[:lo] = 0
        out[hi:] = 0
        if lo < hi:
            out[lo:hi] &= stacked_2d(dil[lo + dz:hi + dz], k, erode=True)
    return out.astype(bool)


def _close_side(m: np.ndarray, ball: np.ndarray) -> np.ndarray:
    """3D closing of one lung by ``ball`` (zero-padded so the closing sees no border), then
    per-slice hole filling."""
    pad = [(int(b // 2),) * 2 for b in ball.shape]
    mc = _binary_closing_ball(np.pad(m, pad), ball)[tuple(slice(p[0], p[0] + n) for p, n in zip(pad, m.shape))]
    return _fill_holes_per_slice(mc)


def _close_sides(labels: np.ndarray, ball: np.ndarray) -> Dict[int, Optional[np.ndarray]]:
    """:func:`_close_side` of the LEFT and RIGHT lungs of ``labels`` (None for an absent side).
    The two closings are independent and SciPy's morphology releases the GIL, so the left lung
    is closed on a helper thread (:func:`sdk.pools.shared_pool` "lungs") while this thread closes
    the right one: the same masks, ~40 % less wall time on 2 cores."""
    masks = {k: labels == k for k in (LEFT, RIGHT)}
    todo = [k for k in (LEFT, RIGHT) if masks[k].any()]
    out: Dict[int, Optional[np.ndarray]] = {k: None for k in (LEFT, RIGHT)}
    if len(todo) == 2:
        from ..pools import shared_pool

        pending = shared_pool("lungs").submit(_close_side, masks[todo[0]], ball)
        out[todo[1]] = _close_side(masks[todo[1]], ball)
        out[todo[0]] = pending.result()
    else:
        for k in todo:
            out[k] = _close_side(masks[k], ball)
    return out


def segment_classical_hu(
    hu: np.ndarray,
    spacing_zyx: Tuple[float, float, float],
    cfg: Optional[ClassicalConfig] = None,
    timings: Optional[Dict[str, float]] = None,
    downsample: Optional[Downsample] = None,
) -> Tuple[np.ndarray, Dict[str, float]]:
    """Classical lung segmentation of a (z, y, x) HU array (``downsample``: see :func:`lung_candidates`).

    Args:
        hu: (z, y, x) HU.
        spacing_zyx: voxel spacing in mm (z may be the median of an uneven axis).
        cfg: parameters; defaults to :class:`ClassicalConfig`.
        timings: optional dict receiving per-step milliseconds.

    Returns:
        (labels, info): ``labels`` (z, y, x) uint8 at the native grid (0 background,
        1 = left lung, 2 = right lung); ``info`` numbers describing the run.
    """
    cfg = cfg or ClassicalConfig()
    _, cand, grid, info = lung_candidates(hu, spacing_zyx, cfg, timings, downsample)
    labels, n = finish_lungs(cand, grid, cfg, timings)
    info["n_components"] = float(n)
    return labels, info


def segment_classical_2d(grey01: np.ndarray, threshold: Optional[float] = None, min_frac: float = 0.005) -> np.ndarray:
    """Honest 2D variant for 8-bit images without HU: Otsu threshold + the same morphology.

    Dark pixels (below Otsu's threshold, or ``threshold`` on the [0, 1] scale) not connected to
    the image border are lung candidates; the two largest components (each >= ``min_frac`` of
    the image) are kept, closed and hole-filled. Returns (N, H, W) uint8 masks.
    """
    import cv2

    g = np.asarray(grey01, dtype=np.float32)
    if g.ndim == 2:
        g = g[None]
    out = np.zeros(g.shape, np.uint8)
    for i, img in enumerate(g):
        u8 = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
        u8 = cv2.GaussianBlur(u8, (3, 3), 0)
        if threshold is None:
            thr, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        else:
            thr = threshold * 255.0
        air = u8 < thr
        inner = _interior_air(air[None])[0]
        lab, n = ndi.label(inner)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())[1:]
        keep = [j + 1 for j in np.argsort(sizes)[::-1][:2] if sizes[j] >= min_frac * img.size]
        m = np.isin(lab, keep)
        m = cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))) > 0
        out[i] = ndi.binary_fill_holes(m)
    return out
