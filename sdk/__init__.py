"""ctsdk - chest-CT triage SDK (research use only).

    import sdk
    result = sdk.Triage().run("path/to/series")
    print(result.label, result.probabilities)

Heavy and optional packages (onnxruntime, xgboost, torch, tensorrt, pycuda) are imported lazily,
so ``import sdk`` is fast and works on a CPU-only core install.
"""
from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.2.0"  # = pyproject.toml [project] version (tests/test_runtime.py); the bundle has its own

# public name -> module that defines it (imported on first access)
_LAZY = {
    "Triage": "sdk.triage",
    "TriageResult": "sdk.triage",
    "load_series": "sdk.io",
    "list_series": "sdk.io",
    "Volume": "sdk.volume",
    "create_model": "sdk.models",
    "load_bundle": "sdk.bundle",
}

__all__ = ["__version__", *_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
