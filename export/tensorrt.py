"""TensorRT engine building, as seen from the export side (``ctsdk build-engine``).

The implementation lives in :mod:`sdk.runtime.trt_build`: the runtime builds (and caches) an
engine the first time a TensorRT session opens an ONNX, so it must not import ``sdk.export``.
This module re-exports the same objects so the export tooling and its users keep one import path;
the dependency runs one way, export -> runtime.

    from sdk.export.tensorrt import BuildConfig, build_engine
"""
from __future__ import annotations

from ..runtime.trt_build import (  # noqa: F401 - re-exported
    DEFAULT_BATCH, DEFAULT_WORKSPACE_MB, BuildConfig, BuildReport, CachedEngine, EngineFromOnnx, PrecisionPlan,
    build_engine, check_onnx_for_plan, engine_key, onnx_precision, parse_batch, precision_plan, profile_shapes,
    resolve_model,
)
from ..runtime.trt_build import __all__  # noqa: F401
