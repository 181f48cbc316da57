"""Lung segmentation: classical 3D (no weights) and a learned 2D U-Net (ONNX Runtime).

    from sdk.lungs import segment, segment_slices_2d
    seg = segment(volume)                     # method="auto": the measured default
    seg.mask, seg.labels, seg.lung_volume_ml, seg.timings_ms
    masks = segment_slices_2d(grey01, session)   # (N, H, W) [0, 1] images -> (N, H, W) uint8

Both methods return a mask at the volume's native grid, split into left / right lungs (labels
``1 = left``, ``2 = right``; x increases towards the patient's Left). The default method is
chosen by measured Dice (docs/segmentation.md); the other stays selectable. Everything here is
torch-free: the learned path runs the exported ONNX graph.
"""
from __future__ import annotations

import os
import time
import warnings as _warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ..errors import BundleError, ConfigError, MissingDependencyError
from ..preprocessing import Preprocessing
from .classical import LEFT, RIGHT, ClassicalConfig, segment_classical_2d, segment_classical_hu
from .unet2d import DEFAULT_ONNX, open_session, segment_slices_2d

__all__ = [
    "LungSegmentation",
    "segment",
    "segment_slices_2d",
    "segment_classical_hu",
    "segment_classical_2d",
    "ClassicalConfig",
    "slice_thickness_mm",
    "METHODS",
    "DEFAULT_METHOD",
    "LEFT",
    "RIGHT",
]

METHODS = ("auto", "classical", "unet2d", "hybrid", "unet3d", "hybrid3d")
#: method used by ``method="auto"`` (chosen by Dice on diseased lungs, docs/segmentation.md)
DEFAULT_METHOD = "hybrid"


@dataclass(frozen=True)
class LungSegmentation:
    """Result of :func:`segment`.

    Attributes:
        mask: (z, y, x) bool, both lungs, at the volume's native grid.
        labels: (z, y, x) uint8, 0 background, 1 left lung, 2 right lung (None if not split).
        lung_volume_ml: volume of ``mask`` in millilitres (per-slice thickness from ``z_mm``).
        left_volume_ml / right_volume_ml: per lung (None without ``labels``).
        method: the method that ran ("classical" or "unet2d").
        timings_ms: per-step wall times in milliseconds, ``total`` included.
        z_range: (first, last) slice index containing lung, or None when the mask is empty.
        warnings: fallbacks and oddities (e.g. auto fell back to classical, and why).
        info: numbers describing the run (working resolution, airway removal, ...).
        slice_voxels: (z,) int64 lung voxels per slice (``mask`` counted per slice; None when the
            segmenter did not count them) - slice selection uses it instead of counting again.
    """

    mask: np.ndarray
    labels: Optional[np.ndarray]
    lung_volume_ml: float
    left_volume_ml: Optional[float]
    right_volume_ml: Optional[float]
    method: str
    timings_ms: Dict[str, float]
    z_range: Optional[Tuple[int, int]]
    warnings: Tuple[str, ...] = ()
    info: Dict[str, float] = field(default_factory=dict)
    slice_voxels: Optional[np.ndarray] = None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe summary (no arrays)."""
        return {
            "method": self.method,
            "lung_volume_ml": round(self.lung_volume_ml, 1),
            "left_volume_ml": None if self.left_volume_ml is None else round(self.left_volume_ml, 1),
            "right_volume_ml": None if self.right_volume_ml is None else round(self.right_volume_ml, 1),
            "z_range": None if self.z_range is None else list(self.z_range),
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
            "warnings": list(self.warnings),
        }


def slice_thickness_mm(z_mm: np.ndarray, fallback: float = 1.0) -> np.ndarray:
    """Per-slice z footprint (mm): between the midpoints to the neighbours; the end slices extend
    half the median spacing outwards. Works for uneven z."""
    z = np.asarray(z_mm, dtype=np.float64)
    if z.size == 1:
        return np.array([fallback])
    d = np.diff(z)
    half = np.median(d) / 2.0
    lo = np.concatenate([[z[0] - half], (z[:-1] + z[1:]) / 2.0])
    hi = np.concatenate([(z[:-1] + z[1:]) / 2.0, [z[-1] + half]])
    return hi - lo


def _volume_ml(counts: np.ndarray, z_mm: np.ndarray, pixel_spacing_mm: Tuple[float, float], fallback_dz: float) -> float:
    """Millilitres from per-slice voxel counts (``counts[k]`` voxels in slice k)."""
    area_mm2 = counts * float(pixel_spacing_mm[0]) * float(pixel_spacing_mm[1])
    return float((area_mm2 * slice_thickness_mm(z_mm, fallback_dz)).sum() / 1000.0)


def _mask_and_counts(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(``labels > 0``, per-slice LEFT counts, per-slice RIGHT counts) in one pass over each slice,
    slices on two threads (:func:`sdk.lungs.classical._per_slice`; NumPy's loops release the GIL)."""
    from .classical import _per_slice

    flat = labels.reshape(labels.shape[0], -1)
    mask = np.zeros(labels.shape, bool)
    mflat = mask.reshape(labels.shape[0], -1)
    left = np.zeros(labels.shape[0], np.int64)
    right = np.zeros(labels.shape[0], np.int64)

    def run(part: List[int]) -> None:
        hit = np.empty(flat.shape[1], bool)        # one buffer per worker; compare + count are SIMD loops
        for k in part:                             # (np.bincount widens every slice to intp: 5x slower)
            np.greater(flat[k], 0, out=mflat[k])
            np.equal(flat[k], LEFT, out=hit)
            left[k] = np.count_nonzero(hit)
            np.equal(flat[k], RIGHT, out=hit)
            right[k] = np.count_nonzero(hit)

    _per_slice(run, [int(k) for k in np.nonzero(flat.any(axis=1))[0]])
    return mask, left, right


def _session_for(session: Any, onnx_path: Optional[Union[str, os.PathLike]]) -> Any:
    """``session``, or the process's cached 2D U-Net session of ``onnx_path`` (default :data:`DEFAULT_ONNX`)."""
    from ..runtime.base import session_or_cached

    return session_or_cached(session, onnx_path, DEFAULT_ONNX, open_session, "lungs2d")


def _body_z_range(hu: np.ndarray, margin: int = 2) -> Optional[Tuple[int, int]]:
    """Cheap z range of the largest air region inside the body (lungs + airways), on a strided
    in-plane subsample (every 4th pixel of a 512 matrix)."""
    from scipy import ndimage as ndi

    from .classical import _interior_air

    step = max(1, min(hu.shape[1:]) // 128)
    inner = _interior_air(hu[:, ::step, ::step] < -320)
    lab, n = ndi.label(inner)
    if n == 0:
        return None
    sizes = np.bincount(lab.ravel())[1:]
    zs = np.nonzero((lab == int(np.argmax(sizes)) + 1).any(axis=(1, 2)))[0]
    return max(0, int(zs[0]) - margin), min(hu.shape[0] - 1, int(zs[-1]) + margin)


#: the U-Net runs on slices about this far apart (mm); logits in between are interpolated in z
NET_Z_STEP_MM = 4.0
#: hybrid: the U-Net may add lung only within this in-plane distance (mm) of the classical
#: candidates (dense lung next to aerated lung; chosen on cip-ct64, see docs/segmentation.md)
HYBRID_REACH_MM = 20.0


def _net_slices(z_mm: np.ndarray, z0: int, z1: int, step_mm: float) -> np.ndarray:
    """Indices in [z0, z1] at least ``step_mm`` apart (both ends included)."""
    keep = [z0]
    for k in range(z0 + 1, z1 + 1):
        if z_mm[k] - z_mm[keep[-1]] >= step_mm - 1e-6:
            keep.append(k)
    if keep[-1] != z1:
        keep.append(z1)
    return np.asarray(keep)


def _learned_small(volume: Any, zr: Tuple[int, int], session: Any, grid: Any, timings: Dict[str, float],
                   step_mm: Optional[float] = None, pre: Optional[Preprocessing] = None) -> Tuple[np.ndarray, int]:
    """U-Net lung mask on slices ``zr`` (inclusive), at the classical working grid (z, h, w).

    The network runs on slices about ``step_mm`` apart; the logits of the slices in between are
    linearly interpolated along z (positions from ``z_mm``, so uneven spacing is respected)."""
    import cv2

    from ..volume.resample import window_hu
    from .unet2d import predict_logits, prepare_slices

    pre = pre or Preprocessing()

    hu = volume.hu
    z_mm = np.asarray(volume.z_mm, dtype=np.float64)
    t0 = time.perf_counter()
    z0, z1 = zr
    run = _net_slices(z_mm, z0, z1, NET_Z_STEP_MM if step_mm is None else step_mm)

    def make(i0: int, i1: int) -> np.ndarray:  # windowed per batch: no float copy of all run slices
        return prepare_slices(window_hu(hu[run[i0:i1]], pre.segmenter_window), pre.segmenter_size)

    t1 = time.perf_counter()
    steps: Dict[str, float] = {}
    logits = predict_logits(make, session, n=int(run.size), timings=steps)
    t2 = time.perf_counter()
    if logits.shape[1:] != (grid.h, grid.w):
        interp = cv2.INTER_AREA if grid.h < logits.shape[1] else cv2.INTER_LINEAR
        logits = np.stack([cv2.resize(lg, (grid.w, grid.h), interpolation=interp) for lg in logits])
    out = np.zeros((hu.shape[0], grid.h, grid.w), bool)
    pos = np.searchsorted(run, np.arange(z0, z1 + 1))          # index of the run slice at / above k
    for k, j in zip(range(z0, z1 + 1), pos):
        if run[j] == k:
            out[k] = logits[j] > 0
        else:
            a, b = run[j - 1], run[j]
            wb = (z_mm[k] - z_mm[a]) / (z_mm[b] - z_mm[a])
            out[k] = (1 - wb) * logits[j - 1] + wb * logits[j] > 0
    # net_prepare: slice choice + waiting for prepared batches (the rest overlaps the network)
    timings.update(net_prepare_ms=(t1 - t0) * 1e3 + steps.get("prepare_ms", 0.0), net_ms=steps.get("infer_ms", (t2 - t1) * 1e3),
                   net_resize_ms=(time.perf_counter() - t2) * 1e3)
    return out, int(run.size)


def _dilate_in_plane(mask: np.ndarray, reach: int) -> np.ndarray:
    """Each slice dilated by the L1 ball (diamond) of radius ``reach`` pixels.

    The same as ``reach`` iterations of a 4-connected 2D binary dilation (the diamond is the
    Minkowski sum of the crosses; shortest L1 paths stay inside the image), in one OpenCV call on
    the stacked slices (:func:`sdk.lungs.classical.stacked_2d`) instead of ``reach`` SciPy passes.
    """
    from .classical import stacked_2d

    r = np.arange(-reach, reach + 1)
    kernel = (np.abs(r)[:, None] + np.abs(r)[None, :] <= reach).astype(np.uint8)
    m8 = mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8)
    return stacked_2d(m8, kernel, erode=False) > 0


def _cube_on_grid(learned_cube: Any, grid: Any, zr: Tuple[int, int], timings: Dict[str, float]) -> Tuple[np.ndarray, int]:
    """A 3D U-Net's 0/1 cube (:class:`sdk.lungs.unet3d.CubeLabels`) at the working grid: nearest
    cube cell of every working-grid voxel of slices ``zr`` (the in-plane pixel centres of the
    working grid, the slices' own z), in place of the 2D U-Net's mask."""
    from dataclasses import replace

    from .unet3d import labels_to_volume

    t0 = time.perf_counter()
    g = replace(learned_cube.geometry, volume_shape=(grid.native[0], grid.h, grid.w),
                pixel_spacing_mm=(float(grid.spacing[1]), float(grid.spacing[2])))
    out = np.zeros((grid.native[0], grid.h, grid.w), bool)
    out[zr[0]:zr[1] + 1] = labels_to_volume(learned_cube.cube, g)[zr[0]:zr[1] + 1] > 0
    timings["learned_cube_ms"] = (time.perf_counter() - t0) * 1e3   # sampling only: the net ran elsewhere
    return out, 0


def _segment_learned(volume: Any, session: Any, cfg: ClassicalConfig, hybrid: bool, timings: Dict[str, float],
                     net_z_step_mm: Optional[float] = None, pre: Optional[Preprocessing] = None,
                     downsample: Any = None, learned_cube: Any = None) -> Tuple[np.ndarray, Dict[str, float]]:
    """``unet2d``: U-Net on the body z range, then the classical finishing steps (two largest
    components, left / right, closing, hole filling, up-sampling). ``hybrid``: the union of the
    U-Net mask and the classical candidates (dark lung the net misses, e.g. emphysema, plus dense
    lung the threshold misses, e.g. consolidation) goes through the same finishing steps."""
    from .classical import finish_lungs, lung_candidates, work_grid

    hu = np.asarray(volume.hu)
    info: Dict[str, float] = {}
    if hybrid:
        _, cand, grid, info = lung_candidates(hu, volume.spacing, cfg, timings, downsample)
        zs = np.nonzero(cand.any(axis=(1, 2)))[0]
        zr = (max(0, int(zs[0]) - 2), min(hu.shape[0] - 1, int(zs[-1]) + 2)) if zs.size else None
    else:
        t0 = time.perf_counter()
        grid = work_grid(hu.shape, volume.spacing, cfg.work_size)
        cand = np.zeros((hu.shape[0], grid.h, grid.w), bool)
        zr = _body_z_range(hu)
        timings["z_range_ms"] = (time.perf_counter() - t0) * 1e3
    if zr is None:
        return np.zeros(hu.shape, np.uint8), {"net_slices": 0.0, "n_components": 0.0}
    if learned_cube is not None:  # the learned part from a 3D U-Net's cube (e.g. computed on a GPU)
        learned, n_run = _cube_on_grid(learned_cube, grid, zr, timings)
    else:
        learned, n_run = _learned_small(volume, zr, session, grid, timings, net_z_step_mm, pre)
    if hybrid:
        t0 = time.perf_counter()
        reach = max(1, int(round(HYBRID_REACH_MM / grid.spacing[1])))
        learned &= _dilate_in_plane(cand, reach)
        timings["hybrid_reach_ms"] = (time.perf_counter() - t0) * 1e3
    labels, n = finish_lungs(learned | cand, grid, cfg, timings)
    info.update(n_components=float(n), net_slices=float(n_run))
    return labels, info


def segment(
    volume: Any,
    method: str = "auto",
    *,
    session: Any = None,
    onnx_path: Optional[Union[str, os.PathLike]] = None,
    config: Optional[ClassicalConfig] = None,
    downsample: Any = None,
    net_z_step_mm: Optional[float] = None,
    preprocessing: Optional[Preprocessing] = None,
    learned_cube: Any = None,
) -> LungSegmentation:
    """Segment both lungs of a CT volume.

    Args:
        volume: :class:`sdk.volume.Volume` (HU (z, y, x), ``z_mm``, ``pixel_spacing_mm``).
        method: ``"auto"`` (the measured default, :data:`DEFAULT_METHOD`; falls back to the
            classical method with a warning when the ONNX model or onnxruntime is missing),
            ``"classical"``, ``"unet2d"``, ``"hybrid"``, ``"unet3d"`` (the 3D U-Net alone) or
            ``"hybrid3d"`` (the hybrid with the 3D U-Net's cube as its learned part: the mask the
            classifier agrees with, docs/benchmarks/gpu.md; ``session``/``onnx_path`` = lungs3d).
        session: a ctsdk Session (:class:`sdk.runtime.ort.OrtSession`) for the 2D U-Net (reused
            across calls); otherwise one is opened from ``onnx_path`` (default
            ``sdk/bundles/default/lungs_fp32.onnx``) and cached.
        onnx_path: the 2D U-Net ONNX file.
        config: classical parameters.
        downsample: ``(hu, (h, w)) -> (z, h, w) float32`` for the classical working grid (default:
            OpenCV area per slice; the kernel path passes ctsdk's resample kernel).
        net_z_step_mm: the U-Net runs on slices about this far apart (default
            :data:`NET_Z_STEP_MM`); the slices in between get z-interpolated logits.
        preprocessing: the U-Net's input window and size (a bundle's
            :attr:`sdk.bundle.Bundle.preprocessing`; default: the default bundle's values).
        learned_cube: ``method="hybrid"`` only: a 3D U-Net's 0/1 cube as
            :class:`sdk.lungs.unet3d.CubeLabels` (cube + geometry; e.g. the GPU path's) is the
            learned part instead of the 2D U-Net, sampled at the working grid; the classical
            candidates and finishing steps are the hybrid's (no 2D U-Net session is needed).

    Returns:
        :class:`LungSegmentation` at the native grid.

    Raises:
        ConfigError: unknown method or malformed volume.
        BundleError: ``method="unet2d"`` and the ONNX file is missing.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown lung segmentation method {method!r}; valid: {', '.join(METHODS)}")
    hu = getattr(volume, "hu", None)
    if hu is None or np.asarray(hu).ndim != 3:
        raise ConfigError(f"segment() needs an sdk.volume.Volume with a (z, y, x) HU array, got {type(volume).__name__}")
    if method == "unet3d":  # 3D U-Net at 128^3 (sdk/lungs/unet3d.py); session / onnx_path = lungs3d_*.onnx
        from .unet3d import segment_unet3d

        return segment_unet3d(volume, session, onnx_path=onnx_path)
    asked = method
    if method == "hybrid3d":  # the hybrid with the 3D U-Net's cube as its learned part (session: lungs3d_*.onnx)
        if learned_cube is None:
            from .unet3d import cube_mask

            learned_cube = cube_mask(volume, session, onnx_path=onnx_path)
        method, session = "hybrid", None
    warns = []
    t0 = time.perf_counter()
    timings: Dict[str, float] = {}
    chosen = DEFAULT_METHOD if method == "auto" else method
    if learned_cube is not None and chosen != "hybrid":
        raise ConfigError(f"learned_cube is the learned part of the hybrid segmenter; method {method!r} does not take it")
    sess = None
    if chosen in ("unet2d", "hybrid") and learned_cube is None:
        try:
            sess = _session_for(session, onnx_path)
        except (BundleError, MissingDependencyError, ImportError) as exc:
            if method != "auto":
                raise
            warns.append(f"learned lung segmenter unavailable ({exc}); used the classical method")
            chosen = "classical"
    cfg = config or ClassicalConfig()
    if chosen in ("unet2d", "hybrid"):
        labels, info = _segment_learned(volume, sess, cfg, chosen == "hybrid", timings, net_z_step_mm, preprocessing,
                                        downsample=downsample, learned_cube=learned_cube)
    else:
        labels, info = segment_classical_hu(hu, volume.spacing, cfg, timings, downsample)
    mask, left, right = _mask_and_counts(labels)
    fallback_dz = float(getattr(volume.meta, "slice_thickness_mm", None) or volume.spacing[0] or 1.0)
    ps = volume.pixel_spacing_mm
    zs = np.nonzero(left + right)[0]
    t1 = time.perf_counter()
    timings["total"] = (t1 - t0) * 1e3
    for w in warns:
        _warnings.warn(w, stacklevel=2)
    return LungSegmentation(
        mask=mask,
        labels=labels,
        lung_volume_ml=_volume_ml(left + right, volume.z_mm, ps, fallback_dz),
        left_volume_ml=_volume_ml(left, volume.z_mm, ps, fallback_dz),
        right_volume_ml=_volume_ml(right, volume.z_mm, ps, fallback_dz),
        method="hybrid3d" if asked == "hybrid3d" else chosen,
        timings_ms=timings,
        z_range=(int(zs[0]), int(zs[-1])) if zs.size else None,
        warnings=tuple(warns),
        info=info,
        slice_voxels=left + right,
    )
