"""Inference sessions behind one interface (see base.py), runtime registry and selection.

    from sdk.runtime import OrtSession, select_runtime
    loader, info, reasons = select_runtime("auto", "auto", {"fp32": "classifier_fp32.onnx"})
    with loader() as s:
        out = s.infer({"image": x})

Heavy modules (onnxruntime, tensorrt, polygraphy) are imported on first use: importing this
package is cheap.
"""
from __future__ import annotations

from sdk._lazy import lazy_exports

from .base import RuntimeInfo, Session, TensorSpec

_LAZY = {
    "OrtSession": ".ort", "OrtSessionFromOnnx": ".ort", "probe_provider": ".ort",
    "TrtSession": ".trt", "TrtSessionFromEngine": ".trt", "EngineFromPath": ".trt", "tensorrt_status": ".trt",
    "EngineCache": ".engine_cache", "EngineKey": ".engine_cache",
    "GpuInfo": ".gpu", "gpu_info": ".gpu",
    "Backend": ".registry", "available_runtimes": ".registry", "describe_runtimes": ".registry",
    "get_runtime": ".registry", "list_runtimes": ".registry", "register_runtime": ".registry",
    "select_runtime": ".registry",
}

__all__ = ["RuntimeInfo", "Session", "TensorSpec", *_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
