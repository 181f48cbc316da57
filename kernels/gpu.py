"""Device-buffer bindings of the ctsdk CUDA kernels (CuPy's RawModule, or pycuda when CuPy is absent).

    from sdk.kernels import GpuKernels
    k = GpuKernels()                                   # backend="auto": cupy, else pycuda
    d_hu = k.to_device(volume.hu)                      # or any device array of the backend
    d_cube = k.resample(d_hu, volume.z_mm, (128, 128, 128), mode="area", isotropic=True,
                        pixel_spacing_mm=volume.pixel_spacing_mm, window=SEGMENTER_WINDOW)
    d_x = k.classifier_inputs(d_hu, d_mask, slice_indices, 224)      # (N, 3, 224, 224) on device
    d_w = k.mask_weights(d_x, (7, 7), channel=1)                       # reads channel 1 in place
    d_p = k.masked_gap(d_features, d_w)                                # (N, C)

Every method takes and returns device arrays of the backend (``cupy.ndarray`` or
``pycuda.gpuarray.GPUArray``; NumPy inputs are uploaded for convenience), so a GPU pipeline chains
kernels and TensorRT engines without host copies. Nothing is imported, compiled or touched on the
GPU until a :class:`GpuKernels` is constructed.

Module loading, per translation unit: a cubin from ``cubin_dir`` (built by
``python -m sdk.kernels.build``) for the device's ``sm_XY`` when given and loadable; otherwise the
source is compiled for the device at first use - NVRTC through CuPy (cached by CuPy per source,
options, architecture and NVRTC version) or pycuda's ``SourceModule`` (nvcc on the target; cached
per source, options, architecture and nvcc version). Failures are collected and reported together.
Launches go to the backend's current/default stream (``stream=`` to pass one).

Context and memory: both backends work in the device's primary CUDA context, the one ONNX Runtime
and the CUDA runtime API use, so device pointers pass between ctsdk kernels, CuPy, torch and ORT.
CuPy allocates from its memory pool; the pycuda backend retains the primary context, pushes it
only for the duration of each call (nothing stays on a thread's context stack, so no "context stack
was not empty" abort at exit) and allocates from a per-device ``DeviceMemoryPool`` released at exit
(:func:`sdk.runtime.gpu.pycuda_primary_context`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._lazy import available
from ..errors import ConfigError, KernelError, MissingDependencyError
from ..preprocessing import CLASSIFIER_WINDOW
from . import sources as S

__all__ = ["GpuKernels", "gpu_backends", "BLOCK"]

BLOCK = 256  # threads per block for every kernel (8 warps)


def gpu_backends() -> Dict[str, str]:
    """Which launch backends are importable here (no import, no CUDA call): name -> '' or why not."""
    out = {}
    for name in ("cupy", "pycuda"):
        out[name] = "" if available(name) else f"{name} is not installed"
    return out


# --- backends -------------------------------------------------------------------------------------
class _Backend:
    name = ""

    def arch(self) -> str: ...
    def driver_version(self) -> int: ...
    def device_name(self) -> str: ...
    def module_from_cubin(self, path: Path) -> Any: ...
    def module_from_source(self, src: str, arch: str) -> Any: ...
    def function(self, module: Any, name: str) -> Any: ...
    def launch(self, fn: Any, grid: Tuple[int, ...], block: Tuple[int, ...], args: Sequence[Any], shared: int) -> None: ...
    def to_device(self, a: np.ndarray) -> Any: ...
    def empty(self, shape: Tuple[int, ...], dtype: Any) -> Any: ...
    def to_host(self, a: Any) -> np.ndarray: ...
    def is_device(self, a: Any) -> bool: ...
    def ptr(self, a: Any) -> int: ...
    def synchronize(self) -> None: ...
    def active(self) -> Any: ...


class _CupyBackend(_Backend):
    name = "cupy"

    def __init__(self, device: int, stream: Any = None):
        import cupy  # lazy: optional dependency

        self.cp = cupy
        self.device = cupy.cuda.Device(device)
        self.device.use()
        self.stream = stream

    def arch(self) -> str:
        return f"sm_{self.device.compute_capability}"

    def driver_version(self) -> int:
        return int(self.cp.cuda.runtime.driverGetVersion())

    def device_name(self) -> str:
        props = self.cp.cuda.runtime.getDeviceProperties(self.device.id)
        name = props.get("name", b"")
        return name.decode() if isinstance(name, bytes) else str(name)

    def module_from_cubin(self, path: Path) -> Any:
        return self.cp.RawModule(path=str(path))

    def module_from_source(self, src: str, arch: str) -> Any:
        return self.cp.RawModule(code=src, options=("-std=c++17",), backend="nvrtc")

    def function(self, module: Any, name: str) -> Any:
        return module.get_function(name)

    def launch(self, fn, grid, block, args, shared) -> None:
        if self.stream is not None:
            with self.stream:
                fn(grid, block, tuple(args), shared_mem=shared)
        else:
            fn(grid, block, tuple(args), shared_mem=shared)

    def to_device(self, a: np.ndarray) -> Any:
        return self.cp.asarray(np.ascontiguousarray(a))

    def empty(self, shape, dtype) -> Any:
        return self.cp.empty(shape, dtype=dtype)

    def to_host(self, a: Any) -> np.ndarray:
        return self.cp.asnumpy(a)

    def is_device(self, a: Any) -> bool:
        return isinstance(a, self.cp.ndarray)

    def ptr(self, a: Any) -> int:
        if not a.flags.c_contiguous:
            raise ConfigError(f"kernel input of shape {a.shape} must be C-contiguous (use cupy.ascontiguousarray)")
        return int(a.data.ptr)

    def synchronize(self) -> None:
        self.device.synchronize()

    def active(self) -> Any:
        return self.device


class _PycudaBackend(_Backend):
    """pycuda on the device's *primary* context (the one the CUDA runtime API, CuPy and ONNX Runtime
    use), pushed around each call and popped after it, so no context is left on any thread's stack
    (pycuda aborts at exit when one is); device buffers come from one
    :class:`pycuda.tools.DeviceMemoryPool` per device (no cuMemAlloc per call); launches use
    prepared calls (no per-call argument parsing)."""

    name = "pycuda"

    def __init__(self, device: int, stream: Any = None):
        import pycuda.driver as drv  # lazy: optional dependency
        import pycuda.gpuarray as gpuarray

        from ..runtime.gpu import pycuda_primary_context

        self.drv, self.gpuarray = drv, gpuarray
        self.pctx = pycuda_primary_context(device)
        self.dev = self.pctx.device
        self.alloc = self.pctx.pool.allocate
        self.stream = stream
        self._prepared: Dict[int, str] = {}

    def active(self) -> Any:
        return self.pctx.active()

    def arch(self) -> str:
        major, minor = self.dev.compute_capability()
        return f"sm_{major}{minor}"

    def driver_version(self) -> int:
        return int(self.drv.get_driver_version())

    def device_name(self) -> str:
        return str(self.dev.name())

    def module_from_cubin(self, path: Path) -> Any:
        with self.active():
            return self.drv.module_from_buffer(Path(path).read_bytes())

    def module_from_source(self, src: str, arch: str) -> Any:
        # nvcc on the target: pycuda's SourceModule (cached by pycuda); otherwise NVRTC via
        # cuda-bindings, cached per source, arch, NVRTC and driver version (sdk.kernels.nvrtc)
        from .build import find_nvcc

        with self.active():
            if find_nvcc() is not None:
                from pycuda.compiler import SourceModule

                return SourceModule(src, no_extern_c=True, arch=arch, options=["-std=c++17"])
            from .nvrtc import compile_cubin

            return self.drv.module_from_buffer(compile_cubin(src, arch))

    def function(self, module: Any, name: str) -> Any:
        with self.active():
            return module.get_function(name)

    def launch(self, fn, grid, block, args, shared) -> None:
        fmt = launch_format(args)
        if self._prepared.get(id(fn)) != fmt:
            fn.prepare(fmt)
            self._prepared[id(fn)] = fmt
        values = [int(a) if np.dtype(type(a)).kind in "iu" else float(a) for a in args]
        with self.active():
            fn.prepared_async_call(tuple(grid), tuple(block), self.stream, *values, shared_size=int(shared))

    def to_device(self, a: np.ndarray) -> Any:
        with self.active():
            return self.gpuarray.to_gpu(np.ascontiguousarray(a), allocator=self.alloc)

    def empty(self, shape, dtype) -> Any:
        with self.active():
            return self.gpuarray.empty(tuple(int(s) for s in shape), dtype=dtype, allocator=self.alloc)

    def to_host(self, a: Any) -> np.ndarray:
        with self.active():
            return a.get()

    def is_device(self, a: Any) -> bool:
        return isinstance(a, self.gpuarray.GPUArray)

    def ptr(self, a: Any) -> int:
        if not a.flags.c_contiguous:
            raise ConfigError(f"kernel input of shape {a.shape} must be C-contiguous")
        return int(a.gpudata)

    def synchronize(self) -> None:
        with self.active():
            self.drv.Context.synchronize()


def launch_format(args: Sequence[Any]) -> str:
    """pycuda ``Function.prepare`` format of a launch's arguments (NumPy scalars: ``Q`` pointers /
    uint64, ``q`` int64, ``i`` int32, ``f`` float32, ``d`` float64)."""
    chars = {"uint64": "Q", "int64": "q", "int32": "i", "uint32": "I", "float32": "f", "float64": "d"}
    out = []
    for i, a in enumerate(args):
        name = np.dtype(type(a)).name if isinstance(a, np.generic) else ""
        if name not in chars:
            raise ConfigError(f"kernel argument {i} must be a NumPy scalar of {sorted(chars)}, not {type(a).__name__}")
        out.append(chars[name])
    return "".join(out)


#: backend="auto" tries these in order: CuPy first (measured 2-3x faster per call than pycuda on an
#: H200, docs/kernels.md), then pycuda; ``GpuKernels.backend`` says which one runs
_BACKENDS = {"cupy": _CupyBackend, "pycuda": _PycudaBackend}


def _open_backend(backend: str, device: int, stream: Any) -> _Backend:
    if backend == "auto" and os.environ.get("CTSDK_GPU_BACKEND"):
        backend = os.environ["CTSDK_GPU_BACKEND"].strip().lower()  # an operator's explicit choice
    if backend not in ("auto", *_BACKENDS):
        raise ConfigError(f"GpuKernels: backend must be 'auto', 'pycuda' or 'cupy' (also via $CTSDK_GPU_BACKEND), "
                          f"not {backend!r}")
    names = list(_BACKENDS) if backend == "auto" else [backend]
    failures: List[str] = []
    for name in names:
        if not available(name):
            failures.append(f"{name}: not installed")
            continue
        try:
            return _BACKENDS[name](device, stream)
        except Exception as exc:  # noqa: BLE001 - reported below, with every other backend's failure
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    if all(f.endswith("not installed") for f in failures):
        raise MissingDependencyError(
            "pycuda or cupy", "the ctsdk CUDA kernels (" + "; ".join(failures) + ")", "gpu"
        )
    raise KernelError("no CUDA backend could start: " + "; ".join(failures))


# --- the bindings -------------------------------------------------------------------------------------
class GpuKernels:
    """The ctsdk CUDA kernels on one device (see the module docstring).

    Args:
        backend: ``"auto"`` (``$CTSDK_GPU_BACKEND`` when set, else CuPy, else pycuda), ``"cupy"``
            or ``"pycuda"``.
        device: CUDA device ordinal.
        cubin_dir: a folder from ``python -m sdk.kernels.build`` (``<stem>.<sm_XY>.cubin``) to try
            before compiling the sources.
        stream: a backend stream to launch on (default: the current/default stream).
    """

    def __init__(self, backend: str = "auto", device: int = 0, cubin_dir: Optional[Path] = None,
                 stream: Any = None):
        self._b = _open_backend(backend, int(device), stream)
        self.backend = self._b.name
        self.arch = self._b.arch()
        self.load_log: List[str] = []
        self._fns: Dict[str, Any] = {}
        for unit in S.KERNEL_FILES:
            self._fns.update(self._load(unit, cubin_dir))

    def _functions(self, module: Any, unit: str) -> Dict[str, Any]:
        # CuPy compiles / loads lazily: fetching the functions is what surfaces a failure
        return {fn: self._b.function(module, fn) for fn in S.KERNEL_FUNCTIONS[unit]}

    def _load(self, unit: str, cubin_dir: Optional[Path]) -> Dict[str, Any]:
        tried: List[str] = []
        if cubin_dir is not None:
            path = Path(cubin_dir) / f"{Path(unit).stem}.{self.arch}.cubin"
            if path.is_file():
                try:
                    fns = self._functions(self._b.module_from_cubin(path), unit)
                    self.load_log.append(f"{unit}: cubin {path}")
                    return fns
                except Exception as exc:  # noqa: BLE001 - falls back to source, reported if that fails too
                    tried.append(f"cubin {path}: {type(exc).__name__}: {exc}")
            else:
                tried.append(f"cubin {path}: not found")
        try:
            fns = self._functions(self._b.module_from_source(S.read_source(unit), self.arch), unit)
            self.load_log.append(f"{unit}: compiled from source ({self.backend}, {self.arch})"
                                 + (f" after {'; '.join(tried)}" if tried else ""))
            return fns
        except Exception as exc:  # noqa: BLE001
            tried.append(f"source via {self.backend}: {type(exc).__name__}: {exc}")
        raise KernelError(f"{S.KERNEL_DIR / unit}: cannot load the kernels for {self.arch}: " + "; ".join(tried))

    def describe(self) -> Dict[str, Any]:
        """Backend, device, arch, driver version, context/memory model and how each module was
        loaded (JSON-safe)."""
        memory = "cupy memory pool" if self.backend == "cupy" else "pycuda DeviceMemoryPool"
        return {"backend": self.backend, "device": self._b.device_name(), "arch": self.arch,
                "driver_version": self._b.driver_version(), "context": "primary", "memory": memory,
                "modules": list(self.load_log)}

    # --- array helpers ---------------------------------------------------------------------------
    def to_device(self, a: np.ndarray) -> Any:
        return self._b.to_device(np.asarray(a))

    def to_host(self, a: Any) -> np.ndarray:
        return self._b.to_host(a)

    def synchronize(self) -> None:
        self._b.synchronize()

    def _dev(self, a: Any, dtype: Any, what: str) -> Any:
        if self._b.is_device(a):
            if np.dtype(a.dtype) != np.dtype(dtype):
                raise ConfigError(f"{what}: device array must be {np.dtype(dtype)}, not {a.dtype}")
            return a
        return self._b.to_device(np.ascontiguousarray(a, dtype=dtype))

    def _launch(self, name: str, grid: Tuple[int, ...], args: Sequence[Any], shared: int = 0) -> None:
        try:
            self._b.launch(self._fns[name], grid, (BLOCK, 1, 1), args, shared)
        except Exception as exc:  # noqa: BLE001 - a driver error becomes a typed one
            raise KernelError(f"launching {name} (grid {grid}) on {self.arch} failed: {exc}") from exc

    @staticmethod
    def _grid1d(total: int) -> int:
        return max(1, min(int(math.ceil(total / BLOCK)), 65535 * 8))

    # --- kernels ---------------------------------------------------------------------------------
    def resample(
        self,
        dev_hu: Any,
        z_mm: Any,
        out_shape: Sequence[int] = (128, 128, 128),
        mode: str = "linear",
        isotropic: bool = False,
        pixel_spacing_mm: Optional[Sequence[float]] = None,
        fill_hu: float = -1024.0,
        window: Optional[Tuple[float, float]] = None,
        slice_thickness_mm: Optional[float] = None,
        out_dtype: str = "float32",
    ) -> Any:
        """Resample a device (z, y, x) int16/float32 volume; contract of
        :func:`sdk.volume.resample.resample_volume`. ``z_mm`` may be host or device (it is tiny and
        the geometry is computed on the host). Returns a device array of ``out_dtype``."""
        if not self._b.is_device(dev_hu):
            dev_hu = self._b.to_device(np.asarray(dev_hu))
        dt = np.dtype(dev_hu.dtype)
        if dt not in (np.dtype(np.int16), np.dtype(np.float32)) or len(dev_hu.shape) != 3:
            raise ConfigError(f"resample kernel: hu must be (z, y, x) int16 or float32, not {dt} {dev_hu.shape}")
        if out_dtype not in ("float32", "float16"):
            raise ConfigError(f"resample kernel: out_dtype must be 'float32' or 'float16', not {out_dtype!r}")
        z = self._b.to_host(z_mm) if self._b.is_device(z_mm) else np.asarray(z_mm)
        g = S.resample_geometry(tuple(dev_hu.shape), z, out_shape, isotropic, pixel_spacing_mm, slice_thickness_mm)
        m = S.check_mode(mode)
        windowed, lo, hi = S.check_window(window)
        d_z = self._b.to_device(g.z_centres)
        half = out_dtype == "float16"
        out = self._b.empty(g.out_shape, np.float16 if half else np.float32)
        name = f"ct_resample3d_{'i16' if dt == np.int16 else 'f32'}_{'f16' if half else 'f32'}"
        i32, f32, f64 = np.int32, np.float32, np.float64
        args = [
            np.uint64(self._b.ptr(dev_hu)), *(i32(v) for v in dev_hu.shape), np.uint64(self._b.ptr(d_z)),
            *(f64(v) for v in g.spacing), *(i32(v) for v in g.out_shape),
            f64(g.out_lo[0]), f64(g.out_len[0]), f64(g.out_lo[1]), f64(g.out_len[1]), f64(g.out_lo[2]), f64(g.out_len[2]),
            i32(m), f32(fill_hu), i32(windowed), f32(lo), f32(hi), np.uint64(self._b.ptr(out)),
        ]
        self._launch(name, (self._grid1d(int(np.prod(g.out_shape))), 1, 1), args)
        self._keep = d_z  # keep the z buffer alive until the next call (async launch)
        return out

    def classifier_inputs(self, dev_hu: Any, dev_mask: Any, slice_indices: Any, size: int = 224,
                          window: Tuple[float, float] = CLASSIFIER_WINDOW) -> Any:
        """(N, 3, S, S) float32 device batch (grey, mask, grey × mask) from a device volume and a
        device uint8 lung mask of the same shape; contract of
        :func:`sdk.volume.resample.classifier_inputs`."""
        if not self._b.is_device(dev_hu):
            dev_hu = self._b.to_device(np.asarray(dev_hu))
        dt = np.dtype(dev_hu.dtype)
        if dt not in (np.dtype(np.int16), np.dtype(np.float32)) or len(dev_hu.shape) != 3:
            raise ConfigError(f"classifier_inputs kernel: hu must be (z, y, x) int16 or float32, not {dt}")
        if not self._b.is_device(dev_mask):
            dev_mask = np.asarray(dev_mask) != 0
        mask = self._dev(dev_mask, np.uint8, "classifier_inputs kernel: lung_mask")
        if tuple(mask.shape) != tuple(dev_hu.shape):
            raise ConfigError(f"classifier_inputs kernel: lung_mask shape {tuple(mask.shape)} differs from hu {tuple(dev_hu.shape)}")
        idx = self._b.to_host(slice_indices) if self._b.is_device(slice_indices) else np.asarray(slice_indices)
        idx = np.ascontiguousarray(idx, dtype=np.int32).reshape(-1)
        nz = int(dev_hu.shape[0])
        if idx.size and (idx.min() < 0 or idx.max() >= nz):
            raise ConfigError(f"classifier_inputs kernel: slice indices must be in [0, {nz - 1}]")
        _, lo, hi = S.check_window(window)
        s = int(size)
        out = self._b.empty((idx.size, 3, s, s), np.float32)
        if idx.size == 0:
            return out
        d_idx = self._b.to_device(idx)
        i32, f32 = np.int32, np.float32
        args = [np.uint64(self._b.ptr(dev_hu)), np.uint64(self._b.ptr(mask)), *(i32(v) for v in dev_hu.shape),
                np.uint64(self._b.ptr(d_idx)), i32(idx.size), i32(s), f32(lo), f32(hi), np.uint64(self._b.ptr(out))]
        name = f"ct_classifier_inputs_{'i16' if dt == np.int16 else 'f32'}"
        self._launch(name, (self._grid1d(s * s), idx.size, 1), args)
        self._keep = (d_idx, mask)
        return out

    def mask_weights(self, dev_mask: Any, grid_hw: Sequence[int] = (7, 7), channel: Optional[int] = None) -> Any:
        """(N, 1, h, w) float32 pooling weights from a device float32 mask (N, 1, H, W) - or, with
        ``channel``, from that channel of an (N, C, H, W) buffer such as the classifier input,
        read in place. Contract of :func:`sdk.pooling.mask_weights`."""
        m = self._dev(dev_mask, np.float32, "mask_weights kernel: mask")
        if len(m.shape) != 4 or (channel is None and m.shape[1] != 1):
            raise ConfigError(f"mask_weights kernel: expected (N, 1, H, W) (or channel=), not {tuple(m.shape)}")
        n, ch, H, W = (int(v) for v in m.shape)
        c = 0 if channel is None else int(channel)
        if not 0 <= c < ch:
            raise ConfigError(f"mask_weights kernel: channel {c} out of range for {ch} channels")
        gh, gw = (int(v) for v in grid_hw)
        if gh < 1 or gw < 1 or gh * gw > 4096:
            raise ConfigError(f"mask_weights kernel: grid_hw must be positive with h*w <= 4096, not {tuple(grid_hw)}")
        out = self._b.empty((n, 1, gh, gw), np.float32)
        base = self._b.ptr(m) + c * H * W * 4
        args = [np.uint64(base), np.int64(ch * H * W), np.int32(n), np.int32(H), np.int32(W), np.int32(gh),
                np.int32(gw), np.uint64(self._b.ptr(out))]
        self._launch("ct_mask_weights", (n, 1, 1), args, shared=2 * gh * gw * 4)
        self._keep = m
        return out

    def masked_gap(self, dev_features: Any, dev_weights: Any) -> Any:
        """(N, C) float32 ``sum_hw f · w`` from device features (N, C, h, w) float32/float16 and
        weights (N, 1, h, w) float32 (FP32 accumulation). Contract of :func:`sdk.pooling.masked_gap`."""
        f = dev_features if self._b.is_device(dev_features) else self._b.to_device(np.asarray(dev_features))
        dt = np.dtype(f.dtype)
        if dt not in (np.dtype(np.float32), np.dtype(np.float16)) or len(f.shape) != 4:
            raise ConfigError(f"masked_gap kernel: features must be (N, C, h, w) float32/float16, not {dt} {tuple(f.shape)}")
        w = self._dev(dev_weights, np.float32, "masked_gap kernel: weights")
        n, c, h, wd = (int(v) for v in f.shape)
        if int(np.prod(w.shape)) != n * h * wd:
            raise ConfigError(f"masked_gap kernel: weights {tuple(w.shape)} do not match features {tuple(f.shape)}")
        out = self._b.empty((n, c), np.float32)
        warps = BLOCK // 32
        args = [np.uint64(self._b.ptr(f)), np.uint64(self._b.ptr(w)), np.int32(n), np.int32(c), np.int32(h * wd),
                np.uint64(self._b.ptr(out))]
        name = "ct_masked_gap_f16" if dt == np.float16 else "ct_masked_gap_f32"
        self._launch(name, (int(math.ceil(c / warps)), n, 1), args, shared=h * wd * 4)
        self._keep = w
        return out
