"""Binary-classification metrics with bootstrap confidence intervals (torch-free, NumPy + SciPy).

One owner for the numbers that training (``sdk.train``), the INT8 calibration report and
``ctsdk evaluate`` (``sdk.evaluate``) all quote: ROC AUC (Mann-Whitney, ties counted half), the ROC
curve, Youden's threshold, the operating point, percentile-bootstrap CIs with a fixed seed and a
paired AUC difference. Nothing here imports the rest of the package.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .errors import ConfigError

#: Most bootstrap resamples a report may ask for (``ctsdk evaluate --n-bootstrap`` / ``n_boot``, the
#: trainers' ``n_boot`` / ``n_bootstrap``). Each resample is a pass over every case (an AUC ranks them)
#: and :func:`bootstrap_ci` keeps four Python floats per resample, for each table a report computes;
#: the Monte-Carlo error of a percentile bound (~1/sqrt(n)) stops mattering long before 10**5 (the
#: default is 2000), while 10**9 would run for days and hold over 100 GB - a typo, refused up front.
MAX_BOOTSTRAP = 100_000


def _check_binary(y: np.ndarray, p: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(np.int64).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ConfigError(f"labels ({y.size}) and scores ({p.size}) differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ConfigError("labels must be 0/1")
    return y, p


def auc(y: Sequence[int], p: Sequence[float]) -> float:
    """ROC AUC = P(score of a positive > score of a negative) + 0.5 P(tie); NaN with one class."""
    y, p = _check_binary(np.asarray(y), np.asarray(p))
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(p)  # average ranks for ties
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y: Sequence[int], p: Sequence[float]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending, starting at (0, 0) with +inf."""
    y, p = _check_binary(np.asarray(y), np.asarray(p))
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(ps))[0], ys.size - 1]
    tps = np.cumsum(ys)[distinct]
    fps = (distinct + 1) - tps
    n_pos, n_neg = max(int(ys.sum()), 1), max(int((1 - ys).sum()), 1)
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    thr = np.r_[np.inf, ps[distinct]]
    return fpr, tpr, thr


def youden_threshold(y: Sequence[int], p: Sequence[float]) -> float:
    """Threshold maximising sensitivity + specificity - 1 (ties: the one closest to 0.5)."""
    fpr, tpr, thr = roc_curve(y, p)
    j = tpr - fpr
    finite = np.isfinite(thr)
    cand = np.nonzero(finite & (j >= j[finite].max() - 1e-12))[0]
    best = cand[np.argmin(np.abs(thr[cand] - 0.5))]
    return float(thr[best])


def _point(y: np.ndarray, p: np.ndarray, threshold: float) -> Dict[str, Any]:
    pred = (p >= threshold).astype(np.int64)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    return {
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "accuracy": (tp + tn) / y.size if y.size else float("nan"),
        "confusion": {"tp": tp, "fn": fn, "fp": fp, "tn": tn},
    }


def bootstrap_ci(
    y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> Dict[str, List[float]]:
    """Percentile bootstrap CIs of auc/sensitivity/specificity/accuracy (cases resampled, seeded)."""
    y, p = _check_binary(y, p)
    rng = np.random.default_rng(seed)
    stats: Dict[str, List[float]] = {"auc": [], "sensitivity": [], "specificity": [], "accuracy": []}
    n = y.size
    for _ in range(int(n_boot)):
        idx = rng.integers(0, n, n)
        yb, pb = y[idx], p[idx]
        stats["auc"].append(auc(yb, pb))
        pt = _point(yb, pb, threshold)
        for k in ("sensitivity", "specificity", "accuracy"):
            stats[k].append(pt[k])
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for k, v in stats.items():
        a = np.asarray(v, dtype=np.float64)
        a = a[np.isfinite(a)]
        out[k] = [float(np.percentile(a, lo)), float(np.percentile(a, hi))] if a.size else [float("nan")] * 2
    return out


def binary_metrics(y: Sequence[int], p: Sequence[float], threshold: float, *, n_boot: int = 2000, seed: int = 0) -> Dict[str, Any]:
    """AUC, sensitivity, specificity, accuracy, confusion at ``threshold`` + 95% bootstrap CIs."""
    y, p = _check_binary(np.asarray(y), np.asarray(p))
    out: Dict[str, Any] = {"n": int(y.size), "n_pos": int(y.sum()), "n_neg": int((1 - y).sum()),
                           "threshold": float(threshold), "auc": auc(y, p)}
    out.update(_point(y, p, threshold))
    out["ci95"] = bootstrap_ci(y, p, threshold, n_boot=n_boot, seed=seed) if n_boot > 0 and y.size else {}
    out["bootstrap"] = {"n": int(n_boot), "seed": int(seed), "method": "percentile, cases resampled"}
    return out



def auc_with_ci(y: np.ndarray, s: np.ndarray, n_boot: int = 2000, seed: int = 0) -> Dict[str, Any]:
    """``{"n", "n_pos", "auc", "ci95"}`` (percentile bootstrap of the AUC, slices resampled, seeded)."""
    y = np.asarray(y).astype(np.int64)
    s = np.asarray(s, np.float64)
    d: Dict[str, Any] = {"n": int(y.size), "n_pos": int(y.sum()), "auc": auc(y, s) if y.size else float("nan")}
    if n_boot > 0 and 0 < y.sum() < y.size:
        rng = np.random.default_rng(seed)
        vals = []
        for _ in range(int(n_boot)):
            idx = rng.integers(0, y.size, y.size)
            vals.append(auc(y[idx], s[idx]))
        a = np.asarray(vals)
        a = a[np.isfinite(a)]
        d["ci95"] = [float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5))]
    return d


def paired_auc_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> Dict[str, Any]:
    """AUC(a) - AUC(b) on the same slices with a paired percentile bootstrap (the same resampled
    slices for both scores): ``{"diff", "ci95", "p_le_0"}`` (share of resamples with diff <= 0)."""
    y = np.asarray(y).astype(np.int64)
    d: Dict[str, Any] = {"diff": auc(y, a) - auc(y, b)}
    if n_boot > 0 and 0 < y.sum() < y.size:
        rng = np.random.default_rng(seed)
        vals = []
        for _ in range(int(n_boot)):
            idx = rng.integers(0, y.size, y.size)
            vals.append(auc(y[idx], a[idx]) - auc(y[idx], b[idx]))
        v = np.asarray(vals)
        v = v[np.isfinite(v)]
        d["ci95"] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
        d["p_le_0"] = float(np.mean(v <= 0))
    return d
