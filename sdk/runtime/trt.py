"""TensorRT engine sessions behind the common Session interface (needs ``ctsdk[gpu]``).

    with TrtSession(EngineFromPath("classifier.fp16.engine")) as s:
        out = s.infer({"image": x})          # same call as OrtSession

Execution goes through Polygraphy's ``TrtRunner`` (it owns the CUDA stream and device buffers via
its ctypes binding of libcudart, so neither pycuda nor cuda-python is strictly required).
``tensorrt`` and ``polygraphy`` are imported only when a session is created. Every engine is
checked against its ``.json`` sidecar key (GPU, compute capability, TensorRT version, precision)
before it is deserialised: a mismatch raises EngineMismatchError telling the user to rebuild.

Status: written against the TensorRT 10/11 Python API; it has NOT run here (TensorRT cannot be
installed in this workplace; see docs/deployment.md).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .._lazy import require
from ..errors import ConfigError, RuntimeUnavailableError
from .base import RuntimeInfo, Session, TensorSpec
from .engine_cache import check_engine_key, read_sidecar

log = logging.getLogger("sdk.runtime")

PathLike = Union[str, os.PathLike]
TRT_INSTALL_HINT = "install ctsdk[gpu] (TensorRT): pip install 'ctsdk[gpu]' with NVIDIA's package index reachable"


def import_tensorrt(feature: str = "TensorRT engines") -> Any:
    """``import tensorrt`` or MissingDependencyError whose message says ``install ctsdk[gpu] (TensorRT)``."""
    from ..errors import MissingDependencyError

    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as exc:
        err = MissingDependencyError("tensorrt", feature, "gpu")
        err.args = (f"{feature} needs TensorRT, which is not installed: {TRT_INSTALL_HINT}",)
        raise err from exc
    if not hasattr(trt, "Builder"):
        # the PyPI `tensorrt` placeholder / bindings-only wheel imports but has no libnvinfer
        err = MissingDependencyError("tensorrt", feature, "gpu")
        err.args = (f"{feature}: the installed tensorrt package has no TensorRT runtime (placeholder wheel): {TRT_INSTALL_HINT}",)
        raise err
    return trt


def trt_version() -> str:
    return str(import_tensorrt().__version__)


class EngineFromPath:
    """Loader: reads an engine file and checks its key against this GPU/TensorRT when called.

    Returns the serialized engine bytes (what ``TrtSession`` deserialises).
    """

    def __init__(self, path: PathLike, precision: Optional[str] = None, check_key: bool = True) -> None:
        self.path = Path(path)
        self.precision = precision
        self.check_key = check_key

    def __call__(self) -> bytes:
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: engine not found; build one with ctsdk build-engine")
        if self.check_key:
            from .gpu import gpu_info

            built, _ = read_sidecar(self.path)
            gpu = gpu_info()
            if gpu is None:
                raise RuntimeUnavailableError(f"{self.path}: no NVIDIA GPU visible, a TensorRT engine cannot run here")
            check_engine_key(self.path, built, gpu.name, gpu.compute_capability, trt_version(), self.precision)
        return self.path.read_bytes()

    def __repr__(self) -> str:
        return f"EngineFromPath({str(self.path)!r})"


class TrtSession(Session):
    """A TensorRT engine as a Session.

    Args:
        engine: engine path, serialized bytes, or a loader returning either (e.g.
            :class:`EngineFromPath`, ``sdk.runtime.trt_build.EngineFromOnnx``).
        precision: reported precision (default: the engine's sidecar key, else "fp32").
    """

    def __init__(self, engine: Union[PathLike, bytes, Any], *, precision: Optional[str] = None) -> None:
        super().__init__()
        trt = import_tensorrt("TrtSession")
        backend = require("polygraphy.backend.trt", "TrtSession (Polygraphy's TrtRunner)")
        from .gpu import gpu_info

        source = engine
        if isinstance(engine, (str, os.PathLike)):
            source = EngineFromPath(engine, precision)
        blob = source() if callable(source) else source
        if isinstance(blob, (str, os.PathLike)):
            blob = EngineFromPath(blob, precision)()
        if not isinstance(blob, (bytes, bytearray, memoryview)) and not hasattr(blob, "create_execution_context"):
            raise ConfigError(f"TrtSession: expected engine bytes/path/ICudaEngine, got {type(blob).__name__}")
        self.engine = backend.EngineFromBytes(bytes(blob))() if isinstance(blob, (bytes, bytearray, memoryview)) else blob
        self._runner = backend.TrtRunner(self.engine)
        self._runner.activate()
        if precision is None and isinstance(engine, (str, os.PathLike)):
            try:
                precision = read_sidecar(engine)[0].precision
            except Exception:  # sidecar already checked by EngineFromPath; keep the default
                precision = None
        gpu = gpu_info()
        self.precision = precision or "fp32"
        self.info = RuntimeInfo(backend="tensorrt", provider=f"TensorRT {trt.__version__}", precision=self.precision,
                                device=gpu.name if gpu else "cuda")
        self.inputs, self.outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            spec = TensorSpec(name, tuple(int(d) if d >= 0 else None for d in self.engine.get_tensor_shape(name)),
                              np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))).name)
            (self.inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs).append(spec)

    def _infer_impl(self, feed: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]]) -> Dict[str, np.ndarray]:
        res = self._runner.infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
        names = list(outputs) if outputs else [o.name for o in self.outputs]
        return {k: np.asarray(res[k]) for k in names}

    def close(self) -> None:
        runner = getattr(self, "_runner", None)
        if runner is not None and getattr(runner, "is_active", False):
            runner.deactivate()
        self._runner = None


class TrtSessionFromEngine:
    """Loader: ``TrtSessionFromEngine(loader_or_path)()`` -> TrtSession (builds nothing before)."""

    def __init__(self, engine: Any, precision: Optional[str] = None) -> None:
        self.engine = engine
        self.precision = precision

    def __call__(self) -> TrtSession:
        return TrtSession(self.engine, precision=self.precision)

    def __repr__(self) -> str:
        return f"TrtSessionFromEngine({self.engine!r}, precision={self.precision!r})"


def tensorrt_status() -> Tuple[bool, str]:
    """``(usable, reason)`` for TensorRT here: module with libnvinfer, Polygraphy and a GPU."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return False, f"tensorrt is not installed ({TRT_INSTALL_HINT})"
    try:
        import_tensorrt()
    except Exception as exc:
        return False, f"tensorrt does not load: {exc}"
    if importlib.util.find_spec("polygraphy") is None:
        return False, "polygraphy is not installed (pip install 'ctsdk[gpu]')"
    from .gpu import gpu_info

    if gpu_info() is None:
        return False, "tensorrt is installed but no NVIDIA GPU is visible"
    return True, "tensorrt usable"


__all__ = ["EngineFromPath", "TRT_INSTALL_HINT", "TrtSession", "TrtSessionFromEngine", "import_tensorrt", "tensorrt_status", "trt_version"]
