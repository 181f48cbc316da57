"""What GPU (if any) this process can use, without importing heavy packages at import time.

``gpu_info()`` asks, in order: cuda-python's runtime API, pycuda, ``nvidia-smi``. It returns
``None`` when no NVIDIA GPU is visible, and never creates a CUDA context as a side effect of
``import sdk``.
"""
from __future__ import annotations

import functools
import logging
import shutil
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional

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


__all__ = ["GpuInfo", "gpu_info", "gpu_reasons"]
