"""Training (needs the ``train`` extra: ``pip install 'ctsdk[train]'``).

- ``sdk.train.classifier``: ``ClassifierTrainConfig`` + ``train_classifier`` (2D slice classifier).
- ``sdk.train.seg``: ``SegTrainConfig`` + ``train_seg`` (2D lung U-Net).
- ``sdk.train.aggregator``: ``AggTrainConfig`` + ``train_aggregator`` (XGBoost patient decision).
- ``sdk.train.data`` (torch-free): images index, patient-grouped splits, augmentation, mask cache.
- ``sdk.train.common`` (torch-free at import): seeding, early stopping, focal loss, metrics.

Names are imported lazily so ``import sdk.train`` works without torch; the CLI is
``ctsdk train seg|classifier|aggregator``.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ClassifierTrainConfig": "sdk.train.classifier",
    "train_classifier": "sdk.train.classifier",
    "SegTrainConfig": "sdk.train.seg",
    "train_seg": "sdk.train.seg",
    "AggTrainConfig": "sdk.train.aggregator",
    "train_aggregator": "sdk.train.aggregator",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sdk.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
