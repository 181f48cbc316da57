"""Lazy imports of heavy or optional packages (torch, tensorrt, pycuda, onnxruntime, xgboost).

``import sdk`` must stay fast and work on a CPU-only core install; optional packages are imported
on first use and a missing one becomes a :class:`~sdk.errors.MissingDependencyError` that says
what to install.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

# pip package and ctsdk extra for each optional import name
_EXTRAS = {
    "torch": ("torch", "train"),
    "onnx": ("onnx", "train"),
    "onnxscript": ("onnxscript", "train"),
    "onnxslim": ("onnxslim", "train"),
    "tensorrt": ("tensorrt", "gpu"),
    "pycuda": ("pycuda", "gpu"),
    "polygraphy": ("polygraphy", "gpu"),
    "pynetdicom": ("pynetdicom", "dicomnet"),
    "highdicom": ("highdicom", "dicomnet"),
    "ray": ("ray[data]", "cluster"),
}


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` or raise MissingDependencyError naming the pip package / extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        top = module.split(".")[0]
        package, extra = _EXTRAS.get(top, (top, ""))
        err = MissingDependencyError(package, feature, extra)
        err.__cause__ = exc
        raise err from exc


def available(module: str) -> bool:
    """True when ``module`` can be imported (without importing it twice)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
