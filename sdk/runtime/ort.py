"""ONNX Runtime sessions (CPU and CUDA execution providers) behind the common Session interface.

    with OrtSession("classifier_int8.onnx", device="cpu", threads=2) as s:
        out = s.infer({"image": x})
        s.info            # RuntimeInfo(backend="onnxruntime", provider="CPUExecutionProvider", ...)

``onnxruntime`` and ``onnxruntime-gpu`` install the same module; with the GPU build on a machine
without a usable GPU, ORT lists the CUDA provider and then *silently* runs on CPU. OrtSession
therefore checks ``session.get_providers()`` after creation: if CUDA was requested but not
granted it records why in ``fallback_reasons`` and logs a warning, or raises
:class:`~sdk.errors.RuntimeUnavailableError` with ``strict=True``.
"""
from __future__ import annotations

import base64
import functools
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .._lazy import require
from ..errors import ConfigError, RuntimeUnavailableError
from .base import RuntimeInfo, Session, TensorSpec

log = logging.getLogger("sdk.runtime")

PathLike = Union[str, os.PathLike]
CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
_DEVICES = ("cpu", "cuda")
#: ORT type strings -> numpy dtype names
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}
#: a 1-node ONNX model (y = x + x, opset 17): probes whether a provider is really granted
_PROBE_ONNX = base64.b64decode("CAg6OQoOCgF4CgF4EgF5IgNBZGQSBXByb2JlWg8KAXgSCgoICAESBAoCCAFiDwoBeRIKCggIARIECgIIAUIECgAQEQ==")


def _ort() -> Any:
    return require("onnxruntime", "ONNX Runtime inference")


def default_threads() -> int:
    """Intra-op threads: ``$CTSDK_THREADS`` or the number of usable cores."""
    env = os.environ.get("CTSDK_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def providers_for(device: str, provider_options: Optional[Mapping[str, Any]] = None) -> List[Any]:
    """The provider list ORT gets for ``device`` ("cpu" | "cuda"; CUDA always falls back to CPU)."""
    if device not in _DEVICES:
        raise ConfigError(f"ORT device must be one of {_DEVICES}, got {device!r}")
    if device == "cpu":
        return [CPU_EP]
    opts = {"device_id": 0, **dict(provider_options or {})}
    return [(CUDA_EP, opts), CPU_EP]


@functools.lru_cache(maxsize=4)
def probe_provider(provider: str) -> Tuple[bool, str]:
    """``(granted, reason)``: whether ORT really grants ``provider`` for a one-node session."""
    try:
        ort = _ort()
    except Exception as exc:
        return False, str(exc)
    listed = ort.get_available_providers()
    if provider not in listed:
        pkg = "onnxruntime-gpu" if provider == CUDA_EP else "an ONNX Runtime build with it"
        return False, f"{provider} is not in this onnxruntime build ({', '.join(listed)}); install {pkg}"
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(_PROBE_ONNX, so, providers=[provider] if provider == CPU_EP else [provider, CPU_EP])
    except Exception as exc:
        return False, f"{provider} failed to start: {str(exc).splitlines()[0][:200]}"
    granted = sess.get_providers()
    if provider not in granted:
        return False, (f"{provider} is listed but ORT fell back to {granted} (no usable GPU, driver, CUDA or cuDNN "
                       "libraries; run with -vv and ORT log level 0 to see why)")
    return True, f"{provider} granted"


def _precision_from_meta(meta: Mapping[str, str], path: str) -> str:
    p = meta.get("ctsdk.precision")
    if p in ("fp32", "fp16", "int8"):
        return p
    low = path.lower()
    for tag in ("int8", "fp16"):
        if tag in low:
            return tag
    return "fp32"


class OrtSession(Session):
    """An ONNX Runtime inference session.

    Args:
        model: ONNX path or serialized bytes.
        device: "cpu" or "cuda" (CUDA EP, falling back to CPU - see ``fallback_reasons``).
        threads: intra-op threads for the CPU EP (default :func:`default_threads`).
        provider_options: options of the CUDA EP (e.g. ``{"device_id": 1}``).
        precision: what the graph computes in ("fp32" | "fp16" | "int8"); default from the
            ``ctsdk.precision`` metadata or the file name.
        strict: raise RuntimeUnavailableError instead of falling back to CPU.
        graph_optimization: ORT graph optimisation level ("all" | "extended" | "basic" | "disable").
        spinning: let idle intra-op threads spin-wait (ORT's default). Off by default: the product
            builds the next batch in a helper thread while a batch runs, and spinning workers take
            the CPU from it (on 2 cores: pipelined classification 2.7 s -> 1.9 s wall, 1.30 ->
            0.91 s CPU, ``examples/ort_spinning_check.py``, docs/benchmarks/cpu.md).
    """

    def __init__(
        self,
        model: Union[PathLike, bytes],
        *,
        device: str = "cpu",
        threads: Optional[int] = None,
        provider_options: Optional[Mapping[str, Any]] = None,
        precision: Optional[str] = None,
        strict: bool = False,
        graph_optimization: str = "all",
        spinning: bool = False,
    ) -> None:
        super().__init__()
        ort = _ort()
        self.path = "<bytes>" if isinstance(model, (bytes, bytearray)) else str(model)
        if not isinstance(model, (bytes, bytearray)) and not Path(model).is_file():
            raise ConfigError(f"{model}: ONNX model not found (export one with `ctsdk export`, or check the bundle)")
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads) if threads else default_threads()
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        if graph_optimization not in levels:
            raise ConfigError(f"graph_optimization must be one of {sorted(levels)}, got {graph_optimization!r}")
        so.graph_optimization_level = levels[graph_optimization]
        self.requested_device = device
        self.fallback_reasons: List[str] = []
        providers = providers_for(device, provider_options)
        if device == "cuda" and CUDA_EP not in ort.get_available_providers():
            reason = f"CUDA requested but this onnxruntime build has no {CUDA_EP} (pip uninstall -y onnxruntime && pip install onnxruntime-gpu)"
            if strict:
                raise RuntimeUnavailableError(f"{self.path}: {reason}")
            self.fallback_reasons.append(reason)
            providers = [CPU_EP]
        try:
            self._sess = ort.InferenceSession(model if isinstance(model, (bytes, bytearray)) else str(model), so, providers=providers)
        except Exception as exc:
            raise RuntimeUnavailableError(f"{self.path}: ONNX Runtime could not load the model with {providers}: {exc}") from exc
        granted = self._sess.get_providers()
        if device == "cuda" and CUDA_EP not in granted and not self.fallback_reasons:
            reason = f"CUDA requested but ORT granted only {granted} (no usable GPU / CUDA / cuDNN here)"
            if strict:
                raise RuntimeUnavailableError(f"{self.path}: {reason}")
            self.fallback_reasons.append(reason)
        for r in self.fallback_reasons:
            log.warning("%s: %s; running on CPU", self.path, r)
        self.provider = granted[0]
        meta = dict(self._sess.get_modelmeta().custom_metadata_map)
        self.metadata: Dict[str, str] = meta
        self.precision = precision or _precision_from_meta(meta, self.path)
        on_gpu = self.provider == CUDA_EP
        dev = "cpu"
        if on_gpu:
            from .gpu import gpu_info

            g = gpu_info(int(dict(provider_options or {}).get("device_id", 0)))
            dev = g.name if g else "cuda"
        self.info = RuntimeInfo(backend="onnxruntime", provider=self.provider, precision=self.precision, device=dev)
        self.inputs = [TensorSpec(i.name, tuple(i.shape), _ORT_TYPES.get(i.type, i.type)) for i in self._sess.get_inputs()]
        self.outputs = [TensorSpec(o.name, tuple(o.shape), _ORT_TYPES.get(o.type, o.type)) for o in self._sess.get_outputs()]
        self._out_names = [o.name for o in self.outputs]

    @property
    def session(self) -> Any:
        """The underlying ``onnxruntime.InferenceSession``."""
        return self._sess

    def _infer_impl(self, feed: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]]) -> Dict[str, np.ndarray]:
        names = list(outputs) if outputs else self._out_names
        unknown = sorted(set(names) - set(self._out_names))
        if unknown:
            raise ConfigError(f"{self.path}: unknown outputs {unknown}; the model has {self._out_names}")
        res = self._sess.run(names, {k: np.ascontiguousarray(v) for k, v in feed.items()})
        return dict(zip(names, res))

    def close(self) -> None:
        self._sess = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OrtSession({self.path!r}, provider={self.provider}, precision={self.precision})"


class OrtSessionFromOnnx:
    """Loader (Polygraphy style): stores arguments, builds the OrtSession only when called.

    ``OrtSessionFromOnnx("m.onnx", device="cuda")()`` -> OrtSession.
    """

    def __init__(self, path: PathLike, **session_kwargs: Any) -> None:
        self.path = path
        self.kwargs = session_kwargs

    def __call__(self) -> OrtSession:
        return OrtSession(self.path, **self.kwargs)

    def __repr__(self) -> str:
        kw = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"OrtSessionFromOnnx({str(self.path)!r}{', ' + kw if kw else ''})"


__all__ = ["CPU_EP", "CUDA_EP", "OrtSession", "OrtSessionFromOnnx", "default_threads", "probe_provider", "providers_for"]
