"""Runtime backends by name, and the choice of backend + precision for this machine.

    from sdk.runtime import available_runtimes, get_runtime, select_runtime

    available_runtimes()                    # e.g. ["ort-cpu"]
    get_runtime("ort-cuda").status()        # (False, "CUDAExecutionProvider is not in this onnxruntime build ...")
    loader, info, reasons = select_runtime("auto", "auto", {"fp32": "c32.onnx", "int8": "c8.onnx"},
                                           calibration_passed=True, int8_speedup=1.6)
    with loader() as session: ...

Each backend declares ``REQUIRES`` (pip names) and ``is_available()``/``status()``; an
unavailable backend stays registered and reports why (the pydicom decoder-plugin pattern).
``device="auto"`` tries TensorRT > ORT CUDA > ORT CPU and keeps every reason it skipped one;
``precision="auto"`` is INT8 on CPU only when the calibration report passed *and* INT8 was
measured faster than FP32, FP16 on a GPU, else FP32.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from ..errors import ConfigError, ModelNotFoundError, RuntimeUnavailableError
from .base import RuntimeInfo

log = logging.getLogger("sdk.runtime")

PathLike = Union[str, os.PathLike]
DEVICES: Tuple[str, ...] = ("auto", "cpu", "cuda", "tensorrt")
PRECISIONS: Tuple[str, ...] = ("auto", "fp32", "fp16", "int8")
#: INT8 must beat FP32 by this factor (measured, same process) to be picked automatically
MIN_INT8_SPEEDUP = 1.05


class Backend:
    """A runtime plugin. Subclasses set ``name``, ``device``, ``REQUIRES`` and implement
    ``status()`` and ``loader()``."""

    name: str = ""
    device: str = ""
    backend: str = ""
    provider: str = ""
    REQUIRES: Tuple[str, ...] = ()
    description: str = ""

    def status(self) -> Tuple[bool, str]:
        raise NotImplementedError

    def is_available(self) -> bool:
        return self.status()[0]

    def loader(self, onnx_path: PathLike, precision: str, **kw: Any) -> Callable[[], Any]:
        raise NotImplementedError

    def device_name(self) -> str:
        from .gpu import gpu_info

        g = gpu_info()
        return g.name if g else "cuda"

    def to_dict(self) -> Dict[str, Any]:
        ok, why = self.status()
        return {"name": self.name, "device": self.device, "available": ok, "reason": why,
                "requires": list(self.REQUIRES), "description": self.description}


class OrtCpuBackend(Backend):
    name, device, backend, provider = "ort-cpu", "cpu", "onnxruntime", "CPUExecutionProvider"
    REQUIRES = ("onnxruntime",)
    description = "ONNX Runtime, CPU execution provider (FP32 or INT8 QDQ)"

    def status(self) -> Tuple[bool, str]:
        if importlib.util.find_spec("onnxruntime") is None:
            return False, "onnxruntime is not installed (pip install onnxruntime)"
        from .ort import CPU_EP, probe_provider

        return probe_provider(CPU_EP)

    def loader(self, onnx_path: PathLike, precision: str, **kw: Any) -> Callable[[], Any]:
        from .ort import OrtSessionFromOnnx

        return OrtSessionFromOnnx(onnx_path, device="cpu", precision=precision, threads=kw.get("threads"),
                                  lanes=kw.get("lanes"))

    def device_name(self) -> str:
        return "cpu"


class OrtCudaBackend(Backend):
    name, device, backend, provider = "ort-cuda", "cuda", "onnxruntime", "CUDAExecutionProvider"
    REQUIRES = ("onnxruntime-gpu",)
    description = "ONNX Runtime, CUDA execution provider (FP32/FP16; same ONNX files as the CPU)"

    def status(self) -> Tuple[bool, str]:
        if importlib.util.find_spec("onnxruntime") is None:
            return False, "onnxruntime-gpu is not installed (pip install onnxruntime-gpu)"
        from .ort import CUDA_EP, probe_provider

        return probe_provider(CUDA_EP)

    def loader(self, onnx_path: PathLike, precision: str, **kw: Any) -> Callable[[], Any]:
        from .ort import OrtSessionFromOnnx

        return OrtSessionFromOnnx(onnx_path, device="cuda", precision=precision, strict=True,
                                  provider_options=kw.get("provider_options"), fixed_batch=kw.get("fixed_batch"),
                                  cuda_graph=bool(kw.get("cuda_graph", False)))


class TensorRTBackend(Backend):
    name, device, backend, provider = "tensorrt", "tensorrt", "tensorrt", "TensorRT"
    REQUIRES = ("tensorrt", "polygraphy", "cuda-python")
    description = "TensorRT engine built on this GPU from the FP32 / FP16 / INT8-QDQ ONNX (cached)"

    def status(self) -> Tuple[bool, str]:
        from .trt import tensorrt_status

        return tensorrt_status()

    def loader(self, onnx_path: PathLike, precision: str, **kw: Any) -> Callable[[], Any]:
        from .trt_build import CachedEngine
        from .trt import TrtSessionFromEngine

        engine = CachedEngine(onnx_path, precision=precision, cache_dir=kw.get("engine_cache_dir"),
                              batch=kw.get("batch", (1, 8, 32)))
        return TrtSessionFromEngine(engine, precision=precision)


_RUNTIMES: Dict[str, Backend] = {b.name: b for b in (TensorRTBackend(), OrtCudaBackend(), OrtCpuBackend())}
_ALIASES = {"trt": "tensorrt", "cpu": "ort-cpu", "cuda": "ort-cuda", "onnxruntime": "ort-cpu"}
#: device="auto" preference order
AUTO_ORDER: Tuple[str, ...] = ("tensorrt", "ort-cuda", "ort-cpu")


def register_runtime(backend: Backend) -> None:
    """Add or replace a backend (e.g. a vendor EP)."""
    _RUNTIMES[backend.name] = backend


def get_runtime(name: str) -> Backend:
    """The backend named ``name`` (aliases: trt, cpu, cuda); ModelNotFoundError lists valid names."""
    key = _ALIASES.get(name, name)
    if key not in _RUNTIMES:
        raise ModelNotFoundError(name, list(_RUNTIMES) + list(_ALIASES), kind="runtime")
    return _RUNTIMES[key]


def list_runtimes() -> List[str]:
    return list(_RUNTIMES)


def available_runtimes() -> List[str]:
    """Names of the backends usable here, best first."""
    return [n for n in AUTO_ORDER if n in _RUNTIMES and _RUNTIMES[n].is_available()] + \
        [n for n in _RUNTIMES if n not in AUTO_ORDER and _RUNTIMES[n].is_available()]


def describe_runtimes() -> Dict[str, Dict[str, Any]]:
    """Every backend with availability, reason and REQUIRES (JSON-safe)."""
    return {n: b.to_dict() for n, b in _RUNTIMES.items()}


def _choose_precision(backend: Backend, precision: str, files: Mapping[str, Any], calibration_passed: bool,
                      int8_speedup: Optional[float], reasons: List[str]) -> Optional[str]:
    """Precision for ``backend`` or None when the bundle lacks what it needs (reason appended)."""
    if precision != "auto":
        if precision not in files:
            reasons.append(f"{backend.name}: no {precision} model in the bundle (has {sorted(files)})")
            return None
        if precision == "fp16" and backend.device == "cpu":
            reasons.append("ort-cpu: fp16 requested; ORT CPU has few FP16 kernels, expect it slower than fp32")
        if precision == "int8" and not calibration_passed:
            msg = ("int8 requested although the bundle's INT8 classifier did NOT pass its calibration bar "
                   "(manifest int8.passed is false: its top-1 agreement with FP32 is below the criterion); "
                   "running it as asked - precision='auto' would run fp32")
            reasons.append(msg)
            log.warning(msg)
        return precision
    if backend.device == "cpu":
        if "int8" not in files:
            reasons.append("precision auto -> fp32 on CPU: the bundle has no int8 model")
        elif not calibration_passed:
            reasons.append("precision auto -> fp32 on CPU: the INT8 calibration report did not pass")
        elif int8_speedup is None:
            reasons.append("precision auto -> fp32 on CPU: INT8 speed was not measured")
        elif int8_speedup < MIN_INT8_SPEEDUP:
            reasons.append(f"precision auto -> fp32 on CPU: INT8 measured only {int8_speedup:.2f}x FP32")
        else:
            reasons.append(f"precision auto -> int8 on CPU: calibration passed and INT8 measured {int8_speedup:.2f}x FP32")
            return "int8"
        return "fp32" if "fp32" in files else None
    if "fp16" in files:
        reasons.append(f"precision auto -> fp16 on GPU ({backend.name})")
        return "fp16"
    reasons.append(f"precision auto -> fp32 on GPU ({backend.name}): the bundle has no fp16 model")
    return "fp32" if "fp32" in files else None


def select_runtime(
    device: str = "auto",
    precision: str = "auto",
    bundle_files: Optional[Mapping[str, PathLike]] = None,
    calibration_passed: bool = False,
    *,
    int8_speedup: Optional[float] = None,
    threads: Optional[int] = None,
    engine_cache_dir: Optional[PathLike] = None,
    batch: Tuple[int, int, int] = (1, 8, 32),
    fixed_batch: Optional[int] = None,
    cuda_graph: bool = False,
    lanes: Optional[int] = None,
) -> Tuple[Callable[[], Any], RuntimeInfo, List[str]]:
    """Pick a backend and precision for this machine.

    Args:
        device: "auto" (TensorRT > ORT CUDA > ORT CPU, by what is installed and usable), "cpu",
            "cuda" (ORT CUDA EP) or "tensorrt".
        precision: "auto" | "fp32" | "fp16" | "int8".
        bundle_files: precision -> ONNX path (e.g. ``{"fp32": ..., "fp16": ..., "int8": ...}``).
        calibration_passed: the INT8 calibration report passed its accuracy bar.
        int8_speedup: measured FP32/INT8 latency ratio on this kind of CPU (None = not measured).
        threads: ORT CPU intra-op threads.
        engine_cache_dir: where TensorRT engines are cached (default: beside the ONNX).
        batch: TensorRT optimisation profile (min, opt, max).
        fixed_batch: ORT CUDA runs every classifier call at this batch (the last batch padded), so
            the shapes never vary; None = as fed.
        cuda_graph: ORT CUDA captures a CUDA graph (needs ``fixed_batch`` and CuPy).
        lanes: ORT CPU: batches run side by side by ``infer_batched`` (the session then has
            ``threads`` or the cores / lanes intra-op threads; :func:`sdk.runtime.ort.cpu_lanes`).
            None or 1: one batch at a time on ``threads``. GPU backends ignore it.

    Returns:
        ``(loader, info, reasons)``: ``loader()`` creates the Session (nothing is built before);
        ``info`` is what will run; ``reasons`` explains every backend skipped and the precision.

    Raises:
        ConfigError for unknown device/precision or an empty bundle;
        RuntimeUnavailableError when an explicitly requested device is unusable (with the reasons).
    """
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {DEVICES}, got {device!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    files = {k: Path(v) for k, v in (bundle_files or {}).items() if v}
    bad = sorted(set(files) - set(PRECISIONS[1:]))
    if bad or not files:
        raise ConfigError(f"bundle_files must map precisions {PRECISIONS[1:]} to ONNX paths, got {sorted(bundle_files or {})}")
    order = AUTO_ORDER if device == "auto" else ({"cpu": "ort-cpu", "cuda": "ort-cuda", "tensorrt": "tensorrt"}[device],)
    reasons: List[str] = []
    for name in order:
        backend = _RUNTIMES[name]
        ok, why = backend.status()
        if not ok:
            reasons.append(f"{name} skipped: {why}")
            continue
        prec = _choose_precision(backend, precision, files, calibration_passed, int8_speedup, reasons)
        if prec is None:
            continue
        loader = backend.loader(files[prec], prec, threads=threads, engine_cache_dir=engine_cache_dir, batch=batch,
                                fixed_batch=fixed_batch, cuda_graph=cuda_graph, lanes=lanes)
        info = RuntimeInfo(backend=backend.backend, provider=backend.provider, precision=prec, device=backend.device_name())
        reasons.append(f"selected {name} / {prec}: {files[prec].name}")
        for r in reasons:
            log.info("runtime: %s", r)
        return loader, info, reasons
    raise RuntimeUnavailableError(f"no runtime for device={device!r}, precision={precision!r}: " + "; ".join(reasons))


__all__ = ["AUTO_ORDER", "Backend", "DEVICES", "MIN_INT8_SPEEDUP", "PRECISIONS", "available_runtimes", "describe_runtimes",
           "get_runtime", "list_runtimes", "register_runtime", "select_runtime"]
