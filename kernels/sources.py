"""Kernel sources, the user cache and the launch geometry shared by the GPU bindings and the CPU
harness. Pure Python (NumPy only): importing this touches no compiler and no CUDA."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError
from ..volume.resample import axis_grids

__all__ = [
    "KERNEL_DIR",
    "COMMON_HEADER",
    "KERNEL_FILES",
    "KERNEL_FUNCTIONS",
    "cache_dir",
    "read_source",
    "sources_hash",
    "ResampleGeometry",
    "resample_geometry",
    "MODES",
]

KERNEL_DIR = Path(__file__).resolve().parent
COMMON_HEADER = "ctsdk_common.cuh"
#: the .cu translation units nvcc / NVRTC compile (each includes COMMON_HEADER)
KERNEL_FILES: Tuple[str, ...] = ("resample.cu", "mask_weights.cu", "masked_gap.cu")
#: extern "C" entry points per translation unit
KERNEL_FUNCTIONS = {
    "resample.cu": (
        "ct_resample3d_i16_f32", "ct_resample3d_i16_f16", "ct_resample3d_f32_f32", "ct_resample3d_f32_f16",
        "ct_classifier_inputs_i16", "ct_classifier_inputs_f32",
    ),
    "mask_weights.cu": ("ct_mask_weights",),
    "masked_gap.cu": ("ct_masked_gap_f32", "ct_masked_gap_f16"),
}
MODES = {"linear": 0, "area": 1}

_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$', re.MULTILINE)


def cache_dir() -> Path:
    """User cache for built kernels: ``$CTSDK_KERNEL_CACHE``, else ``$CTSDK_CACHE/kernels``, else
    ``$XDG_CACHE_HOME/ctsdk/kernels`` (``~/.cache/ctsdk/kernels``). Created on demand."""
    env = os.environ.get("CTSDK_KERNEL_CACHE")
    if env:
        d = Path(env)
    elif os.environ.get("CTSDK_CACHE"):
        d = Path(os.environ["CTSDK_CACHE"]) / "kernels"
    else:
        d = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ctsdk" / "kernels"
    d.mkdir(parents=True, exist_ok=True)
    return d


def read_source(name: str, inline: bool = True) -> str:
    """Text of ``kernels/<name>``; with ``inline`` the local ``#include "..."`` lines are replaced
    by the header text, giving one self-contained unit for NVRTC / pycuda SourceModule."""
    path = KERNEL_DIR / name
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: kernel source missing ({exc}); reinstall ctsdk") from exc
    if not inline:
        return text

    def repl(m: "re.Match[str]") -> str:
        return read_source(m.group(1), inline=True)

    return _INCLUDE.sub(repl, text)


def sources_hash(*extra: str) -> str:
    """sha256 over every kernel source and header (plus ``extra`` strings: compiler, flags)."""
    h = hashlib.sha256()
    for p in sorted(KERNEL_DIR.glob("*.cu")) + sorted(KERNEL_DIR.glob("*.cuh")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ResampleGeometry:
    """Scalar arguments of the resample kernels (same geometry as the NumPy reference)."""

    out_shape: Tuple[int, int, int]
    z_centres: np.ndarray  # (nz,) float64
    spacing: Tuple[float, float, float]  # dz (median), dy, dx
    out_lo: Tuple[float, float, float]
    out_len: Tuple[float, float, float]


def resample_geometry(
    shape: Sequence[int],
    z_mm: Sequence[float],
    out_shape: Sequence[int] = (128, 128, 128),
    isotropic: bool = False,
    pixel_spacing_mm: Optional[Sequence[float]] = None,
    slice_thickness_mm: Optional[float] = None,
) -> ResampleGeometry:
    """Kernel arguments for :func:`sdk.volume.resample.resample_volume`'s geometry."""
    gz, gy, gx = axis_grids(shape, z_mm, out_shape, isotropic, pixel_spacing_mm, slice_thickness_mm)
    return ResampleGeometry(
        out_shape=(gz.n_out, gy.n_out, gx.n_out),
        z_centres=np.ascontiguousarray(gz.centres, dtype=np.float64),
        spacing=(gz.spacing, gy.spacing, gx.spacing),
        out_lo=(gz.out_lo, gy.out_lo, gx.out_lo),
        out_len=(gz.out_len, gy.out_len, gx.out_len),
    )


def check_mode(mode: str) -> int:
    if mode not in MODES:
        raise ConfigError(f"resample kernel: mode must be one of {tuple(MODES)}, not {mode!r}")
    return MODES[mode]


def check_window(window: Optional[Tuple[float, float]]) -> Tuple[int, float, float]:
    if window is None:
        return 0, 0.0, 1.0
    lo, hi = (float(v) for v in window)
    if not hi > lo:
        raise ConfigError(f"window must be (lo, hi) with hi > lo, not {tuple(window)}")
    return 1, lo, hi
