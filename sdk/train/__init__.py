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

from .._lazy import lazy_exports

_LAZY = {
    "ClassifierTrainConfig": "sdk.train.classifier",
    "train_classifier": "sdk.train.classifier",
    "SegTrainConfig": "sdk.train.seg",
    "train_seg": "sdk.train.seg",
    "AggTrainConfig": "sdk.train.aggregator",
    "train_aggregator": "sdk.train.aggregator",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
