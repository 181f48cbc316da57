"""ctsdk CUDA kernels (installed as ``sdk.kernels``): resample + HU window, classifier inputs,
mask -> pooling weights, masked GAP.

- ``*.cu`` / ``ctsdk_common.cuh``: the kernels; all arithmetic in ``__host__ __device__`` functions.
- :class:`GpuKernels` (``sdk.kernels.gpu``): device-buffer bindings via pycuda or CuPy.
- :class:`CpuHarness` (``sdk.kernels.harness``): the same arithmetic compiled by g++, via ctypes.
- :func:`build_kernels` (= ``sdk.kernels.build.build``; ``python -m sdk.kernels.build``): nvcc PTX/cubin for
  sm_80/87/89/90.

Importing this package imports nothing heavy and never touches CUDA; the names below load their
module on first access. See docs/kernels.md.
"""
from __future__ import annotations

from sdk._lazy import lazy_exports

_LAZY = {
    "GpuKernels": "sdk.kernels.gpu",
    "gpu_backends": "sdk.kernels.gpu",
    "CpuHarness": "sdk.kernels.harness",
    "build_harness": "sdk.kernels.harness",
    "build_kernels": "sdk.kernels.build:build",
    "find_nvcc": "sdk.kernels.build",
    "ARCHS": "sdk.kernels.build",
    "KERNEL_FILES": "sdk.kernels.sources",
    "cache_dir": "sdk.kernels.sources",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
