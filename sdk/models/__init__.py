"""Model registry in the manner of timm: ``create_model(name, **kw)``.

The table below is torch-free data (so ``list_models()`` and the CLI's choices work on a core
install); building a model imports torch and the model's module on first use.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Tuple

from ..errors import ModelNotFoundError

# name -> ("module", "builder function", one-line description)
_REGISTRY: Dict[str, Tuple[str, str, str]] = {
    "effnet_lite0_mgap": ("sdk.models.classifier", "effnet_lite0_mgap", "EfficientNet-Lite0, lung-mask-weighted GAP (edge default)"),
    "effnet_lite0_gap": ("sdk.models.classifier", "effnet_lite0_gap", "EfficientNet-Lite0, plain GAP (ablation)"),
    "resnet50_mgap": ("sdk.models.classifier", "resnet50_mgap", "ResNet-50, lung-mask-weighted GAP (paper 000)"),
    "resnet50_gap": ("sdk.models.classifier", "resnet50_gap", "ResNet-50, plain GAP"),
    "unet2d_lung": ("sdk.models.unet", "unet2d_lung", "2D U-Net lung segmenter (slices)"),
    "unet3d_lung": ("sdk.models.unet", "unet3d_lung", "3D U-Net lung segmenter at 128^3 (paper 000)"),
}


def register_model(name: str, module: str, builder: str, description: str = "") -> None:
    """Add (or, with a warning, replace) a registry entry."""
    if name in _REGISTRY:
        import warnings

        warnings.warn(f"model {name!r} re-registered", stacklevel=2)
    _REGISTRY[name] = (module, builder, description)


def list_models() -> List[str]:
    return sorted(_REGISTRY)


def describe_models() -> Dict[str, str]:
    return {k: v[2] for k, v in sorted(_REGISTRY.items())}


def create_model(name: str, **kwargs: Any) -> Any:
    """Build a registered model (a torch.nn.Module). ``None`` kwargs are dropped.

    Raises ModelNotFoundError listing valid names; MissingDependencyError without torch.
    """
    if name not in _REGISTRY:
        raise ModelNotFoundError(name, list(_REGISTRY))
    from .._lazy import require

    require("torch", f"building model {name!r}")
    module, builder, _ = _REGISTRY[name]
    fn: Callable[..., Any] = getattr(importlib.import_module(module), builder)
    return fn(**{k: v for k, v in kwargs.items() if v is not None})


__all__ = ["create_model", "list_models", "describe_models", "register_model"]
