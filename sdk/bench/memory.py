"""Peak memory of one measured call, sampled in a background thread.

Decision (documented in docs/benchmarks/cpu.md): every runtime runs in ONE process so their
latencies are interleaved and comparable, so memory cannot come from ``getrusage`` (its
``ru_maxrss`` is a process-lifetime high-water mark). Instead a daemon thread samples the
process RSS with psutil every ``interval_s`` (default 5 ms) while a call runs, and reports:

- ``peak_rss_mb``: the highest RSS seen during the call (includes every session already loaded
  in the process, by any runtime);
- ``delta_rss_mb``: that peak minus the RSS just before the call - the call's own working memory
  (volumes, activations, decoded pixels), comparable between runtimes in one process.

Before each call the freed heap is returned to the OS (``malloc_trim``, outside the timed
region), so the growth is not hidden by pages an earlier call left cached.
Allocations that live shorter than the interval can be missed, so peaks are lower bounds.
GPU memory (where a GPU exists) is the device-wide "used" figure from NVML, sampled the same way;
it includes other processes on that GPU.
"""
from __future__ import annotations

import ctypes
import threading
import time
from typing import Any, Dict, Optional

import psutil


class _Nvml:
    """Minimal NVML binding through ctypes: device-wide used memory of GPU 0 (bytes)."""

    class _MemInfo(ctypes.Structure):
        _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2() != 0:
            raise OSError("nvmlInit failed")
        self.handle = ctypes.c_void_p()
        if self.lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self.handle)) != 0:
            raise OSError("no GPU 0")

    def used_bytes(self) -> int:
        info = self._MemInfo()
        if self.lib.nvmlDeviceGetMemoryInfo(self.handle, ctypes.byref(info)) != 0:
            return 0
        return int(info.used)


_NVML: Optional[_Nvml] = None
_NVML_TRIED = False


def nvml() -> Optional[_Nvml]:
    """The NVML binding, or None where there is no NVIDIA driver (tried once per process)."""
    global _NVML, _NVML_TRIED
    if not _NVML_TRIED:
        _NVML_TRIED = True
        try:
            _NVML = _Nvml()
        except (OSError, AttributeError):
            _NVML = None
    return _NVML


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``), so that the next call's RSS
    growth reflects its own working set rather than what an earlier call left cached; a no-op
    where glibc is absent."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        try:
            _LIBC.malloc_trim(0)
        except AttributeError:
            pass


_LIBC: Any = None


def rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    return psutil.Process().memory_info().rss / 2**20


class PeakMemory:
    """Context manager sampling RSS (and GPU memory) while its block runs.

        with PeakMemory() as mem:
            run()
        mem.result()  # {"peak_rss_mb", "delta_rss_mb", "start_rss_mb", "gpu_peak_mb", "samples"}
    """

    def __init__(self, interval_s: float = 0.005, gpu: bool = True, trim: bool = True) -> None:
        self.interval_s = interval_s
        self.trim = trim
        self._proc = psutil.Process()
        self._gpu = nvml() if gpu else None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.start_rss = 0
        self.peak_rss = 0
        self.gpu_start = 0
        self.gpu_peak = 0
        self.samples = 0

    def _sample(self) -> None:
        rss = self._proc.memory_info().rss
        if rss > self.peak_rss:
            self.peak_rss = rss
        if self._gpu is not None:
            used = self._gpu.used_bytes()
            if used > self.gpu_peak:
                self.gpu_peak = used
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        if self.trim:
            trim_heap()
        self.start_rss = self._proc.memory_info().rss
        self.peak_rss = self.start_rss
        if self._gpu is not None:
            self.gpu_start = self.gpu_peak = self._gpu.used_bytes()
        self._thread = threading.Thread(target=self._loop, name="ctsdk-bench-mem", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()  # the end state counts too

    def result(self) -> Dict[str, Any]:
        mib = 2**20
        return {
            "start_rss_mb": round(self.start_rss / mib, 1),
            "peak_rss_mb": round(self.peak_rss / mib, 1),
            "delta_rss_mb": round((self.peak_rss - self.start_rss) / mib, 1),
            "gpu_peak_mb": round(self.gpu_peak / mib, 1) if self._gpu is not None else None,
            "gpu_delta_mb": round((self.gpu_peak - self.gpu_start) / mib, 1) if self._gpu is not None else None,
            "samples": self.samples,
        }


def measure(fn: Any, *args: Any, interval_s: float = 0.005, **kwargs: Any) -> "tuple[Any, float, Dict[str, Any]]":
    """Run ``fn(*args, **kwargs)`` under :class:`PeakMemory`; return (value, wall ms, memory)."""
    with PeakMemory(interval_s=interval_s) as mem:
        t0 = time.perf_counter()
        value = fn(*args, **kwargs)
        ms = (time.perf_counter() - t0) * 1000.0
    return value, ms, mem.result()


__all__ = ["PeakMemory", "measure", "rss_mb", "trim_heap", "nvml"]
