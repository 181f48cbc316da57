"""Training the patient-level XGBoost aggregator (paper 001) - ``ctsdk train aggregator``.

Inputs (see :class:`AggTrainConfig`):

1. **Real series** (``series``: a CSV with ``path,label``; path relative to the CSV's folder or
   absolute): each series is run through a bundle (``sdk.Triage``) and its selected slices'
   probabilities become one training (or, with ``series_role="eval"``, evaluation) example.
   Labels: ``covid`` -> covid; anything else (``normal``, ``non-covid``, ``cap``) -> non_covid.
2. **Bags of labelled slices** (``predictions``: the classifier's predictions.csv with
   ``path,label,source,split,patient,p_covid``), because labelled series are far too few here:
   a bag stands in for one series. Slices are drawn from the ``bag_splits`` splits only (default
   ``train``; validation bags from ``val_splits`` for early stopping and the threshold; test bags
   from ``test_splits`` for the report). Slices that share a ``patient`` id stay together and
   contiguous in a bag (patient/study grouping); slices without an id are sampled singly.
   A **non_covid bag** holds only non-COVID slices. A **covid bag** holds a fraction
   ``f ~ U(covid_fraction_min, 1)`` of COVID slices placed as 1-3 contiguous runs along the
   (synthetic) z axis, the rest non-COVID slices - real COVID series also contain unaffected
   slices. Bag lengths are uniform in ``[min_slices, max_slices]``. This is a simulation of
   series from 2D images, not real series, and the model card says so.

The slice probabilities of a bag are the classifier's own ``p_covid`` from predictions.csv
(two classes: ``[1 - p, p]``). The output is an XGBoost JSON (``sdk.aggregate.Aggregator``) and
``metrics.json`` beside it (bag AUC / sensitivity / specificity with 95% bootstrap CIs, the chosen
series threshold, per-series outcomes), plus ``config.json``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..tables import read_csv_rows
from ..errors import ConfigError, CtsdkError
from ..labels import is_positive
from . import common

CLASSES = ["non_covid", "covid"]

__all__ = ["AggTrainConfig", "train_aggregator", "make_bags", "read_predictions", "series_label", "compare_aggregators",
           "earlier_run_files"]


#: most simulated bags per class: each bag is one row of group features drawn from up to max_slices
#: slice probabilities; 10**5 is ~170x the default (600) and the trainer holds every bag in memory,
#: so a larger number is a typo, refused before any work
MAX_BAGS_PER_CLASS = 100_000
#: longest simulated bag: no chest CT series the product triages has more slices (a 0.5 mm scan of
#: a 40 cm field is 800 slices); a typo like 1e9 would allocate until memory ran out
MAX_SLICES = 2000


@dataclass
class AggTrainConfig:
    """Configuration of ``ctsdk train aggregator`` (every field is a CLI option)."""

    predictions: str = "runs/classifier/effnet_lite0_mgap/predictions.csv"  # classifier predictions.csv ('' = none)
    series: str = ""                  # CSV path,label of real series scored with `bundle` ('' = none)
    series_role: str = "train"        # "train": add series to the training set; "eval": report only
    bundle: str = ""                  # bundle used to score `series` ('' = the default bundle)
    out: str = "runs/aggregator/aggregator.json"
    bag_splits: str = "train"         # comma-separated splits the training bags are drawn from
    val_splits: str = "val"           # early stopping + threshold bags ('' = none)
    test_splits: str = "test"         # report-only bags ('' = none)
    bags_per_class: int = 600         # training bags per class (val/test: a quarter of this)
    min_slices: int = 12
    max_slices: int = 120
    covid_fraction_min: float = 0.3   # share of COVID slices in a covid bag ~ U(this, 1)
    n_groups: int = 20
    num_boost_round: int = 300
    max_depth: int = 3
    eta: float = 0.1
    early_stopping_rounds: int = 30
    n_bootstrap: int = 2000
    seed: int = 0

    def validate(self) -> None:
        """ConfigError naming the field (and its ``ctsdk train aggregator`` option), the value and what
        is allowed - run by :func:`train_aggregator` before anything is read, and by ``ctsdk train
        aggregator`` (``--print-config`` too). Before it, ``--eta 0`` trained a constant model and
        ``--n-bootstrap -5`` reported no intervals (exit 0); ``--eta -1`` / ``--seed -1`` failed in
        XGBoost / NumPy with their own errors."""
        from ..metrics import MAX_BOOTSTRAP

        common.check_choice(self, "series_role", ("train", "eval"))
        if not self.predictions and not self.series:
            raise ConfigError("nothing to train on: give predictions (bags of labelled slices) and/or series "
                              "(path,label CSV)")
        common.check_counts(self, ("min_slices", "n_groups", "num_boost_round", "early_stopping_rounds"))
        common.check_counts(self, ("bags_per_class",), maximum=MAX_BAGS_PER_CLASS)
        common.check_counts(self, ("max_slices",), minimum=int(self.min_slices), maximum=MAX_SLICES,
                            what="at least min_slices")
        common.check_counts(self, ("max_depth",), minimum=0, what="0: no limit, XGBoost's hist trees")
        common.check_counts(self, ("n_bootstrap",), minimum=0, maximum=MAX_BOOTSTRAP)
        common.check_counts(self, ("seed",), minimum=0, maximum=common.MAX_SEED)
        common.check_numbers(self, ("covid_fraction_min",), minimum=0, maximum=1)
        common.check_numbers(self, ("eta",), minimum=0, maximum=1, min_open=True, what="XGBoost's learning rate")


def earlier_run_files(cfg: AggTrainConfig) -> List[Path]:
    """Files of an earlier run that this one would replace: ``cfg.out`` itself and the
    ``metrics.json`` written beside it (``ctsdk train aggregator`` refuses them unless --overwrite)."""
    out = Path(cfg.out)
    return [p for p in (out, out.parent / "metrics.json") if p.exists()]


# --- data --------------------------------------------------------------------------------------
def series_label(label: str) -> int:
    """Index into CLASSES: covid -> 1; normal, non-covid, cap -> 0; another word raises ConfigError
    (the label words are :mod:`sdk.labels`')."""
    return is_positive(label)


def read_predictions(path: str) -> List[Dict[str, str]]:
    """Rows of a predictions.csv (needs path, label, split, patient, p_covid)."""
    p = Path(path)
    rows = read_csv_rows(p, ("label", "split", "patient", "p_covid"),
                         "predictions CSV (the classifier's predictions.csv: path,label,source,split,patient,p_covid)")
    return rows


def _units(rows: Sequence[Dict[str, str]], splits: Sequence[str]) -> Dict[int, List[np.ndarray]]:
    """{class index: [p_covid array per unit]}; a unit = one patient's slices, or one slice."""
    groups: Dict[Tuple[int, str], List[float]] = {}
    singles: Dict[int, List[np.ndarray]] = {0: [], 1: []}
    for r in rows:
        if r["split"] not in splits:
            continue
        y = series_label(r["label"])
        p = float(r["p_covid"])
        pid = (r.get("patient") or "").strip()
        if pid:
            groups.setdefault((y, f"{r.get('source', '')}/{pid}"), []).append(p)
        else:
            singles[y].append(np.array([p]))
    out = {0: list(singles[0]), 1: list(singles[1])}
    for (y, _), ps in sorted(groups.items()):
        out[y].append(np.asarray(ps, dtype=np.float64))
    return out


def _fill(units: List[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """Concatenate randomly chosen units (each kept contiguous) until n slices; trim to n."""
    parts, total = [], 0
    order = rng.permutation(len(units))
    k = 0
    while total < n:
        if k == len(order):
            order, k = rng.permutation(len(units)), 0
        u = units[order[k]]
        k += 1
        parts.append(u)
        total += u.size
    return np.concatenate(parts)[:n]


def make_bags(
    units: Dict[int, List[np.ndarray]],
    n_per_class: int,
    rng: np.random.Generator,
    *,
    min_slices: int = 12,
    max_slices: int = 120,
    covid_fraction_min: float = 0.3,
) -> Tuple[List[np.ndarray], np.ndarray]:
    """Simulated series: (list of (n, 2) slice-probability arrays in z order, labels)."""
    if not units.get(0) or (n_per_class and not units.get(1)):
        raise ConfigError("bag building needs labelled slices of both classes in the chosen splits")
    if not 1 <= min_slices <= max_slices:
        raise ConfigError(f"need 1 <= min_slices <= max_slices, got {min_slices}, {max_slices}")
    bags: List[np.ndarray] = []
    labels: List[int] = []
    for y in (0, 1):
        for _ in range(n_per_class):
            n = int(rng.integers(min_slices, max_slices + 1))
            if y == 0:
                p = _fill(units[0], n, rng)
            else:
                n_pos = max(1, int(round(rng.uniform(covid_fraction_min, 1.0) * n)))
                pos = _fill(units[1], n_pos, rng)
                neg = _fill(units[0], n - n_pos, rng) if n > n_pos else np.zeros(0)
                p = _place_runs(pos, neg, rng)
            bags.append(np.stack([1.0 - p, p], axis=1))
            labels.append(y)
    return bags, np.asarray(labels, dtype=np.int64)


def _place_runs(pos: np.ndarray, neg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Interleave positives as 1-3 contiguous runs into the negatives (order kept inside each)."""
    if neg.size == 0:
        return pos
    n_runs = int(min(pos.size, rng.integers(1, 4)))
    cuts = np.sort(rng.choice(np.arange(1, pos.size), size=n_runs - 1, replace=False)) if n_runs > 1 else np.array([], int)
    runs = np.split(pos, cuts)
    slots = np.sort(rng.choice(neg.size + 1, size=len(runs), replace=True))
    out, prev = [], 0
    for slot, run in zip(slots, runs):
        out.append(neg[prev:slot])
        out.append(run)
        prev = slot
    out.append(neg[prev:])
    return np.concatenate(out)


def _score_series(csv_path: str, bundle: str) -> Tuple[List[np.ndarray], np.ndarray, List[Dict[str, Any]]]:
    """Run the bundle over the series of a path,label CSV; returns slice probs, labels, rows."""
    from ..labels import read_series_csv
    from ..triage import Triage

    items = read_series_csv(csv_path)
    triage = Triage(bundle or None, device="cpu", precision="fp32", heatmaps=False)
    probs, labels, rows = [], [], []
    for path, label in items:
        res = triage.run(path)
        if not res.eligible or not res.slice_scores:
            rows.append({"path": str(path), "label": label, "used": False, "reasons": res.reasons})
            continue
        probs.append(np.array([[s.probabilities[c] for c in triage.classes] for s in res.slice_scores]))
        labels.append(series_label(label))
        rows.append({"path": str(path), "label": label, "used": True, "n_slices": len(res.slice_scores)})
    return probs, np.asarray(labels, dtype=np.int64), rows


# --- training ----------------------------------------------------------------------------------
def _split_list(text: str) -> List[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _features(bags: Sequence[np.ndarray], n_groups: int) -> np.ndarray:
    from ..aggregate import group_features

    return np.stack([group_features(b, n_groups) for b in bags]) if bags else np.zeros((0, n_groups * 2), np.float32)


def train_aggregator(cfg: AggTrainConfig, *, overwrite: bool = False) -> Dict[str, Any]:
    """Train, save and report (see the module docstring). Returns the metrics dict. An earlier
    run's files at ``cfg.out`` (:func:`earlier_run_files`) are refused unless ``overwrite``."""
    cfg.validate()   # every value first: nothing is read or written for a config that cannot train
    from tqdm import tqdm

    from ..aggregate import fit_aggregator
    from ..metrics import binary_metrics, youden_threshold
    from .common import refuse_earlier_run

    refuse_earlier_run(earlier_run_files(cfg), overwrite)
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    out = Path(cfg.out)  # its folder is created when the model is saved: a failed run leaves none
    bag_kw = dict(min_slices=cfg.min_slices, max_slices=cfg.max_slices, covid_fraction_min=cfg.covid_fraction_min)
    sets: Dict[str, Tuple[List[np.ndarray], np.ndarray]] = {}
    steps = [s for s, on in (("train", cfg.predictions), ("val", cfg.predictions and cfg.val_splits),
                             ("test", cfg.predictions and cfg.test_splits), ("series", cfg.series)) if on]
    rows = read_predictions(cfg.predictions) if cfg.predictions else []
    series_rows: List[Dict[str, Any]] = []
    for step in tqdm(steps, desc="aggregator data", unit="set"):
        if step == "series":
            probs, labels, series_rows = _score_series(cfg.series, cfg.bundle)
            sets["series"] = (probs, labels)
            continue
        splits = _split_list({"train": cfg.bag_splits, "val": cfg.val_splits, "test": cfg.test_splits}[step])
        n = cfg.bags_per_class if step == "train" else max(10, cfg.bags_per_class // 4)
        sets[step] = make_bags(_units(rows, splits), n, rng, **bag_kw)
    train_bags, train_y = sets.get("train", ([], np.zeros(0, np.int64)))
    train_bags = list(train_bags)
    if "series" in sets and cfg.series_role == "train":
        train_bags += sets["series"][0]
        train_y = np.concatenate([train_y, sets["series"][1]])
    if len(set(train_y.tolist())) < 2:
        raise ConfigError("training set needs both classes (covid and non_covid)")
    x_train = _features(train_bags, cfg.n_groups)
    eval_set = None
    if "val" in sets:
        eval_set = (_features(sets["val"][0], cfg.n_groups), sets["val"][1])
    info = {"trained": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": dataclasses.asdict(cfg),
            "n_train": int(len(train_y))}
    agg = fit_aggregator(x_train, train_y, CLASSES, n_groups=cfg.n_groups, eval_set=eval_set,
                         params={"max_depth": cfg.max_depth, "eta": cfg.eta}, num_boost_round=cfg.num_boost_round,
                         early_stopping_rounds=cfg.early_stopping_rounds, seed=cfg.seed, info=info)
    out.parent.mkdir(parents=True, exist_ok=True)
    agg.save(out)
    metrics: Dict[str, Any] = {"classes": CLASSES, "n_groups": cfg.n_groups, "rounds": int(agg.booster.num_boosted_rounds())}
    # threshold: Youden on validation bags if any, else 0.5
    thr = 0.5
    if eval_set is not None:
        p_val = agg.predict_features(eval_set[0])[:, 1]
        thr = youden_threshold(eval_set[1], p_val)
    metrics["threshold"] = thr
    for name in ("train", "val", "test"):
        if name not in sets:
            continue
        x = x_train[: len(sets["train"][1])] if name == "train" else _features(sets[name][0], cfg.n_groups)
        y = sets[name][1]
        p = agg.predict_features(x)[:, 1]
        metrics[f"{name}_bags"] = binary_metrics(y, p, thr, n_boot=cfg.n_bootstrap, seed=cfg.seed)
    if "series" in sets:
        s_probs, s_y = sets["series"]
        used = [r for r in series_rows if r["used"]]
        for r, sp, y in zip(used, s_probs, s_y):
            r["p_covid"] = float(agg.predict_proba(sp)["covid"])
            r["predicted"] = "covid" if r["p_covid"] >= thr else "non_covid"
            r["mean_slice_p_covid"] = float(np.mean(sp[:, 1]))
        metrics["series"] = {"role": cfg.series_role, "rows": series_rows}
    metrics["wall_s"] = round(time.perf_counter() - t0, 2)
    agg.info.update({"threshold": thr, "metrics": {k: v for k, v in metrics.items() if k.endswith("_bags")}})
    agg.save(out)
    from ..tables import json_safe

    metrics = json_safe(metrics)
    (out.parent / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out.parent / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    metrics["out"] = str(out)
    return metrics


# --- comparing aggregators on the same bags -----------------------------------------------------
def compare_aggregators(predictions: str, aggregators: Dict[str, str], thresholds: Dict[str, float],
                        config: Optional[Dict[str, Any]] = None, out: Optional[str] = None) -> Dict[str, Any]:
    """Score the SAME simulated val/test bags with several aggregators (old vs new pair).

    The bags are rebuilt exactly as ``sdk.train.aggregator.train_aggregator`` builds them
    (one ``default_rng(seed)`` drawn through the train, val and test sets in that order), from
    ``predictions`` and the trainer's config (``config.json`` of a run, or the defaults).
    Returns per aggregator: val/test bag metrics at its own threshold (95 % bootstrap CIs), and
    paired bootstrap AUC differences of every aggregator against the first one."""
    from ..aggregate import Aggregator, group_features
    from ..metrics import binary_metrics, paired_auc_difference

    cfg = AggTrainConfig(**(config or {}))
    rows = read_predictions(predictions)
    rng = np.random.default_rng(cfg.seed)
    kw = dict(min_slices=cfg.min_slices, max_slices=cfg.max_slices, covid_fraction_min=cfg.covid_fraction_min)
    sets = {}
    for step, splits in (("train", cfg.bag_splits), ("val", cfg.val_splits), ("test", cfg.test_splits)):
        n = cfg.bags_per_class if step == "train" else max(10, cfg.bags_per_class // 4)
        sets[step] = make_bags(_units(rows, _split_list(splits)), n, rng, **kw)
    res: Dict[str, Any] = {"predictions": predictions, "config": config or {}, "aggregators": {}, "paired": {}}
    scores: Dict[str, Dict[str, Any]] = {}
    for name, path in aggregators.items():
        agg = Aggregator.load(path)
        thr = float(thresholds[name])
        entry: Dict[str, Any] = {"path": str(path), "threshold": thr}
        for step in ("val", "test"):
            bags, y = sets[step]
            x = np.stack([group_features(b, cfg.n_groups) for b in bags])
            p = agg.predict_features(x)[:, 1]
            scores.setdefault(step, {})[name] = (y, p)
            entry[f"{step}_bags"] = binary_metrics(y, p, thr, n_boot=cfg.n_bootstrap, seed=cfg.seed)
        res["aggregators"][name] = entry
    first = next(iter(aggregators))
    for step, d in scores.items():
        y, p0 = d[first]
        for name, (_, p) in d.items():
            if name != first:
                res["paired"][f"{step}_bags: {name} - {first}"] = paired_auc_difference(y, p, p0, cfg.n_bootstrap, cfg.seed)
    from ..tables import json_safe

    res = json_safe(res)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2))
    return res


def main(argv: Sequence[str] = None) -> int:  # type: ignore[assignment]
    """``python -m sdk.train.aggregator --field value ...`` (same fields as ``ctsdk train aggregator``)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sdk.train.aggregator", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(AggTrainConfig):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier run at --out")
    args = vars(ap.parse_args(argv))
    overwrite = args.pop("overwrite")
    try:
        metrics = train_aggregator(AggTrainConfig(**args), overwrite=overwrite)
    except CtsdkError as exc:
        return common.main_error(exc)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
