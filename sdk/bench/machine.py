"""What the benchmark ran on: CPU model, cores, RAM, GPU, library versions, machine load.

Everything here is read-only and cheap; nothing imports torch or onnxruntime (versions come from
package metadata), so describing the machine does not change its memory footprint.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Any, Dict, List, Optional

from ..pools import usable_cores  # noqa: F401 - part of this module's API (machine_info, bench)

# distributions whose versions matter for the numbers (pip names)
LIBRARIES = (
    "ctsdk", "numpy", "scipy", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "python-gdcm",
    "onnxruntime", "onnxruntime-gpu", "opencv-python-headless", "xgboost-cpu", "xgboost", "torch",
    "tensorrt", "pycuda", "cuda-python", "psutil", "matplotlib",
)


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> List[str]:
    """The SIMD flags that decide ONNX Runtime's kernels (AVX2, AVX-512 VNNI...), when listed."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512vnni", "avx_vnni", "amx_int8", "fma")
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def gpus() -> List[Dict[str, Any]]:
    """GPUs reported by nvidia-smi (name, memory, driver); [] when there is none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,driver_version,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            found.append({
                "name": parts[0],
                "memory_mb": _num(parts[1]),
                "driver": parts[2],
                "compute_capability": parts[3] if len(parts) > 3 else "",
            })
    return found


def library_versions(names: tuple = LIBRARIES) -> Dict[str, str]:
    """Installed versions of the packages that matter (absent ones are left out)."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def load_snapshot() -> Dict[str, Any]:
    """Load average and the CPU share taken by other processes right now (for the report)."""
    snap: Dict[str, Any] = {}
    try:
        snap["loadavg_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        snap["loadavg_1_5_15"] = None
    return snap


def busy_processes(top: int = 5, interval_s: float = 0.5) -> List[Dict[str, Any]]:
    """The other processes using the most CPU over ``interval_s`` (name, pid, cpu %).

    Reported so a reader can see whether the numbers were taken on a busy machine.
    """
    import psutil

    me = os.getpid()
    procs = []
    for p in psutil.process_iter(["pid", "name"]):
        if p.info["pid"] == me:
            continue
        try:
            p.cpu_percent(None)
            procs.append(p)
        except (psutil.Error, OSError):
            continue
    import time

    time.sleep(interval_s)
    rows = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except (psutil.Error, OSError):
            continue
        if pct >= 5.0:
            rows.append({"pid": p.info["pid"], "name": p.info["name"], "cpu_percent": round(pct, 1)})
    rows.sort(key=lambda r: -r["cpu_percent"])
    return rows[:top]


def machine_info() -> Dict[str, Any]:
    """CPU model, cores, RAM, GPUs, OS, Python and library versions (JSON-safe)."""
    import psutil

    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": usable_cores(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus(),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "libraries": library_versions(),
        "threads_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ORT_NUM_THREADS") if k in os.environ},
    }


def _num(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


__all__ = ["machine_info", "load_snapshot", "busy_processes", "cpu_model", "gpus", "library_versions", "usable_cores"]
