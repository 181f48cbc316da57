"""CPU harness: the kernels' ``__host__ __device__`` arithmetic compiled by g++ and called with ctypes.

``kernels/harness_cpu.cuh`` includes ``ctsdk_common.cuh`` - the very header the CUDA kernels use -
with the CUDA qualifiers defined away, and loops over outputs in place of the thread grid (warp
reductions are reproduced lane by lane). The library is built on first use and cached in
:func:`sdk.kernels.sources.cache_dir` under a key of the sources' sha256, the compiler and its
flags; a changed header rebuilds it.

    >>> from sdk.kernels.harness import CpuHarness
    >>> h = CpuHarness()                                   # builds or loads the cached .so
    >>> out = h.resample(hu, z_mm, (128, 128, 128), mode="area", window=SEGMENTER_WINDOW)

The methods take and return NumPy arrays with the same signatures as the NumPy references
(:mod:`sdk.volume.resample`, :mod:`sdk.pooling`), so tests compare them one to one.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError, KernelError
from ..preprocessing import CLASSIFIER_WINDOW
from . import sources as S

__all__ = ["CXX_FLAGS", "build_harness", "CpuHarness"]

CXX_FLAGS: Tuple[str, ...] = (
    "-x", "c++", "-std=c++17", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off",
    "-Wall", "-Wno-unused-function",
)
_LOCK = threading.Lock()
_c_double, _c_int, _c_float, _c_ll, _vp = ctypes.c_double, ctypes.c_int, ctypes.c_float, ctypes.c_longlong, ctypes.c_void_p


def _compiler() -> Tuple[str, str]:
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise KernelError(
            f"CPU kernel harness needs a C++ compiler: {cxx!r} not found on PATH (install g++ or set CXX)"
        )
    try:
        ver = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelError(f"CPU kernel harness: cannot run {path} --version: {exc}") from exc
    return path, (ver.splitlines() or ["?"])[0]


def build_harness(force: bool = False) -> Path:
    """Compile ``harness_cpu.cuh`` into the cache (if not there already) and return the .so path."""
    cxx, version = _compiler()
    key = S.sources_hash(version, " ".join(CXX_FLAGS))[:16]
    target = S.cache_dir() / f"ctsdk_harness-{key}.so"
    if target.exists() and not force:
        return target
    src = S.KERNEL_DIR / "harness_cpu.cuh"
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [cxx, *CXX_FLAGS, "-I", str(S.KERNEL_DIR), str(src), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise KernelError(
            f"{src}: g++ failed (exit {proc.returncode}) building the CPU kernel harness:\n"
            f"{' '.join(cmd)}\n{proc.stderr.strip()[-4000:]}"
        )
    os.replace(tmp, target)  # atomic: concurrent builders race harmlessly
    for old in target.parent.glob("ctsdk_harness-*.so"):  # stale builds of older sources
        if old != target:
            old.unlink(missing_ok=True)
    return target


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


class CpuHarness:
    """ctypes front end of the compiled kernel arithmetic (see module docstring)."""

    def __init__(self, library: Optional[Path] = None):
        with _LOCK:
            self.path = Path(library) if library else build_harness()
        try:
            lib = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise KernelError(f"{self.path}: cannot load the CPU kernel harness ({exc}); delete it to rebuild") from exc
        lib.ct_h_resample3d.argtypes = (
            [_vp, _c_int, _c_int, _c_int, _c_int, _vp] + [_c_double] * 3 + [_c_int] * 3 + [_c_double] * 6
            + [_c_int, _c_float, _c_int, _c_float, _c_float, _c_int, _vp]
        )
        lib.ct_h_classifier_inputs.argtypes = [_vp, _c_int, _vp, _c_int, _c_int, _c_int, _vp, _c_int, _c_int,
                                               _c_float, _c_float, _vp]
        lib.ct_h_mask_weights.argtypes = [_vp, _c_ll, _c_int, _c_int, _c_int, _c_int, _c_int, _vp]
        lib.ct_h_masked_gap.argtypes = [_vp, _c_int, _vp, _c_int, _c_int, _c_int, _vp]
        lib.ct_h_float_to_half.argtypes = [_vp, _c_ll, _vp]
        lib.ct_h_half_to_float.argtypes = [_vp, _c_ll, _vp]
        for f in (lib.ct_h_resample3d, lib.ct_h_classifier_inputs, lib.ct_h_mask_weights, lib.ct_h_masked_gap):
            f.restype = _c_int
        self._lib = lib

    # --- resampling ----------------------------------------------------------------------------
    @staticmethod
    def _volume(hu: np.ndarray) -> Tuple[np.ndarray, int]:
        hu = np.asarray(hu)
        if hu.ndim != 3 or hu.size == 0:
            raise ConfigError(f"resample kernel: hu must be a non-empty (z, y, x) array, not shape {hu.shape}")
        if hu.dtype == np.int16:
            return np.ascontiguousarray(hu), 0
        if hu.dtype == np.float32:
            return np.ascontiguousarray(hu), 1
        raise ConfigError(f"resample kernel: hu must be int16 or float32 (Volume.hu), not {hu.dtype}")

    def resample(
        self,
        hu: np.ndarray,
        z_mm: Sequence[float],
        out_shape: Sequence[int] = (128, 128, 128),
        mode: str = "linear",
        isotropic: bool = False,
        pixel_spacing_mm: Optional[Sequence[float]] = None,
        fill_hu: float = -1024.0,
        window: Optional[Tuple[float, float]] = None,
        slice_thickness_mm: Optional[float] = None,
        out_dtype: str = "float32",
    ) -> np.ndarray:
        """Same contract as :func:`sdk.volume.resample.resample_volume`; ``out_dtype`` float32|float16."""
        vol, in_dtype = self._volume(hu)
        m = S.check_mode(mode)
        windowed, lo, hi = S.check_window(window)
        if out_dtype not in ("float32", "float16"):
            raise ConfigError(f"resample kernel: out_dtype must be 'float32' or 'float16', not {out_dtype!r}")
        g = S.resample_geometry(vol.shape, z_mm, out_shape, isotropic, pixel_spacing_mm, slice_thickness_mm)
        half = out_dtype == "float16"
        out = np.empty(g.out_shape, dtype=np.uint16 if half else np.float32)
        rc = self._lib.ct_h_resample3d(
            _ptr(vol), in_dtype, *vol.shape, _ptr(g.z_centres), *g.spacing, *g.out_shape,
            g.out_lo[0], g.out_len[0], g.out_lo[1], g.out_len[1], g.out_lo[2], g.out_len[2],
            m, float(fill_hu), windowed, lo, hi, int(half), _ptr(out),
        )
        if rc:
            raise KernelError(f"ct_h_resample3d returned {rc}")
        return out.view(np.float16) if half else out

    def classifier_inputs(
        self,
        hu: np.ndarray,
        lung_mask: np.ndarray,
        slice_indices: Sequence[int],
        size: int = 224,
        window: Tuple[float, float] = CLASSIFIER_WINDOW,
    ) -> np.ndarray:
        """Same contract as :func:`sdk.volume.resample.classifier_inputs`."""
        vol, in_dtype = self._volume(hu)
        mask = np.ascontiguousarray(np.asarray(lung_mask) != 0, dtype=np.uint8)
        if mask.shape != vol.shape:
            raise ConfigError(f"classifier_inputs kernel: lung_mask shape {mask.shape} differs from hu {vol.shape}")
        idx = np.ascontiguousarray(slice_indices, dtype=np.int32).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= vol.shape[0]):
            raise ConfigError(f"classifier_inputs kernel: slice indices must be in [0, {vol.shape[0] - 1}]")
        _, lo, hi = S.check_window(window)
        out = np.empty((idx.size, 3, int(size), int(size)), dtype=np.float32)
        self._lib.ct_h_classifier_inputs(_ptr(vol), in_dtype, _ptr(mask), *vol.shape, _ptr(idx), idx.size,
                                         int(size), lo, hi, _ptr(out))
        return out

    # --- pooling -------------------------------------------------------------------------------
    def mask_weights(self, mask: np.ndarray, grid_hw: Sequence[int] = (7, 7), channel: Optional[int] = None) -> np.ndarray:
        """Same contract as :func:`sdk.pooling.mask_weights`. With ``channel``, ``mask`` is a
        (N, C, H, W) buffer (e.g. the classifier input) read at that channel with the kernel's stride."""
        m = np.ascontiguousarray(mask, dtype=np.float32)
        if m.ndim == 3:
            m = m[:, None]
        if m.ndim != 4 or (channel is None and m.shape[1] != 1):
            raise ConfigError(f"mask_weights kernel: expected (N, 1, H, W) (or channel=), not shape {np.shape(mask)}")
        c = 0 if channel is None else int(channel)
        n, ch, H, W = m.shape
        gh, gw = (int(v) for v in grid_hw)
        out = np.empty((n, 1, gh, gw), dtype=np.float32)
        base = m.ctypes.data + c * H * W * 4
        self._lib.ct_h_mask_weights(ctypes.c_void_p(base), ch * H * W, n, H, W, gh, gw, _ptr(out))
        return out

    def masked_gap(self, features: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Same contract as :func:`sdk.pooling.masked_gap`; float16 features keep FP32 accumulation."""
        f = np.asarray(features)
        if f.dtype not in (np.float32, np.float16) or f.ndim != 4:
            raise ConfigError(f"masked_gap kernel: features must be (N, C, h, w) float32/float16, not {f.dtype} {f.shape}")
        f = np.ascontiguousarray(f)
        w = np.ascontiguousarray(weights, dtype=np.float32)
        n, c, h, wd = f.shape
        if w.size != n * h * wd:
            raise ConfigError(f"masked_gap kernel: weights {w.shape} do not match features {f.shape}")
        out = np.empty((n, c), dtype=np.float32)
        self._lib.ct_h_masked_gap(_ptr(f), int(f.dtype == np.float16), _ptr(w), n, c, h * wd, _ptr(out))
        return out

    # --- half conversions (tests the software binary16 rounding) -------------------------------
    def float_to_half(self, x: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty(a.shape, dtype=np.uint16)
        self._lib.ct_h_float_to_half(_ptr(a), a.size, _ptr(out))
        return out.view(np.float16)

    def half_to_float(self, x: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(x, dtype=np.float16).view(np.uint16)
        out = np.empty(a.shape, dtype=np.float32)
        self._lib.ct_h_half_to_float(_ptr(a), a.size, _ptr(out))
        return out
