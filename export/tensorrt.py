"""TensorRT engine building, as seen from the export side (``ctsdk build-engine``).

The implementation lives in :mod:`sdk.runtime.trt_build`: the runtime builds (and caches) an
engine the first time a TensorRT session opens an ONNX, so it must not import ``sdk.export``.
This module re-exports the same objects so the export tooling and its users keep one import path;
the dependency runs one way, export -> runtime. The INT8 pre-flight
(:func:`check_qdq_for_tensorrt`: is a Q/DQ ONNX symmetric signed INT8?) lives in
:mod:`sdk.export.qdq_check` and is re-exported here too.

    from sdk.export.tensorrt import BuildConfig, build_engine, check_qdq_for_tensorrt
"""
from __future__ import annotations

from ..runtime.trt_build import (  # noqa: F401 - re-exported
    DEFAULT_BATCH, DEFAULT_WORKSPACE_MB, BuildConfig, BuildReport, CachedEngine, EngineFromOnnx, PrecisionPlan,
    build_engine, bundle_of, check_onnx_for_plan, engine_key, onnx_precision, parse_batch, precision_plan,
    profile_shapes, resolve_model,
)
from ..runtime.trt_build import __all__ as _TRT_BUILD_ALL
from .qdq_check import QdqProblem, check_qdq_for_tensorrt, require_tensorrt_qdq  # noqa: F401 - re-exported

__all__ = [*_TRT_BUILD_ALL, "QdqProblem", "check_qdq_for_tensorrt", "require_tensorrt_qdq"]
