"""What GPU (if any) this process can use, without importing heavy packages at import time, and
the one place that manages pycuda's CUDA context.

``gpu_info()`` asks, in order: cuda-python's runtime API, ``nvidia-smi``. It returns ``None`` when
no NVIDIA GPU is visible, and never creates a CUDA context as a side effect of ``import sdk``.

``pycuda_primary_context(device)`` is the device's *primary* context seen through pycuda (the
context the CUDA runtime API, CuPy, torch and ONNX Runtime use): retained once per process and
device, pushed only inside ``with ctx.active():`` and popped on the way out, with one
``pycuda.tools.DeviceMemoryPool``; at exit its held blocks are freed and pycuda's context caches
cleared. pycuda aborts the process at exit ("The context stack was not empty upon module
cleanup", exit 134) when a context is left pushed; with push/pop per call none ever is.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import shutil
import subprocess
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

log = logging.getLogger("sdk.runtime")


@dataclass(frozen=True)
class GpuInfo:
    """One GPU: its name, compute capability ("9.0"), driver version and how it was found."""

    name: str
    compute_capability: str
    driver: str = ""
    index: int = 0
    source: str = ""

    def to_dict(self) -> Dict[str, object]:
        return dict(self.__dict__)


def _from_cuda_python(index: int) -> Optional[GpuInfo]:
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[import-not-found,no-redef]
        except ImportError:
            return None
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count <= index:
        return None
    err, prop = cudart.cudaGetDeviceProperties(index)
    if int(err) != 0:
        return None
    err, drv = cudart.cudaDriverGetVersion()
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    name = name.rstrip("\x00")
    driver = f"{drv // 1000}.{(drv % 1000) // 10}" if int(err) == 0 else ""
    return GpuInfo(name, f"{prop.major}.{prop.minor}", driver, index, "cuda-python")


def _from_nvidia_smi(index: int) -> Optional[GpuInfo]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [r.split(",") for r in out.strip().splitlines() if r.strip()]
    if len(rows) <= index or len(rows[index]) < 3:
        return None
    name, cc, drv = (c.strip() for c in rows[index][:3])
    return GpuInfo(name, cc, drv, index, "nvidia-smi")


@functools.lru_cache(maxsize=8)
def gpu_info(index: int = 0) -> Optional[GpuInfo]:
    """The GPU at ``index`` or None (no driver, no device, no query tool)."""
    for probe in (_from_cuda_python, _from_nvidia_smi):
        try:
            info = probe(index)
        except Exception as exc:  # a broken driver install must not break CPU inference
            log.debug("GPU probe %s failed: %s", probe.__name__, exc)
            continue
        if info is not None:
            return info
    return None


def gpu_reasons() -> List[str]:
    """Why no GPU is usable (empty when one is)."""
    if gpu_info() is not None:
        return []
    return ["no NVIDIA GPU visible (cuda-python found no device and nvidia-smi is absent or lists none)"]


def device_memory(index: int = 0) -> Optional[Tuple[int, int]]:
    """``(free, total)`` bytes of GPU ``index`` (cudaMemGetInfo through cuda-python or CuPy; creates
    or uses the primary context), or None when neither can tell."""
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]

        (err,) = cudart.cudaSetDevice(index)
        if int(err) != 0:
            raise RuntimeError(f"cudaSetDevice({index}): {err}")
        err, free, total = cudart.cudaMemGetInfo()
        if int(err) == 0:
            return int(free), int(total)
    except Exception as exc:  # noqa: BLE001 - optional probe; try the next one
        log.debug("cudaMemGetInfo via cuda-python failed: %s", exc)
    try:
        import cupy  # type: ignore[import-not-found]

        with cupy.cuda.Device(index):
            free, total = cupy.cuda.runtime.memGetInfo()
        return int(free), int(total)
    except Exception as exc:  # noqa: BLE001
        log.debug("memGetInfo via CuPy failed: %s", exc)
    return None


class PycudaPrimaryContext:
    """The primary context of one device through pycuda, plus its memory pool (see module doc)."""

    def __init__(self, index: int) -> None:
        import pycuda.driver as drv  # lazy: optional dependency
        from pycuda.tools import DeviceMemoryPool

        drv.init()
        self.drv = drv
        self.index = int(index)
        self.device = drv.Device(self.index)
        self.context = self.device.retain_primary_context()
        with self.active():
            self.pool = DeviceMemoryPool()
        self.closed = False

    @contextlib.contextmanager
    def active(self) -> Iterator[Any]:
        """Push the primary context for the body, pop it after (nestable, any thread)."""
        self.context.push()
        try:
            yield self.context
        finally:
            self.drv.Context.pop()

    def close(self) -> None:
        """Free the pool's held blocks and clear pycuda's context caches (idempotent; at exit)."""
        if self.closed:
            return
        self.closed = True
        try:
            with self.active():
                self.drv.Context.synchronize()
                self.pool.stop_holding()
            from pycuda.tools import clear_context_caches

            clear_context_caches()
        except Exception as exc:  # noqa: BLE001 - at exit: report, never raise
            log.warning("pycuda primary context %d: cleanup failed: %s", self.index, exc)


_PYCUDA: Dict[int, PycudaPrimaryContext] = {}
_PYCUDA_LOCK = threading.Lock()


def pycuda_primary_context(index: int = 0) -> PycudaPrimaryContext:
    """The process-wide :class:`PycudaPrimaryContext` of device ``index`` (created on first use;
    closed by an ``atexit`` hook)."""
    with _PYCUDA_LOCK:
        ctx = _PYCUDA.get(int(index))
        if ctx is None or ctx.closed:
            ctx = PycudaPrimaryContext(int(index))
            _PYCUDA[int(index)] = ctx
            atexit.register(ctx.close)
        return ctx


__all__ = ["GpuInfo", "PycudaPrimaryContext", "device_memory", "gpu_info", "gpu_reasons", "pycuda_primary_context"]
