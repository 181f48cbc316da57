"""Compile the kernel sources to a cubin with NVRTC (``cuda-bindings`` + ``nvidia-cuda-nvrtc``), no
GPU and no nvcc needed; results are cached per source, architecture, NVRTC version and (when
given) driver version. Used by the pycuda backend where the target has no nvcc, and by the tests
to prove the sources build with the runtime compiler.

``cuda.bindings`` is imported lazily, inside the functions.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Tuple

from .._lazy import available
from ..errors import KernelError, MissingDependencyError
from . import sources as S

__all__ = ["nvrtc_available", "nvrtc_version", "compile_cubin", "cached_cubin"]

OPTIONS: Tuple[str, ...] = ("-std=c++17",)


def nvrtc_available() -> bool:
    """True when ``cuda.bindings.nvrtc`` is importable (the NVRTC library may still be missing)."""
    return available("cuda.bindings")


def _nvrtc():
    try:
        from cuda.bindings import nvrtc  # lazy: optional dependency
    except ImportError as exc:
        raise MissingDependencyError("cuda-bindings nvidia-cuda-nvrtc", "compiling the kernels with NVRTC", "gpu") from exc
    return nvrtc


def _check(result, what: str):
    err, *rest = result
    if int(err) != 0:
        raise KernelError(f"NVRTC {what} failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def nvrtc_version() -> str:
    """NVRTC library version 'major.minor'; MissingDependencyError when the library cannot load."""
    nvrtc = _nvrtc()
    try:
        result = nvrtc.nvrtcVersion()
    except Exception as exc:  # noqa: BLE001 - the shared library itself is missing
        raise MissingDependencyError("nvidia-cuda-nvrtc", f"compiling the kernels with NVRTC ({exc})") from exc
    major, minor = _check(result, "version")
    return f"{major}.{minor}"


def compile_cubin(src: str, arch: str, name: str = "kernel.cu", options: Sequence[str] = OPTIONS) -> bytes:
    """NVRTC-compile one self-contained source (see :func:`sources.read_source`) to a cubin for
    ``arch`` (e.g. ``"sm_87"``). Raises KernelError with the compile log on failure."""
    nvrtc = _nvrtc()
    nvrtc_version()  # a missing NVRTC library becomes MissingDependencyError
    prog = _check(nvrtc.nvrtcCreateProgram(src.encode(), name.encode(), 0, [], []), "create")
    try:
        opts = [f"-arch={arch}".encode(), *(o.encode() for o in options)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if int(err) != 0:
            size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "log size")
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise KernelError(f"{name}: NVRTC compile for {arch} failed: {err}\n{log.decode(errors='replace')[-4000:]}")
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "cubin size")
        buf = b" " * size
        _check((nvrtc.nvrtcGetCUBIN(prog, buf)[0], None), "get cubin")
        return bytes(buf)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def cached_cubin(unit: str, arch: str, driver_version: Optional[int] = None) -> Path:
    """Cubin of ``kernels/<unit>`` for ``arch``, compiled with NVRTC on first use and cached under
    :func:`sources.cache_dir` keyed by source, arch, NVRTC version and driver version."""
    src = S.read_source(unit)
    key = hashlib.sha256("\0".join([src, arch, nvrtc_version(), str(driver_version), *OPTIONS]).encode()).hexdigest()[:16]
    path = S.cache_dir() / f"nvrtc-{Path(unit).stem}.{arch}.{key}.cubin"
    if path.exists():
        return path
    data = compile_cubin(src, arch, unit)
    fd, tmp = tempfile.mkstemp(suffix=".cubin", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return path
