"""PyTorch -> ONNX export, FP16 conversion and TensorRT engine building (installed as sdk.export).

- :func:`export_onnx` / :func:`export_fp16` (``sdk.export.onnx``): one-file ONNX with metadata,
  onnx.checker, onnxslim and a parity check on real slices; FP16 with an FP32 head.
- ``sdk.export.tensorrt``: ``build_engine(BuildConfig(...))`` with Polygraphy's loaders, engine
  and timing caches (TensorRT imported lazily).

Nothing heavy is imported by ``import sdk.export``.
"""
from __future__ import annotations

from sdk._lazy import lazy_exports

_LAZY = {
    "export_onnx": ".onnx", "export_fp16": ".onnx", "classifier_metadata": ".onnx", "read_metadata": ".onnx",
    "ExportReport": ".onnx", "ParityReport": ".onnx", "ExportError": ".onnx", "torch_parity": ".onnx",
    "check_input_size": ".onnx",
    "BuildConfig": ".tensorrt", "build_engine": ".tensorrt", "CachedEngine": ".tensorrt", "EngineFromOnnx": ".tensorrt",
    "parse_batch": ".tensorrt",
}
__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
