"""Small, dependency-free classification metrics used by the INT8 report (no scikit-learn)."""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np


def roc_auc(y_true: Sequence[int], score: Sequence[float]) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties count 1/2
    (Mann-Whitney U / (n_pos * n_neg), average ranks for ties). NaN when one class is absent."""
    from scipy.stats import rankdata

    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"roc_auc: y_true {y.shape} and score {s.shape} differ in shape")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_summary(y_true: Sequence[int], p_pos: Sequence[float], threshold: float = 0.5) -> Dict[str, float]:
    """AUC, accuracy, sensitivity and specificity at ``threshold`` for positive-class probabilities."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_pos, dtype=np.float64)
    pred = (p >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    return {
        "auc": roc_auc(y, p),
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "sensitivity": tp / pos if pos else float("nan"),
        "specificity": tn / neg if neg else float("nan"),
        "n": int(len(y)), "n_pos": pos, "n_neg": neg,
    }


__all__ = ["binary_summary", "roc_auc"]
