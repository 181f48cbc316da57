"""Training plumbing shared by the trainers: seeding, early stopping, focal loss, class weights,
progress bars, config save, and the binary metrics (AUC, sensitivity/specificity, bootstrap CIs).

Torch is imported inside the functions that need it, so this module (and the metrics) import on a
core install.
"""
from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np

from ..errors import ConfigError
from ..tables import json_safe

__all__ = [
    "seed_everything",
    "EarlyStopping",
    "focal_loss",
    "class_weights",
    "progress",
    "save_config",
    "load_config",
    "config_from_dict",
    "roc_auc",
    "youden_threshold",
    "sens_spec",
    "bootstrap_ci",
    "binary_report",
    "paired_bootstrap_diff",
    "MAX_SEED",
    "check_counts",
    "check_numbers",
    "check_choice",
    "check_multiple",
    "check_run_basics",
    "main_error",
]

T = TypeVar("T")


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (when installed); optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import torch
    except ImportError:  # pragma: no cover - core install
        return
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class EarlyStopping:
    """Stop when the monitored value has not improved by ``min_delta`` for ``patience`` checks.

    ``step(value)`` returns True when ``value`` is a new best (save the weights then).
    """

    def __init__(self, patience: int = 3, min_delta: float = 0.0, mode: str = "max"):
        if mode not in ("max", "min"):
            raise ConfigError(f"EarlyStopping mode must be 'max' or 'min', not {mode!r}")
        if patience < 1:
            raise ConfigError(f"EarlyStopping patience must be >= 1, not {patience}")
        self.patience, self.min_delta, self.mode = patience, min_delta, mode
        self.best: Optional[float] = None
        self.best_step = -1
        self.bad = 0
        self.steps = 0

    def step(self, value: float) -> bool:
        v = float(value)
        better = self.best is None or (v > self.best + self.min_delta if self.mode == "max" else v < self.best - self.min_delta)
        if better:
            self.best, self.best_step, self.bad = v, self.steps, 0
        else:
            self.bad += 1
        self.steps += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.bad >= self.patience


def focal_loss(logits: Any, target: Any, gamma: float = 1.5, weight: Any = None) -> Any:
    """Multi-class focal loss (Lin et al. 2017; paper 001 uses gamma = 1.5), mean over the batch.

    ``FL = -w_y (1 - p_y)^gamma log p_y``; ``gamma = 0`` is weighted cross-entropy. ``weight`` is a
    per-class tensor (or None). ``logits (N, K)``, ``target (N,)`` int64.
    """
    import torch.nn.functional as F

    logp = F.log_softmax(logits.float(), dim=1)
    logp_y = logp.gather(1, target.view(-1, 1)).squeeze(1)
    p_y = logp_y.exp()
    loss = -((1.0 - p_y).clamp_min(0.0) ** gamma) * logp_y
    if weight is not None:
        loss = loss * weight.to(loss.dtype)[target]
    return loss.mean()


def class_weights(labels: Sequence[int], num_classes: int, mode: str = "balanced") -> np.ndarray:
    """Per-class loss weights: ``balanced`` = n / (K * n_k) (sklearn's rule), ``none`` = ones."""
    if mode == "none":
        return np.ones(num_classes, dtype=np.float32)
    if mode != "balanced":
        raise ConfigError(f"class_weights mode must be 'balanced' or 'none', not {mode!r}")
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise ConfigError(f"class_weights: class(es) {np.flatnonzero(counts == 0).tolist()} have no training sample")
    return (len(y) / (num_classes * counts)).astype(np.float32)


def progress(iterable: Iterable[T], desc: str = "", total: Optional[int] = None, enabled: bool = True, **kw: Any) -> Iterator[T]:
    """A tqdm progress bar on stderr (plain iteration when disabled)."""
    if not enabled:
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True, mininterval=2.0, **kw))


def save_config(cfg: Any, path: Union[str, Path], extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write a config dataclass (plus ``extra``, e.g. versions) as indented JSON."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    d = json_safe(cfg)
    if extra:
        d = {**d, "_meta": json_safe(extra)}
    p.write_text(json.dumps(d, indent=2, sort_keys=False) + "\n")
    return p


def refuse_earlier_run(found: Sequence[Path], overwrite: bool) -> None:
    """ConfigError when a training run would replace ``found`` (an earlier run's files, from the
    trainer's ``earlier_run_files(cfg)``) and ``overwrite`` is false: the Python functions refuse as
    ``ctsdk train`` does (there with its option names; here before anything is written)."""
    if found and not overwrite:
        raise ConfigError(f"{found[0].parent} holds an earlier run ({', '.join(p.name for p in found)}); pass "
                          f"overwrite=True to replace it or choose another output folder (nothing was written)")


# --- config checks (each trainer config's validate(); ctsdk train runs it before --print-config) ----
#: seeds the trainers take: NumPy's and torch's seeding accept 0 .. 2**32 - 1 everywhere (a negative
#: seed failed in NumPy's default_rng after the run folder was written)
MAX_SEED = 2**32 - 1


def _field(cfg: Any, name: str, what: str = "") -> Tuple[str, str, Any]:
    """(how a message names config field ``name`` - its class and name -, the parenthesis after
    "must be ...": its ``ctsdk train`` option and ``what``, its value)."""
    option = f"--{name.replace('_', '-')}"
    return f"{type(cfg).__name__}: {name}", f"{option}; {what}" if what else option, getattr(cfg, name)


def check_counts(cfg: Any, names: Sequence[str], *, minimum: int = 1, maximum: Optional[int] = None,
                 what: str = "") -> None:
    """ConfigError unless each field of ``names`` is a whole number from ``minimum`` to ``maximum``."""
    from ..errors import whole_number

    for name in names:
        label, note, value = _field(cfg, name, what)
        whole_number(label, value, minimum=minimum, maximum=maximum, allow_none=False, what=note)


def check_numbers(cfg: Any, names: Sequence[str], *, minimum: Optional[float] = None,
                  maximum: Optional[float] = None, min_open: bool = False, max_open: bool = False,
                  what: str = "") -> None:
    """ConfigError unless each field of ``names`` is a finite number in the range (NaN and inf never)."""
    from ..errors import finite_number

    for name in names:
        label, note, value = _field(cfg, name, what)
        finite_number(label, value, minimum=minimum, maximum=maximum, min_open=min_open, max_open=max_open,
                      what=note)


def check_choice(cfg: Any, name: str, choices: Sequence[str]) -> None:
    """ConfigError unless field ``name`` is one of ``choices``."""
    label, note, value = _field(cfg, name)
    if value not in choices:
        raise ConfigError(f"{label} must be one of {list(choices)} ({note}), got {value!r}")


def check_multiple(cfg: Any, name: str, step: int, *, minimum: int, maximum: Optional[int] = None,
                   why: str = "") -> None:
    """ConfigError unless field ``name`` is a whole number from ``minimum`` to ``maximum`` and a
    multiple of ``step`` (``why``: what needs it, e.g. a U-Net's poolings)."""
    check_counts(cfg, (name,), minimum=minimum, maximum=maximum, what=why)
    label, note, value = _field(cfg, name, why)
    if int(value) % step:
        raise ConfigError(f"{label} must be a multiple of {step} ({note}), got {value!r}")


def check_run_basics(cfg: Any) -> None:
    """The fields every torch trainer has: ``threads`` (1 to :data:`sdk.triage.MAX_THREADS`) and
    ``seed`` (0 to :data:`MAX_SEED`)."""
    from ..triage import MAX_THREADS

    check_counts(cfg, ("threads",), maximum=MAX_THREADS)
    check_counts(cfg, ("seed",), minimum=0, maximum=MAX_SEED)


def main_error(exc: Exception) -> int:
    """How a ``python -m sdk.train.*`` main reports a typed error (a bad config value, a run folder
    holding an earlier run): one ``ctsdk: error:`` line on stderr and exit code 2, as ``ctsdk train``."""
    print(f"ctsdk: error: {exc}", file=sys.stderr)
    return int(getattr(exc, "exit_code", 2))


def load_config(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a JSON config file into a dict (``_meta`` dropped)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{p}: config file not found") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p}: not valid JSON ({exc})") from exc
    except (UnicodeDecodeError, RecursionError) as exc:   # not UTF-8 text; nested past the parser's depth
        raise ConfigError(f"{p}: not a readable JSON config ({type(exc).__name__}: {str(exc)[:120]})") from exc
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: a config file holds one JSON object, found {type(d).__name__}")
    d.pop("_meta", None)
    return d


def config_from_dict(cls: type, d: Dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from ``d``; unknown keys raise ConfigError listing the valid ones."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown option(s) {unknown}; valid: {', '.join(sorted(names))}")
    return cls(**d)


# --- metrics ----------------------------------------------------------------------------------
def roc_auc(y: Sequence[int], score: Sequence[float]) -> float:
    """ROC AUC by the Mann-Whitney U statistic (ties count 1/2). NaN when one class is absent."""
    from scipy.stats import rankdata

    y = np.asarray(y, dtype=np.int64)
    s = np.asarray(score, dtype=np.float64)
    n1 = int((y == 1).sum())
    n0 = int((y == 0).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def youden_threshold(y: Sequence[int], score: Sequence[float]) -> float:
    """Threshold maximising sensitivity + specificity - 1 (predict positive when score >= t)."""
    y = np.asarray(y, dtype=np.int64)
    s = np.asarray(score, dtype=np.float64)
    cand = np.unique(s)
    best_t, best_j = 0.5, -np.inf
    for t in cand:
        se, sp = sens_spec(y, s, t)
        j = se + sp - 1.0
        if j > best_j:
            best_t, best_j = float(t), j
    return best_t


def sens_spec(y: Sequence[int], score: Sequence[float], threshold: float) -> Tuple[float, float]:
    """(sensitivity, specificity) predicting positive when ``score >= threshold``."""
    y = np.asarray(y, dtype=np.int64)
    pred = np.asarray(score, dtype=np.float64) >= threshold
    pos, neg = y == 1, y == 0
    se = float(pred[pos].mean()) if pos.any() else float("nan")
    sp = float((~pred[neg]).mean()) if neg.any() else float("nan")
    return se, sp


def bootstrap_ci(y: Sequence[int], score: Sequence[float], stat: Any, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> Tuple[float, float]:
    """Percentile bootstrap CI of ``stat(y, score)`` over images (resampled with replacement)."""
    y = np.asarray(y)
    s = np.asarray(score)
    rng = np.random.default_rng(seed)
    vals = []
    n = len(y)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        v = stat(y[idx], s[idx])
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    lo, hi = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def binary_report(y: Sequence[int], score: Sequence[float], threshold: float, n_boot: int = 1000, seed: int = 0) -> Dict[str, Any]:
    """AUC, sensitivity, specificity at ``threshold`` with 95% bootstrap CIs, counts."""
    y = np.asarray(y, dtype=np.int64)
    s = np.asarray(score, dtype=np.float64)
    se, sp = sens_spec(y, s, threshold)
    return {
        "n": int(len(y)),
        "n_pos": int((y == 1).sum()),
        "n_neg": int((y == 0).sum()),
        "auc": roc_auc(y, s),
        "auc_ci95": bootstrap_ci(y, s, roc_auc, n_boot, seed),
        "threshold": float(threshold),
        "sensitivity": se,
        "sensitivity_ci95": bootstrap_ci(y, s, lambda a, b: sens_spec(a, b, threshold)[0], n_boot, seed),
        "specificity": sp,
        "specificity_ci95": bootstrap_ci(y, s, lambda a, b: sens_spec(a, b, threshold)[1], n_boot, seed),
    }


def paired_bootstrap_diff(y: Sequence[int], score_a: Sequence[float], score_b: Sequence[float], stat: Any,
                          n_boot: int = 2000, seed: int = 0) -> Dict[str, float]:
    """``stat(y, a) - stat(y, b)`` with a paired percentile bootstrap (same resampled images for
    both models): the estimate, its 95% CI and the share of resamples where the difference <= 0."""
    y = np.asarray(y)
    a = np.asarray(score_a, dtype=np.float64)
    b = np.asarray(score_b, dtype=np.float64)
    if not (len(y) == len(a) == len(b)):
        raise ConfigError(f"paired_bootstrap_diff: lengths differ ({len(y)}, {len(a)}, {len(b)})")
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        d = stat(y[idx], a[idx]) - stat(y[idx], b[idx])
        if np.isfinite(d):
            diffs.append(d)
    dv = np.asarray(diffs)
    lo, hi = np.percentile(dv, [2.5, 97.5]) if len(dv) else (float("nan"), float("nan"))
    return {"diff": float(stat(y, a) - stat(y, b)), "ci95": (float(lo), float(hi)),
            "p_le_0": float((dv <= 0).mean()) if len(dv) else float("nan")}
