"""Patient-level aggregation of slice scores (paper 001, Bougourzi et al.).

The selected slices of a series, in z order (ascending, inferior to superior), are split into
``G = 20`` ordered groups and the per-class slice probabilities are averaged per group, giving a
``G x K`` feature matrix (flattened group-major: ``[g0_c0, g0_c1, g1_c0, ...]``). An XGBoost model
maps those features to the patient-level class probabilities.

**Grouping rule (any number of slices, n >= 1).** The slice-score profile is treated as piecewise
constant over the slice positions (slice ``j`` covers ``[j, j+1)``); group ``g`` covers the equal
length cell ``[g n/G, (g+1) n/G)`` and its feature is the exact average of the profile over that
cell (the "area" rule of docs/conventions.md). Consequences:

- ``n`` a multiple of ``G``: plain block means of ``n/G`` consecutive slices (paper 001's
  "20 groups with the same number of slices");
- ``n > G`` otherwise: a slice straddling two cells contributes to both with its overlap weight;
- ``n < G``: each group is a slice repeated, or an overlap-weighted mix of two neighbours
  (e.g. 10 slices: every slice fills 2 groups);
- ``n == 1``: all groups equal that slice.

An exact, independent construction (used by the tests): repeat every slice ``G`` times
(``n*G`` samples) and average consecutive blocks of ``n``.

xgboost is imported lazily (``import sdk.aggregate`` does not import it).
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from .errors import BundleError, ConfigError, MissingDependencyError

N_GROUPS = 20
PathLike = Union[str, Path]

__all__ = [
    "N_GROUPS",
    "group_features",
    "group_matrix",
    "Aggregator",
    "fit_aggregator",
    "xgboost_module",
]


def xgboost_module() -> Any:
    """Import xgboost lazily; a missing install becomes MissingDependencyError."""
    try:
        import xgboost  # noqa: WPS433 (lazy on purpose)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("xgboost-cpu", "patient-level aggregation (XGBoost)") from exc
    return xgboost


def _area_weights(n: int, n_groups: int) -> np.ndarray:
    """(G, n) overlap weights of slice cells ``[j, j+1)`` with group cells, rows summing to 1."""
    edges = np.arange(n_groups + 1, dtype=np.float64) * (n / n_groups)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1.0) - np.maximum(lo, j), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def group_matrix(slice_probs: np.ndarray, n_groups: int = N_GROUPS) -> np.ndarray:
    """Average per-class slice probabilities over ``n_groups`` ordered groups.

    Args:
        slice_probs: (n, K) probabilities of the selected slices in z order (n >= 1), or (n,)
            for a single class column.
        n_groups: number of groups G (paper 001: 20).

    Returns:
        (G, K) float32 group means (the rule is in the module docstring).

    Raises:
        ConfigError: no slices, non-finite values or a bad ``n_groups``.
    """
    p = np.asarray(slice_probs, dtype=np.float64)
    if p.ndim == 1:
        p = p[:, None]
    if p.ndim != 2:
        raise ConfigError(f"slice probabilities must be (n_slices, n_classes), got shape {p.shape}")
    if n_groups < 1:
        raise ConfigError(f"n_groups must be >= 1, got {n_groups}")
    n = p.shape[0]
    if n == 0:
        raise ConfigError("cannot aggregate zero slices: slice selection kept no slice (check the lung mask)")
    if not np.all(np.isfinite(p)):
        raise ConfigError("slice probabilities contain NaN or inf")
    return (_area_weights(n, n_groups) @ p).astype(np.float32)


def group_features(slice_probs: np.ndarray, n_groups: int = N_GROUPS) -> np.ndarray:
    """Flattened (G*K,) feature vector, group-major (``[g0_c0, g0_c1, g1_c0, ...]``)."""
    return group_matrix(slice_probs, n_groups).reshape(-1)


@dataclass
class Aggregator:
    """An XGBoost patient-level classifier over grouped slice probabilities.

    Attributes:
        booster: the ``xgboost.Booster``.
        classes: class names, in the order of the slice classifier's outputs.
        n_groups: G (20).
        info: free-form metadata saved into the model file (training data, metrics...).

    ``predict_proba`` is safe to call from several threads (a lock guards the booster).
    """

    booster: Any
    classes: List[str]
    n_groups: int = N_GROUPS
    info: Dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def n_features(self) -> int:
        return self.n_groups * len(self.classes)

    # --- inference ------------------------------------------------------------------------------
    def features(self, slice_probs: np.ndarray) -> np.ndarray:
        """(G*K,) features of one series; checks the class count."""
        p = np.asarray(slice_probs)
        if p.ndim != 2 or p.shape[1] != len(self.classes):
            raise ConfigError(
                f"aggregator expects (n_slices, {len(self.classes)}) probabilities for classes "
                f"{self.classes}, got shape {p.shape}"
            )
        return group_features(p, self.n_groups)

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """(B, G*K) features -> (B, K) class probabilities (rows sum to 1)."""
        x = np.atleast_2d(np.asarray(features, dtype=np.float32))
        if x.shape[1] != self.n_features:
            raise ConfigError(f"aggregator expects {self.n_features} features, got {x.shape[1]}")
        with self._lock:
            raw = np.asarray(self.booster.inplace_predict(x, validate_features=False), dtype=np.float64)
        if len(self.classes) == 2:
            pos = raw.reshape(-1)
            out = np.stack([1.0 - pos, pos], axis=1)
        else:
            out = raw.reshape(x.shape[0], len(self.classes))
        return out

    def predict_proba(self, slice_probs: np.ndarray) -> Dict[str, float]:
        """Class probabilities of one series from its (n, K) slice probabilities."""
        probs = self.predict_features(self.features(slice_probs)[None, :])[0]
        return {c: float(v) for c, v in zip(self.classes, probs)}

    def contributions(self, slice_probs: np.ndarray) -> np.ndarray:
        """Exact per-feature contributions (TreeSHAP, XGBoost ``pred_contribs``) to the margin.

        Returns (G*K + 1,) logit contributions for two classes (last entry: the bias; they sum to
        the logit of the positive class), or (K, G*K + 1) for more classes.
        """
        xgb = xgboost_module()
        x = self.features(slice_probs)[None, :].astype(np.float32)
        with self._lock:
            c = np.asarray(self.booster.predict(xgb.DMatrix(x, nthread=1), pred_contribs=True), dtype=np.float64)
        return c[0]

    def contribution_summary(self, slice_probs: np.ndarray) -> Dict[str, float]:
        """Contributions summed per class column (``groups_<class>``, over the G groups) and ``bias``."""
        c = self.contributions(slice_probs)
        if c.ndim != 1:  # multi-class: report the last class's margin (positive class last by convention)
            c = c[-1]
        k = len(self.classes)
        per = c[:-1].reshape(self.n_groups, k).sum(axis=0)
        out = {f"groups_{cls}": float(v) for cls, v in zip(self.classes, per)}
        out["bias"] = float(c[-1])
        return out

    # --- persistence ----------------------------------------------------------------------------
    def save(self, path: PathLike) -> Path:
        """Write the XGBoost JSON model with ctsdk metadata in its attributes."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.booster.set_attr(
            ctsdk_classes=json.dumps(self.classes),
            ctsdk_n_groups=str(self.n_groups),
            ctsdk_info=json.dumps(self.info, sort_keys=True),
        )
        self.booster.save_model(str(path))
        return path

    @classmethod
    def load(cls, path: PathLike) -> "Aggregator":
        """Read an XGBoost JSON model written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"{path}: aggregator model not found (expected an XGBoost JSON file)")
        xgb = xgboost_module()
        booster = xgb.Booster()
        try:
            booster.load_model(str(path))
        except Exception as exc:  # xgboost raises its own XGBoostError
            raise BundleError(f"{path}: not a readable XGBoost model ({exc})") from exc
        classes_attr = _attr(booster, path, "ctsdk_classes")
        if not classes_attr:
            raise BundleError(f"{path}: XGBoost model lacks the 'ctsdk_classes' attribute; write it with sdk.aggregate.Aggregator.save")
        classes = _attr_json(path, "ctsdk_classes", classes_attr, "a JSON list of class names",
                             lambda v: isinstance(v, list) and bool(v) and all(isinstance(c, str) for c in v))
        n_groups = _attr_json(path, "ctsdk_n_groups", _attr(booster, path, "ctsdk_n_groups") or str(N_GROUPS),
                              "a whole number of groups >= 1", lambda v: type(v) is int and v >= 1)
        info = _attr_json(path, "ctsdk_info", _attr(booster, path, "ctsdk_info") or "{}", "a JSON object",
                          lambda v: isinstance(v, dict))
        # one row per series: a single thread is fastest and does not compete with ORT's threads
        booster.set_param({"nthread": 1})
        agg = cls(booster=booster, classes=list(classes), n_groups=n_groups, info=info)
        n_feat = booster.num_features()
        if n_feat and n_feat != agg.n_features:
            raise BundleError(f"{path}: model has {n_feat} features, expected {agg.n_features} ({n_groups} groups x {len(classes)} classes)")
        return agg


def _attr(booster: Any, path: Path, key: str) -> Optional[str]:
    """A ctsdk attribute of a loaded booster (None when absent); BundleError where xgboost cannot read it."""
    try:
        return booster.attr(key)
    except Exception as exc:  # xgboost asserts on an empty attribute value
        raise BundleError(f"{path}: XGBoost model attribute {key!r} cannot be read ({type(exc).__name__}); write the model "
                          f"with sdk.aggregate.Aggregator.save (ctsdk train aggregator)") from exc


def _attr_json(path: Path, key: str, text: str, want: str, ok: Callable[[Any], bool]) -> Any:
    """Attribute ``key`` parsed as JSON and checked by ``ok``; BundleError naming the file, the key and ``want``."""
    try:
        value = json.loads(text)
        good = bool(ok(value))
    except (ValueError, RecursionError):
        good = False
    if not good:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise BundleError(f"{path}: XGBoost model attribute {key!r} = {shown!r} is not {want}; write the model with "
                          f"sdk.aggregate.Aggregator.save (ctsdk train aggregator)")
    return value


def fit_aggregator(
    features: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    *,
    n_groups: int = N_GROUPS,
    eval_set: Optional[tuple] = None,
    params: Optional[Dict[str, Any]] = None,
    num_boost_round: int = 200,
    early_stopping_rounds: int = 20,
    seed: int = 0,
    info: Optional[Dict[str, Any]] = None,
) -> Aggregator:
    """Train an XGBoost aggregator on (B, G*K) features and integer labels (index into classes).

    Uses ``binary:logistic`` for two classes and ``multi:softprob`` otherwise; single-threaded
    ``hist`` trees with a fixed seed so a rerun gives the same model. With ``eval_set = (X, y)``
    training stops early on its log-loss.
    """
    xgb = xgboost_module()
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    k = len(classes)
    if x.ndim != 2 or x.shape[1] != n_groups * k:
        raise ConfigError(f"features must be (n, {n_groups * k}), got {x.shape}")
    if y.shape != (x.shape[0],) or y.min(initial=0) < 0 or y.max(initial=0) >= k:
        raise ConfigError(f"labels must be {x.shape[0]} integers in [0, {k})")
    p: Dict[str, Any] = {
        "max_depth": 3,
        "eta": 0.1,
        "subsample": 0.8,
        "colsample_bytree": 0.8,
        "min_child_weight": 2.0,
        "tree_method": "hist",
        "nthread": 1,
        "seed": seed,
    }
    if k == 2:
        p.update(objective="binary:logistic", eval_metric="logloss")
    else:
        p.update(objective="multi:softprob", num_class=k, eval_metric="mlogloss")
    p.update(params or {})
    dtrain = xgb.DMatrix(x, label=y)
    evals = [(dtrain, "train")]
    kwargs: Dict[str, Any] = {}
    if eval_set is not None:
        dval = xgb.DMatrix(np.asarray(eval_set[0], dtype=np.float32), label=np.asarray(eval_set[1]))
        evals.append((dval, "val"))
        kwargs["early_stopping_rounds"] = early_stopping_rounds
    booster = xgb.train(p, dtrain, num_boost_round=num_boost_round, evals=evals, verbose_eval=False, **kwargs)
    if eval_set is not None and getattr(booster, "best_iteration", None) is not None:
        booster = booster[: booster.best_iteration + 1]
    return Aggregator(booster=booster, classes=list(classes), n_groups=n_groups, info=dict(info or {}))
