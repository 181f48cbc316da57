"""3D lung U-Net at 128^3 (ONNX Runtime; torch-free) - the GPU path's lung segmenter.

The network (``sdk.models.unet.unet3d_lung``, paper 000's 3D U-Net, base 8, 4 levels) sees the
whole series at once as a 128^3 isotropic cube made by the resample kernel's arithmetic
(``kernels/resample.cu``, NumPy reference :func:`sdk.volume.resample.resample_volume`):

    cube = resample_volume(hu, z_mm, (128,)*3, mode="area", isotropic=True,
                           pixel_spacing_mm=..., fill_hu=-1024, window=(-1000, 400))   # [0, 1]

i.e. :data:`RESAMPLE` below - the GPU pipeline calls ``GpuKernels.resample(d_hu, ..., **RESAMPLE)``
on the device volume and feeds the result (float32, or float16 for an FP16 engine) straight to the
network. The ONNX graph (input :data:`INPUT_NAME` ``(N, 1, 128, 128, 128)`` float32, outputs
``logits`` and :data:`PROB_NAME` = sigmoid(logits), same shape) is in the default bundle as
``lungs3d_fp32.onnx`` / ``lungs3d_fp16.onnx`` (FP16 compute, FP32 I/O).

Mapping the 128^3 result back to the volume (:class:`CubeGeometry`): every axis of the cube is
``n = 128`` equal cells starting at ``lo`` (mm) with length ``cell = side / n`` (the same on the
three axes - the cube is isotropic). Volume voxel ``(k, j, i)`` sits at ``(z_mm[k], (j + 0.5) * dy,
(i + 0.5) * dx)`` in the resample convention, so its continuous cube index on each axis is

    u = (position - lo) / cell - 0.5          (clamped to [0, n - 1])

and the volume mask is ``trilinear(prob, u_z[k], u_y[j], u_x[i]) > threshold`` - separable, 2 taps
per axis (:meth:`CubeGeometry.axis_taps`). A GPU implementation needs only ``lo``, ``cell``,
``z_mm``, ``dy``, ``dx`` (:meth:`CubeGeometry.to_dict`), e.g. one thread per volume voxel reading
8 cube values.

Optional post-processing (CPU, at 128^3, cheap): drop components touching the in-plane border of
the scanned field of view (outside air), keep the largest connected component and a second
one of at least :data:`SECOND_COMPONENT_MIN` of its size, and split left / right (the component
with the larger x centroid is the Left lung; one component is cut at its x centroid). Without it
(``postprocess=False``) the mask is the plain thresholded probability, which is what a device path
with no post-processing produces.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import BundleError, ConfigError
from ..volume.resample import SEGMENTER_WINDOW, axis_grids, resample_volume

__all__ = [
    "CUBE",
    "RESAMPLE",
    "INPUT_NAME",
    "LOGITS_NAME",
    "PROB_NAME",
    "DEFAULT_ONNX",
    "DEFAULT_ONNX_FP16",
    "CubeGeometry",
    "cube_geometry",
    "prepare_cube",
    "predict_cube",
    "postprocess_cube",
    "border_cells",
    "cube_to_volume",
    "interp_matrix",
    "labels_to_volume",
    "CubeLabels",
    "cube_mask",
    "open_session",
    "segment_unet3d",
]

#: network input side (voxels)
CUBE = 128
#: the resample kernel's arguments for the 3D U-Net input (isotropic cube, area rule, segmenter window)
RESAMPLE: Dict[str, Any] = {
    "out_shape": (CUBE, CUBE, CUBE),
    "mode": "area",
    "isotropic": True,
    "fill_hu": -1024.0,
    "window": SEGMENTER_WINDOW,
}
INPUT_NAME = "volume"
LOGITS_NAME = "logits"
PROB_NAME = "prob"
#: probability threshold of the lung mask
THRESHOLD = 0.5
#: post-processing keeps a second component only if it is at least this fraction of the largest
SECOND_COMPONENT_MIN = 0.10
_BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "default"
DEFAULT_ONNX = _BUNDLE / "lungs3d_fp32.onnx"
DEFAULT_ONNX_FP16 = _BUNDLE / "lungs3d_fp16.onnx"

LEFT, RIGHT = 1, 2


@dataclass(frozen=True)
class CubeGeometry:
    """Where the 128^3 cube sits relative to the volume (see the module docstring).

    Attributes:
        volume_shape: (z, y, x) of the volume.
        n: cube side in voxels (128).
        lo: (z, y, x) position (mm) of the low edge of cube cell 0 on each axis, in the resample
            convention (z: ``z_mm``; y, x: voxel ``j`` at ``(j + 0.5) * spacing``).
        cell: (z, y, x) cell size (mm); equal for the isotropic cube.
        z_mm: (z,) slice positions of the volume.
        pixel_spacing_mm: (dy, dx).
    """

    volume_shape: Tuple[int, int, int]
    n: Tuple[int, int, int]
    lo: Tuple[float, float, float]
    cell: Tuple[float, float, float]
    z_mm: np.ndarray
    pixel_spacing_mm: Tuple[float, float]

    def positions(self, axis: int) -> np.ndarray:
        """Volume voxel centres (mm) along ``axis`` (0 = z, 1 = y, 2 = x)."""
        if axis == 0:
            return np.asarray(self.z_mm, np.float64)
        sp = float(self.pixel_spacing_mm[axis - 1])
        return (np.arange(self.volume_shape[axis], dtype=np.float64) + 0.5) * sp

    def coords(self, axis: int) -> np.ndarray:
        """Continuous cube index of every volume voxel along ``axis``, clamped to [0, n - 1]."""
        u = (self.positions(axis) - self.lo[axis]) / self.cell[axis] - 0.5
        return np.clip(u, 0.0, self.n[axis] - 1.0)

    def axis_taps(self, axis: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Linear taps ``(i0, i1, w1)``: value = ``(1 - w1) * c[i0] + w1 * c[i1]``."""
        u = self.coords(axis)
        i0 = np.minimum(np.floor(u).astype(np.int64), self.n[axis] - 1)
        i1 = np.minimum(i0 + 1, self.n[axis] - 1)
        return i0, i1, u - i0

    def nearest(self, axis: int) -> np.ndarray:
        """Nearest cube index of every volume voxel along ``axis``."""
        return np.minimum(np.floor(self.coords(axis) + 0.5).astype(np.int64), self.n[axis] - 1)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe geometry (what a device-side sampler needs)."""
        return {"volume_shape": list(self.volume_shape), "n": list(self.n), "lo": list(self.lo),
                "cell": list(self.cell), "pixel_spacing_mm": list(self.pixel_spacing_mm),
                "z_mm": [float(v) for v in np.asarray(self.z_mm)]}


def cube_geometry(shape: Sequence[int], z_mm: Sequence[float], pixel_spacing_mm: Sequence[float],
                  slice_thickness_mm: Optional[float] = None, n: int = CUBE) -> CubeGeometry:
    """The cube geometry of a volume: :func:`sdk.volume.resample.axis_grids` with ``isotropic=True``
    (the very geometry the resample kernel receives)."""
    grids = axis_grids(shape, z_mm, (n, n, n), True, pixel_spacing_mm, slice_thickness_mm)
    return CubeGeometry(
        volume_shape=tuple(int(s) for s in shape),  # type: ignore[arg-type]
        n=(n, n, n),
        lo=tuple(float(g.out_lo) for g in grids),  # type: ignore[arg-type]
        cell=tuple(float(g.out_len / g.n_out) for g in grids),  # type: ignore[arg-type]
        z_mm=np.asarray(z_mm, np.float64),
        pixel_spacing_mm=(float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1])),
    )


def _volume_geometry(volume: Any) -> CubeGeometry:
    return cube_geometry(np.shape(volume.hu), volume.z_mm, volume.pixel_spacing_mm,
                         getattr(getattr(volume, "meta", None), "slice_thickness_mm", None))


def prepare_cube(volume: Any) -> np.ndarray:
    """(1, 1, 128, 128, 128) float32 network input of a Volume (NumPy reference of the resample
    kernel with :data:`RESAMPLE`)."""
    cube = resample_volume(volume.hu, volume.z_mm, pixel_spacing_mm=volume.pixel_spacing_mm,
                           slice_thickness_mm=getattr(getattr(volume, "meta", None), "slice_thickness_mm", None),
                           **RESAMPLE)
    return np.ascontiguousarray(cube[None, None], dtype=np.float32)


SessionLike = Any  # ctsdk Session (.infer), onnxruntime.InferenceSession (.run), or an ONNX path


def open_session(onnx_path: Optional[Union[str, os.PathLike]] = None, threads: int = 0,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    """ctsdk :class:`sdk.runtime.ort.OrtSession` for the 3D U-Net (default: the bundle's
    ``lungs3d_fp32.onnx``); ``providers`` naming ``CUDAExecutionProvider`` opens it on the GPU
    (falling back to the CPU with the reason in ``fallback_reasons``), else on the CPU."""
    path = Path(onnx_path) if onnx_path is not None else DEFAULT_ONNX
    if not path.is_file():
        raise BundleError(f"3D lung U-Net model not found: {path} (train and export it with "
                          "`python -m sdk.train.seg3d`, or pass onnx_path=...)")
    from ..runtime.ort import CUDA_EP, OrtSession

    device = "cuda" if CUDA_EP in tuple(providers) else "cpu"
    return OrtSession(path, device=device, threads=threads or None)


def predict_cube(x: Any, session: SessionLike) -> Any:
    """The device-friendly core: network input -> probability, both ``(N, 1, 128, 128, 128)``.

    ``x`` is whatever ``session`` accepts - a NumPy float32 array for an ORT session (an
    ``OrtValue`` on the device works with ``run_with_ort_values``/IOBinding in the caller), a
    device array for a ctsdk Session with device buffers. The result is the session's own array
    type, untouched (no host copy is made here)."""
    if isinstance(session, (str, os.PathLike)):
        session = open_session(session)
    if hasattr(session, "infer"):  # ctsdk Session
        return session.infer({INPUT_NAME: x})[PROB_NAME]
    if hasattr(session, "run"):
        return session.run([PROB_NAME], {INPUT_NAME: x})[0]
    raise ConfigError(f"session must be a ctsdk Session, an onnxruntime.InferenceSession or an ONNX path, "
                      f"not {type(session).__name__}")


def border_cells(geometry: CubeGeometry) -> np.ndarray:
    """(128, 128, 128) bool: the cube cells on the in-plane border of the volume's extent (the
    outermost cell row / column of the scanned field of view, within its z extent)."""
    n = geometry.n
    first_last = []
    for a in range(3):
        e = geometry.positions(a)
        half = 0.5 * (float(np.median(np.diff(e))) if e.size > 1 else (geometry.cell[a]))
        lo_mm, hi_mm = e[0] - half, e[-1] + half
        c0 = int(np.clip(np.floor((lo_mm - geometry.lo[a]) / geometry.cell[a]), 0, n[a] - 1))
        c1 = int(np.clip(np.ceil((hi_mm - geometry.lo[a]) / geometry.cell[a]) - 1, 0, n[a] - 1))
        first_last.append((c0, c1))
    out = np.zeros(n, bool)
    (z0, z1), (y0, y1), (x0, x1) = first_last
    out[z0:z1 + 1, [y0, y1], x0:x1 + 1] = True
    out[z0:z1 + 1, y0:y1 + 1, [x0, x1]] = True
    return out


def postprocess_cube(prob: np.ndarray, threshold: float = THRESHOLD, geometry: Optional[CubeGeometry] = None) -> np.ndarray:
    """(128, 128, 128) probability -> uint8 labels (0, 1 = left, 2 = right) at 128^3: the largest
    component and a second one of >= :data:`SECOND_COMPONENT_MIN` of it; left / right by x. With
    ``geometry``, components touching the in-plane border of the scanned field of view
    (:func:`border_cells`) are outside air and dropped first (unless every component does)."""
    from scipy import ndimage as ndi

    m = np.asarray(prob) > threshold
    lab, n = ndi.label(m)
    out = np.zeros(m.shape, np.uint8)
    if n == 0:
        return out
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.int64)
    if geometry is not None:
        touching = np.unique(lab[border_cells(geometry)])
        touching = touching[touching > 0]
        if touching.size < n:
            sizes[touching - 1] = 0
    order = np.argsort(sizes)[::-1]
    keep = [int(order[0]) + 1]
    if n > 1 and sizes[order[1]] > 0 and sizes[order[1]] >= SECOND_COMPONENT_MIN * sizes[order[0]]:
        keep.append(int(order[1]) + 1)
    xs = np.arange(m.shape[2], dtype=np.float64)
    if len(keep) == 2:
        cx = [float((lab == k).sum(axis=(0, 1)) @ xs / sizes[k - 1]) for k in keep]
        left, right = (keep[0], keep[1]) if cx[0] > cx[1] else (keep[1], keep[0])
        out[lab == left] = LEFT
        out[lab == right] = RIGHT
        return out
    comp = lab == keep[0]
    cx = float(comp.sum(axis=(0, 1)) @ xs / sizes[keep[0] - 1])
    side = (xs > cx)[None, None, :]
    out[comp & side] = LEFT
    out[comp & ~side] = RIGHT
    return out


def _array_module(a: Any) -> Any:
    """NumPy, or CuPy for a ``cupy.ndarray`` (imported only then)."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def cube_to_volume(cube: Any, geometry: CubeGeometry, threshold: Optional[float] = THRESHOLD,
                   chunk: int = 16) -> Any:
    """Sample a (128, 128, 128) cube at every volume voxel (separable trilinear, see the module
    docstring). Returns bool ``> threshold`` at the volume grid, or the float32 values when
    ``threshold`` is None. Works slab by slab (``chunk`` slices) to bound memory.

    ``cube`` may be a NumPy or a CuPy array; with CuPy everything (taps, result) stays on the
    device - the GPU path's "mask back at the volume grid" without a host round trip."""
    xp = _array_module(cube)
    c = xp.asarray(cube, dtype=xp.float32)
    if tuple(c.shape) != tuple(geometry.n):
        raise ConfigError(f"cube_to_volume: cube shape {tuple(c.shape)} != geometry {geometry.n}")
    z0, z1, wz = geometry.axis_taps(0)
    wz = xp.asarray(wz.astype(np.float32))
    z0, z1 = xp.asarray(z0), xp.asarray(z1)
    ay, ax = (xp.asarray(interp_matrix(geometry, a)) for a in (1, 2))   # (ny, 128), (nx, 128)
    axt = ax.T.copy()
    nz, ny, nx = geometry.volume_shape
    out = xp.empty((nz, ny, nx), dtype=bool if threshold is not None else xp.float32)
    for s in range(0, nz, chunk):
        e = min(nz, s + chunk)
        w = wz[s:e, None, None]
        a = c[z0[s:e]] * (1 - w) + c[z1[s:e]] * w                       # (k, 128, 128)
        a = xp.matmul(xp.matmul(ay, a), axt)                           # (k, ny, nx)
        out[s:e] = a > threshold if threshold is not None else a
    return out


def interp_matrix(geometry: CubeGeometry, axis: int) -> np.ndarray:
    """(n_volume, n_cube) float32 linear-interpolation matrix of one axis (2 non-zeros a row:
    :meth:`CubeGeometry.axis_taps`); in-plane up-sampling is ``A_y @ slab @ A_x.T`` (BLAS)."""
    i0, i1, w = geometry.axis_taps(axis)
    m = np.zeros((i0.size, geometry.n[axis]), np.float32)
    rows = np.arange(i0.size)
    np.add.at(m, (rows, i0), (1.0 - w).astype(np.float32))
    np.add.at(m, (rows, i1), w.astype(np.float32))
    return m


def labels_to_volume(labels: np.ndarray, geometry: CubeGeometry, step: int = 1) -> np.ndarray:
    """Nearest-cell sampling of a (128, 128, 128) label cube at every volume voxel (uint8); with
    ``step`` > 1 only at every ``step``-th row and column of each slice (``full[:, ::step, ::step]``)."""
    iz, iy, ix = (geometry.nearest(a) for a in range(3))
    return np.asarray(labels, np.uint8)[iz][:, iy[::step]][:, :, ix[::step]]


@dataclass(frozen=True)
class CubeLabels:
    """A label cube seen at the volume's grid without building the volume-sized array.

    :func:`sdk.opacity.measure_opacity` reads labels only at its in-plane stride (every 2nd row and
    column of a 0.75 mm series: a quarter of the voxels): ``strided(step)`` samples just those, where
    :func:`labels_to_volume` would build the whole volume first (all 148 x 512² voxels of covid-P001).
    """

    cube: np.ndarray
    geometry: CubeGeometry

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(int(v) for v in self.geometry.volume_shape)  # type: ignore[return-value]

    def strided(self, step: int) -> np.ndarray:
        """``labels_to_volume(cube, geometry)[:, ::step, ::step]``, sampled directly (uint8)."""
        return labels_to_volume(self.cube, self.geometry, step)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        full = labels_to_volume(self.cube, self.geometry)
        return full if dtype is None else full.astype(dtype)


def _grow_labels(labels: np.ndarray) -> np.ndarray:
    """Labels extended by one voxel (6-neighbourhood) into the background (the larger label wins
    where both touch)."""
    from scipy import ndimage as ndi

    grown = ndi.grey_dilation(labels, footprint=ndi.generate_binary_structure(3, 1))
    return np.where(labels > 0, labels, grown).astype(np.uint8)


def _session_or_cached(session: SessionLike, onnx_path: Optional[Union[str, os.PathLike]]) -> SessionLike:
    """``session``, or the process's cached 3D U-Net session of ``onnx_path`` (default :data:`DEFAULT_ONNX`)."""
    from ..runtime.base import session_or_cached

    return session_or_cached(session, onnx_path, DEFAULT_ONNX, open_session, "lungs3d")


def _per_slice(mask: np.ndarray) -> np.ndarray:
    """Voxels per slice of a (z, y, x) mask (what ``sdk.lungs._volume_ml`` takes)."""
    return np.count_nonzero(np.asarray(mask).reshape(mask.shape[0], -1), axis=1)


def cube_mask(volume: Any, session: SessionLike = None, *, onnx_path: Optional[Union[str, os.PathLike]] = None,
              threshold: float = THRESHOLD) -> CubeLabels:
    """The 3D U-Net's thresholded 0/1 cube on the CPU, with its geometry - the learned part of
    ``sdk.lungs.segment(method="hybrid3d")`` (what the GPU path computes on the device)."""
    prob = np.asarray(predict_cube(prepare_cube(volume), _session_or_cached(session, onnx_path)), np.float32)[0, 0]
    return CubeLabels((prob > threshold).astype(np.uint8), _volume_geometry(volume))


def segment_unet3d(
    volume: Any,
    session: SessionLike = None,
    *,
    onnx_path: Optional[Union[str, os.PathLike]] = None,
    threshold: float = THRESHOLD,
    postprocess: bool = True,
) -> Any:
    """Segment both lungs with the 3D U-Net on the CPU (resample -> ONNX -> mask at the volume grid).

    Args:
        volume: :class:`sdk.volume.Volume`.
        session: ORT session / ctsdk Session / ONNX path of ``lungs3d_*.onnx``; ``None`` opens
            ``onnx_path`` (default: the bundle's ``lungs3d_fp32.onnx``) once and caches it.
        threshold: probability threshold.
        postprocess: keep the lung components and split left / right (see module docstring);
            False returns the plain thresholded probability with ``labels=None``.

    Returns:
        :class:`sdk.lungs.LungSegmentation` (``method="unet3d"``); ``timings_ms`` has
        ``resample_ms``, ``net_ms``, ``post_ms``, ``upsample_ms`` and ``total``;
        ``info["geometry"]`` is not included (arrays) - use :func:`cube_geometry`.
    """
    from . import LungSegmentation, _volume_ml

    hu = getattr(volume, "hu", None)
    if hu is None or np.ndim(hu) != 3:
        raise ConfigError(f"segment_unet3d() needs an sdk.volume.Volume with a (z, y, x) HU array, "
                          f"got {type(volume).__name__}")
    session = _session_or_cached(session, onnx_path)
    t0 = time.perf_counter()
    geom = _volume_geometry(volume)
    x = prepare_cube(volume)
    t1 = time.perf_counter()
    prob = np.asarray(predict_cube(x, session), np.float32)[0, 0]
    t2 = time.perf_counter()
    labels_cube = postprocess_cube(prob, threshold, geom) if postprocess else None
    grown = None
    if labels_cube is not None:
        grown = _grow_labels(labels_cube)
        prob = np.where(grown > 0, prob, 0.0).astype(np.float32)
    t3 = time.perf_counter()
    mask = cube_to_volume(prob, geom, threshold)
    labels = None
    if grown is not None:
        labels = labels_to_volume(grown, geom)
        labels[~mask] = 0
        mask &= labels > 0
    t4 = time.perf_counter()
    timings = {"resample_ms": (t1 - t0) * 1e3, "net_ms": (t2 - t1) * 1e3, "post_ms": (t3 - t2) * 1e3,
               "upsample_ms": (t4 - t3) * 1e3, "total": (t4 - t0) * 1e3}
    meta = getattr(volume, "meta", None)
    fallback_dz = float(getattr(meta, "slice_thickness_mm", None) or volume.spacing[0] or 1.0)
    ps = volume.pixel_spacing_mm
    zs = np.nonzero(mask.any(axis=(1, 2)))[0]
    return LungSegmentation(
        mask=mask,
        labels=labels,
        lung_volume_ml=_volume_ml(_per_slice(mask), volume.z_mm, ps, fallback_dz),
        left_volume_ml=None if labels is None else _volume_ml(_per_slice(labels == LEFT), volume.z_mm, ps, fallback_dz),
        right_volume_ml=None if labels is None else _volume_ml(_per_slice(labels == RIGHT), volume.z_mm, ps, fallback_dz),
        method="unet3d",
        timings_ms=timings,
        z_range=(int(zs[0]), int(zs[-1])) if zs.size else None,
        info={"cube_cell_mm": float(geom.cell[0]), "cube_lung_voxels": float((prob > threshold).sum())},
    )
