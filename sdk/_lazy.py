"""Lazy imports of heavy or optional packages (torch, tensorrt, pycuda, onnxruntime, xgboost).

``import sdk`` must stay fast and work on a CPU-only core install; optional packages are imported
on first use and a missing one becomes a :class:`~sdk.errors.MissingDependencyError` that says
what to install.
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any, Callable, Dict, List, Tuple

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


def lazy_exports(package: str, table: Dict[str, str]) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """``__getattr__`` and ``__dir__`` for a package whose public names load on first access.

    ``table`` maps a public name to the module that defines it (absolute, or relative to
    ``package`` with a leading dot); ``"module:attr"`` exports ``attr`` under the public name.
    The value is cached in the package namespace after the first access. A name that is no export
    but a submodule is imported on first access too, so ``import sdk; sdk.io.load_series(...)``
    works as the docs write it (the import binds it in the package).

        _LAZY = {"OrtSession": ".ort"}
        __getattr__, __dir__ = lazy_exports(__name__, _LAZY)
    """
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        spec = table.get(name)
        if spec is None:
            if not name.startswith("_") and available(f"{package}.{name}"):
                return importlib.import_module(f"{package}.{name}")  # a submodule: sdk.io after `import sdk`
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = spec.partition(":")
        value = getattr(importlib.import_module(module, package), attr or name)
        namespace[name] = value
        return value

    def __dir__() -> List[str]:
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
