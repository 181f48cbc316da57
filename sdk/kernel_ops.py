"""Kernel sets: the four ctsdk kernels behind one interface, in three implementations.

=============  ==========================================  ==================================
name           arithmetic                                  arrays
=============  ==========================================  ==================================
``numpy``      the NumPy references (:mod:`sdk.volume.     NumPy (host)
               resample`, :mod:`sdk.pooling`)
``cpu-harness``the CUDA kernels' ``__host__ __device__``   NumPy (host)
               code compiled by g++ (:mod:`sdk.kernels.
               harness`)
``cuda``       the CUDA kernels on the GPU                 CuPy (device)
               (:class:`sdk.kernels.GpuKernels`, CuPy)
=============  ==========================================  ==================================

The operations (same contracts as the references):

- ``resample(hu, z_mm, out_shape, ...)``: HU volume -> resampled (optionally windowed) float32;
- ``classifier_inputs(hu, mask, indices, size, window)``: (N, 3, S, S) grey / mask / grey*mask;
- ``mask_weights(x, grid_hw, channel)``: mask (channel of x) -> (N, 1, h, w) pooling weights;
- ``masked_gap(features, weights)``: (N, C) pooled features.

``xp`` is the array module of the set (numpy or cupy) for the glue between kernels (threshold,
reductions, the head's matmul), so the orchestration in :mod:`sdk.device_path` is one code path
for all three. Every host <-> device copy goes through :class:`Transfers` (``upload`` /
``download``), which counts calls and bytes; the GPU bindings' own small uploads (resample z
centres, classifier slice indices) are recorded too. On the host sets the "device" is the host:
the copies are counted the same way (they are what the GPU set would copy), so CPU CI checks the
transfer pattern of the orchestration.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import ConfigError, KernelError, MissingDependencyError, RuntimeUnavailableError

__all__ = ["KERNEL_SETS", "KernelSet", "NumpyKernels", "HarnessKernels", "CudaKernels", "Transfers", "open_kernel_set"]

KERNEL_SETS = ("numpy", "cpu-harness", "cuda")


# --- transfer accounting ---------------------------------------------------------------------------
@dataclass
class Transfers:
    """Host <-> device copies of one run: calls and bytes each way, and what each copy was."""

    h2d_bytes: int = 0
    d2h_bytes: int = 0
    h2d_calls: int = 0
    d2h_calls: int = 0
    log: List[Tuple[str, str, int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, direction: str, what: str, nbytes: int) -> None:
        if direction not in ("h2d", "d2h"):
            raise ConfigError(f"transfer direction must be 'h2d' or 'd2h', not {direction!r}")
        with self._lock:
            if direction == "h2d":
                self.h2d_bytes += int(nbytes)
                self.h2d_calls += 1
            else:
                self.d2h_bytes += int(nbytes)
                self.d2h_calls += 1
            self.log.append((direction, what, int(nbytes)))

    def largest(self, direction: str) -> int:
        return max((b for d, _, b in self.log if d == direction), default=0)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe: totals and the list of copies (direction, what, bytes)."""
        with self._lock:
            return {"h2d_bytes": self.h2d_bytes, "d2h_bytes": self.d2h_bytes, "h2d_calls": self.h2d_calls,
                    "d2h_calls": self.d2h_calls,
                    "copies": [{"dir": d, "what": w, "bytes": b} for d, w, b in self.log]}


# --- the interface -----------------------------------------------------------------------------------
class KernelSet:
    """Base of the three sets (see the module docstring)."""

    name = ""
    on_device = False
    xp: Any = np

    # arrays
    def upload(self, a: np.ndarray, io: Transfers, what: str) -> Any:
        io.record("h2d", what, int(np.asarray(a).nbytes))
        return np.ascontiguousarray(a)

    def download(self, a: Any, io: Transfers, what: str) -> np.ndarray:
        io.record("d2h", what, int(a.nbytes))
        return np.asarray(a)

    def synchronize(self) -> None:
        pass

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name}

    # kernels
    def resample(self, hu: Any, z_mm: Sequence[float], out_shape: Sequence[int], *, mode: str = "linear",
                 isotropic: bool = False, pixel_spacing_mm: Optional[Sequence[float]] = None, fill_hu: float = -1024.0,
                 window: Optional[Tuple[float, float]] = None, slice_thickness_mm: Optional[float] = None,
                 out_dtype: str = "float32", io: Optional[Transfers] = None) -> Any:
        raise NotImplementedError

    def classifier_inputs(self, hu: Any, mask: Any, indices: np.ndarray, size: int, window: Tuple[float, float],
                          io: Optional[Transfers] = None) -> Any:
        raise NotImplementedError

    def mask_weights(self, x: Any, grid_hw: Sequence[int], channel: int = 1) -> Any:
        raise NotImplementedError

    def masked_gap(self, features: Any, weights: Any) -> Any:
        raise NotImplementedError


class NumpyKernels(KernelSet):
    """The NumPy references (float64 arithmetic, float32 results)."""

    name = "numpy"

    def resample(self, hu, z_mm, out_shape, *, mode="linear", isotropic=False, pixel_spacing_mm=None, fill_hu=-1024.0,
                 window=None, slice_thickness_mm=None, out_dtype="float32", io=None):
        from .volume.resample import resample_volume

        out = resample_volume(hu, z_mm, out_shape, mode, isotropic, pixel_spacing_mm, fill_hu, window,
                              slice_thickness_mm=slice_thickness_mm)
        return out.astype(np.float16) if out_dtype == "float16" else out

    def classifier_inputs(self, hu, mask, indices, size, window, io=None):
        from .volume.resample import classifier_inputs

        return classifier_inputs(hu, mask, indices, size=size, window=window)

    def mask_weights(self, x, grid_hw, channel=1):
        from .pooling import mask_weights

        return mask_weights(np.asarray(x)[:, channel:channel + 1], grid_hw)

    def masked_gap(self, features, weights):
        from .pooling import masked_gap

        return masked_gap(features, weights)


class HarnessKernels(KernelSet):
    """The CUDA kernels' arithmetic compiled by g++ (:class:`sdk.kernels.harness.CpuHarness`)."""

    name = "cpu-harness"

    def __init__(self) -> None:
        from .kernels.harness import CpuHarness

        self._h = CpuHarness()

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "library": str(self._h.path)}

    def resample(self, hu, z_mm, out_shape, *, mode="linear", isotropic=False, pixel_spacing_mm=None, fill_hu=-1024.0,
                 window=None, slice_thickness_mm=None, out_dtype="float32", io=None):
        return self._h.resample(hu, z_mm, out_shape, mode, isotropic, pixel_spacing_mm, fill_hu, window,
                                slice_thickness_mm, out_dtype)

    def classifier_inputs(self, hu, mask, indices, size, window, io=None):
        return self._h.classifier_inputs(hu, mask, indices, size, window)

    def mask_weights(self, x, grid_hw, channel=1):
        return self._h.mask_weights(x, grid_hw, channel=channel)

    def masked_gap(self, features, weights):
        return self._h.masked_gap(features, weights)


class CudaKernels(KernelSet):
    """The CUDA kernels on the GPU through :class:`sdk.kernels.GpuKernels` (CuPy backend).

    Host arrays are uploaded with ``cupy.ndarray.set`` (asynchronous from pinned memory);
    :meth:`pinned` gives a page-locked staging buffer for the one volume upload.
    """

    name = "cuda"
    on_device = True

    def __init__(self, device: int = 0, cubin_dir: Any = None) -> None:
        try:
            import cupy
        except ImportError as exc:
            raise MissingDependencyError("cupy (cupy-cuda13x / cupy-cuda12x)", "the device-resident GPU path", "gpu") from exc
        from .kernels.gpu import GpuKernels

        try:
            self._k = GpuKernels(backend="cupy", device=device, cubin_dir=cubin_dir)
        except (KernelError, MissingDependencyError):
            raise
        except Exception as exc:  # a CUDA driver/runtime error when no GPU is usable: typed
            raise RuntimeUnavailableError(f"CuPy cannot use CUDA device {device}: {type(exc).__name__}: {exc}") from exc
        self.xp = cupy
        self._cp = cupy

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, **self._k.describe()}

    def pinned(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """A page-locked host array (cupyx.empty_pinned) for asynchronous uploads."""
        import cupyx

        return cupyx.empty_pinned(tuple(int(s) for s in shape), dtype=dtype)

    def device_view(self, d_base: Any, base: np.ndarray, view: np.ndarray) -> Any:
        """``view`` (a strided view of host ``base``, e.g. flipped axes) rebuilt on ``d_base``, the
        device copy of ``base``, and made contiguous on the device."""
        offset = view.__array_interface__["data"][0] - base.__array_interface__["data"][0]
        mem = d_base.data + offset
        v = self._cp.ndarray(view.shape, dtype=view.dtype, memptr=mem, strides=view.strides)
        return self._cp.ascontiguousarray(v)

    def upload(self, a, io, what):
        a = np.ascontiguousarray(a)
        io.record("h2d", what, int(a.nbytes))
        d = self._cp.empty(a.shape, dtype=a.dtype)
        d.set(a)
        return d

    def download(self, a, io, what):
        io.record("d2h", what, int(a.nbytes))
        return self._cp.asnumpy(a)

    def synchronize(self) -> None:
        self._k.synchronize()

    def resample(self, hu, z_mm, out_shape, *, mode="linear", isotropic=False, pixel_spacing_mm=None, fill_hu=-1024.0,
                 window=None, slice_thickness_mm=None, out_dtype="float32", io=None):
        if io is not None:  # GpuKernels.resample uploads the (z,) float64 slice centres itself
            io.record("h2d", "resample: slice centres (GpuKernels)", 8 * int(hu.shape[0]))
        return self._k.resample(hu, np.asarray(z_mm, np.float64), out_shape, mode, isotropic, pixel_spacing_mm,
                                fill_hu, window, slice_thickness_mm, out_dtype)

    def classifier_inputs(self, hu, mask, indices, size, window, io=None):
        idx = np.ascontiguousarray(indices, dtype=np.int32).reshape(-1)
        if io is not None and idx.size:  # GpuKernels.classifier_inputs uploads the int32 indices itself
            io.record("h2d", "classifier_inputs: slice indices (GpuKernels)", int(idx.nbytes))
        return self._k.classifier_inputs(hu, mask, idx, size, window)

    def mask_weights(self, x, grid_hw, channel=1):
        return self._k.mask_weights(x, grid_hw, channel=channel)

    def masked_gap(self, features, weights):
        return self._k.masked_gap(features, weights)


_CACHE: Dict[str, KernelSet] = {}
_CACHE_LOCK = threading.Lock()


def open_kernel_set(name: str) -> KernelSet:
    """The kernel set ``name`` (one of :data:`KERNEL_SETS`), built once per process.

    Raises:
        ConfigError: unknown name. KernelError: the harness / kernels do not compile.
        MissingDependencyError / RuntimeUnavailableError: ``cuda`` without CuPy or a usable GPU.
    """
    if name not in KERNEL_SETS:
        raise ConfigError(f"kernel set {name!r} not in {KERNEL_SETS}")
    with _CACHE_LOCK:
        if name not in _CACHE:
            _CACHE[name] = {"numpy": NumpyKernels, "cpu-harness": HarnessKernels, "cuda": CudaKernels}[name]()
        return _CACHE[name]
