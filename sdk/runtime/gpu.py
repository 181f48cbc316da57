"""What GPU (if any) this process can use, without importing heavy packages at import time, and
the one place that manages pycuda's CUDA context.

``gpu_info()`` asks, in order: cuda-python's runtime API, ``nvidia-smi``. It returns ``None`` when
no NVIDIA GPU is visible, and never creates a CUDA context as a side effect of ``import sdk``.

``pycuda_primary_context(device)`` is the device's *primary* context seen through pycuda (the
context the CUDA runtime API, CuPy, torch and ONNX Runtime use): retained once per process and
device, resident (pushed) on the thread that first used it, pushed around calls on other threads,
with one ``pycuda.tools.DeviceMemoryPool``; at exit its held blocks are freed, pycuda's context
caches cleared and the resident push popped. pycuda aborts the process at exit ("The context
stack was not empty upon module cleanup", exit 134) when a context is left pushed, and throws
from destructors (std::terminate) when an object is freed with no current context: the resident
push avoids the second, the pop at exit the first.
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
    """The primary context of one device through pycuda, plus its memory pool (see module doc).

    Like ``pycuda.autoprimaryctx``, the primary context is pushed once on the thread that creates
    this object and stays current there for the life of the process, so pycuda objects that the
    garbage collector frees on that thread (device allocations, modules) always find their context;
    other threads push it for the duration of a call (:meth:`active`). At exit (``atexit``) the pool
    stops holding blocks (its held ones are freed), pycuda's caches are cleared and the resident push
    popped, before pycuda's own module cleanup checks that the context stack is empty (it aborts the
    process otherwise).

    Why *stop* holding rather than only free the held blocks: device arrays still alive at exit are
    garbage-collected after the pop. Returned to a pool that still holds blocks, the first one makes
    the pool "start holding", which captures the *current* context - there is none by then, pycuda
    throws inside a destructor and the process aborts ("explicit_context_dependent failed: invalid
    device context", the H200 run of 2026-12-04; pycuda issue #163). A pool that stopped holding
    frees each returned block at once through its allocator, which activates the (still valid)
    primary context for the call."""

    def __init__(self, index: int) -> None:
        import pycuda.driver as drv  # lazy: optional dependency
        from pycuda.tools import DeviceMemoryPool

        drv.init()
        self.drv = drv
        self.index = int(index)
        self.device = drv.Device(self.index)
        self.context = self.device.retain_primary_context()
        self.context.push()  # resident on the creating thread (popped in close())
        self.owner = threading.get_ident()
        self.pool = DeviceMemoryPool()
        self.closed = False

    def _current(self) -> bool:
        cur = self.drv.Context.get_current()
        return cur is not None and cur == self.context

    @contextlib.contextmanager
    def active(self) -> Iterator[Any]:
        """Make the primary context current for the body: a no-op where it already is (the owner
        thread, or nested calls); elsewhere pushed and popped on the way out."""
        if self._current():
            yield self.context
            return
        self.context.push()
        try:
            yield self.context
        finally:
            self.drv.Context.pop()

    def close(self) -> None:
        """Free the pool's held blocks, clear pycuda's context caches and pop the resident push
        (idempotent; at exit)."""
        if self.closed:
            return
        self.closed = True
        try:
            with self.active():
                self.drv.Context.synchronize()
                self.pool.stop_holding()  # frees the held blocks; later returns are freed at once (class doc)
            from pycuda.tools import clear_context_caches

            clear_context_caches()
        except Exception as exc:  # noqa: BLE001 - at exit: report, never raise
            log.warning("pycuda primary context %d: cleanup failed: %s", self.index, exc)
        try:
            if threading.get_ident() == self.owner and self._current():
                self.drv.Context.pop()
        except Exception as exc:  # noqa: BLE001
            log.warning("pycuda primary context %d: pop at exit failed: %s", self.index, exc)


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
