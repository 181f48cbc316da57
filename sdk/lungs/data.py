"""The seg2d lung-mask set (2D CT slices with manual lung masks): reading it and its fixed
train / val / test blocks. Used by the segmenter's evaluation (:mod:`sdk.lungs.evaluate`), its
INT8 gate and the U-Net training (:mod:`sdk.train.seg`, which re-exports these names)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from ..errors import ConfigError


def load_seg2d(data_dir: str, column: str = "lung_mask") -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read seg2d: (numbers (N,), images (N, 256, 256) uint8, masks (N, 256, 256) uint8 0/1).

    ``column`` names the index column of the masks: ``lung_mask`` (both lungs) or
    ``infection_mask`` (COVID-19 lesions, drawn on every slice of this source)."""
    import cv2

    root = Path(data_dir)
    index = root / "seg2d_index.csv"
    if not index.is_file():
        raise ConfigError(f"seg2d index not found: {index} (ctsdk train seg --data-dir: the seg2d folder of ../shared/data)")
    nums, imgs, masks = [], [], []
    with index.open() as fh:
        for row in csv.DictReader(fh):
            img = cv2.imread(str(root / row["image"]), cv2.IMREAD_GRAYSCALE)
            if not row.get(column):
                raise ConfigError(f"{index}: row {row['image']} has no {column!r} (columns: {', '.join(row)})")
            msk = cv2.imread(str(root / row[column]), cv2.IMREAD_GRAYSCALE)
            if img is None or msk is None:
                raise ConfigError(f"cannot read {root / row['image']} or its {column} {row[column]}")
            nums.append(int(Path(row["image"]).stem))
            imgs.append(img)
            masks.append((msk > 127).astype(np.uint8))
    order = np.argsort(nums)
    return np.asarray(nums)[order], np.stack(imgs)[order], np.stack(masks)[order]


def split_blocks(nums: np.ndarray, val: Tuple[int, int], test: Tuple[int, int]) -> Dict[str, np.ndarray]:
    """Indices of the train / val / test contiguous number blocks."""
    is_val = (nums >= val[0]) & (nums < val[1])
    is_test = (nums >= test[0]) & (nums < test[1])
    return {"train": np.where(~is_val & ~is_test)[0], "val": np.where(is_val)[0], "test": np.where(is_test)[0]}
