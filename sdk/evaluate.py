"""Evaluation of a bundle: ``ctsdk evaluate (--images CSV | --series CSV)``.

Two inputs:

- **Images** (slice level): a CSV in the format of ``images_index.csv`` - columns ``path, label,
  source, split, patient``; ``path`` relative to the CSV's folder, or to ``--data-root``.
  Labels ``covid`` are positive; ``non-covid`` / ``normal`` negative. Each 8-bit image gets a
  lung mask at its native size from the bundle's 2D U-Net (``sdk.lungs.segment_slices_2d``), then
  the classifier's evaluation transform (:func:`eval_image_input` = ``sdk.train.data.eval_input``,
  letterbox to 224), then the bundle's FP32 classifier on ONNX Runtime CPU. Scored on P(covid) at the
  bundle's **slice** threshold.
- **Series** (patient level): a CSV with ``path,label`` (path to a DICOM folder/file, relative to
  the CSV's folder or absolute; label ``covid`` positive, anything else - ``normal``,
  ``non-covid``, ``cap`` - negative). Each series runs through :class:`sdk.Triage`; scored on the
  aggregator's P(covid) at the bundle's **series** threshold. Non-eligible series are listed and
  left out of the metrics. Optional columns ``slice_labels`` (``.npy``, rows = cases, columns =
  slices in ascending slice location) and ``slice_labels_row`` add **slice-level** metrics on the
  selected slices (every slice of a negative series counts as negative).

Per-slice scores (``slice_scores`` in the report, issue 14): the AUC with its bootstrap CI of (i)
the CNN's P(covid), (ii) the slice's ground-glass fraction, (iii) its consolidation fraction
(``sdk.opacity``, fixed HU rules) and (iv) the bundle's fused ``slice_score`` (``sdk.slice_score``),
plus the paired difference fused - CNN: for series pooled, positives vs the negative series'
slices, and per series (with both labels: within it; a negative series: the positive series'
infected slices vs its slices), with an explicit leave-one-series-out statement (nothing there is
fitted on the real series); for ``--images --render hu`` on the estimated HU, pooled and per
source. A ROC PNG with the four curves (``roc_*_scores.png``).

Metrics: ROC AUC (Mann-Whitney, ties counted half), sensitivity, specificity, accuracy, the
confusion matrix, a per-source breakdown, and 95% percentile-bootstrap CIs (resampling cases with
a fixed seed, so a rerun reproduces every number); ROC curve PNG (matplotlib Agg).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .labels import (  # noqa: F401 - part of this module's API since 0.1
    LABEL_ORDERS, POSITIVE, align_slice_labels, is_positive, read_images_csv, read_series_csv, read_series_rows,
)
from .metrics import (  # noqa: F401 - part of this module's API since 0.1
    MAX_BOOTSTRAP, auc, auc_with_ci, binary_metrics, bootstrap_ci, paired_auc_difference, roc_curve, youden_threshold,
)
from .tables import json_safe
from .errors import ConfigError, CtsdkError, whole_number

PathLike = Union[str, Path]

__all__ = [
    "auc",
    "roc_curve",
    "binary_metrics",
    "bootstrap_ci",
    "youden_threshold",
    "read_images_csv",
    "read_series_csv",
    "align_slice_labels",
    "eval_image_input",
    "evaluate_images",
    "evaluate_series",
    "plot_roc",
    "auc_with_ci",
    "paired_auc_difference",
    "EvalReport",
]


# --- inputs ------------------------------------------------------------------------------------
def eval_image_input(grey01: np.ndarray, lung_mask: np.ndarray, size: int) -> np.ndarray:
    """The classifier's evaluation transform of an 8-bit image -> (3, size, size) float32.

    This *is* the training code's transform (``sdk.train.data.eval_input``: letterbox to
    ``size``, bilinear grey, nearest mask, channels grey / mask / grey x mask), imported from that
    torch-free module so training and evaluation cannot drift.
    """
    from .train.data import eval_input

    return np.asarray(eval_input(grey01, lung_mask, size), dtype=np.float32)


def hu_image_input(grey01: np.ndarray, lung_mask: np.ndarray, size: int,
                   window: Tuple[float, float], opacity: Optional[Dict[str, float]] = None) -> Tuple[Optional[np.ndarray], str]:
    """An 8-bit image as the runtime would render it from HU: the grey->HU map estimated from the
    image's anatomy (``sdk.train.hu_estimate``), letterboxed with air, resized and windowed with
    the runtime's rules. Returns ``(input (3, S, S), "")`` or ``(None, reason)``.

    ``opacity``: a dict that receives the image's ground glass / consolidation fractions on the
    estimated HU (``ggo``, ``cons``, ``lung_px``; :func:`sdk.train.slice_score.image_opacity`)."""
    from .train.hu_estimate import estimate_hu_map, grey_to_hu, render_hu_image
    from .train.real_slices import render_inputs

    est = estimate_hu_map(grey01, lung_mask)
    if not est.ok:
        return None, est.reason
    if opacity is not None:
        from .train.slice_score import image_opacity

        opacity.update(image_opacity(grey_to_hu(grey01, est), lung_mask))
    hu, m = render_hu_image(grey01, lung_mask, est, size)
    return render_inputs(hu[None], m[None], window)[0], ""


def image_lung_mask(grey01: np.ndarray, lungs_session: Any) -> np.ndarray:
    """Lung mask of one 8-bit image at its native size with the bundle's 2D U-Net."""
    from .lungs import segment_slices_2d

    return np.asarray(segment_slices_2d(grey01[None], lungs_session)[0], dtype=np.uint8)


# --- report ------------------------------------------------------------------------------------
@dataclass
class EvalReport:
    """What ``ctsdk evaluate`` prints with --json."""

    kind: str                                 # "images" | "series"
    bundle: Dict[str, Any]
    overall: Dict[str, Any]
    #: metrics per group: the image's source dataset (images), the CSV's label word (series); the
    #: JSON names it ``per_source`` or ``per_label`` accordingly (:attr:`breakdown_key`)
    per_source: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    cases: List[Dict[str, Any]] = field(default_factory=list)
    excluded: List[Dict[str, Any]] = field(default_factory=list)
    files: Dict[str, str] = field(default_factory=dict)
    source: Dict[str, Any] = field(default_factory=dict)
    slice_level: Dict[str, Any] = field(default_factory=dict)
    slice_scores: Dict[str, Any] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def breakdown_key(self) -> str:
        """JSON key of :attr:`per_source`: ``per_source`` (images: by dataset) or ``per_label`` (series)."""
        return "per_label" if self.kind == "series" else "per_source"

    def to_dict(self, with_cases: bool = True) -> Dict[str, Any]:
        d = {"kind": self.kind, "bundle": self.bundle, "input": self.source, "overall": self.overall,
             self.breakdown_key: self.per_source, "excluded": self.excluded, "files": self.files, "wall_s": round(self.wall_s, 2)}
        if self.slice_level:
            d["slice_level"] = self.slice_level
        if self.slice_scores:
            d["slice_scores"] = self.slice_scores
        d["warnings"] = self.warnings
        if with_cases:
            d["cases"] = self.cases
        return json_safe(d)


def plot_roc(curves: Dict[str, Tuple[np.ndarray, np.ndarray, float]], path: PathLike, title: str = "ROC") -> Path:
    """Write a ROC PNG (matplotlib Agg) with one line per named curve (fpr, tpr, auc)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for name, (fpr, tpr, a) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUC {a:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _report(kind: str, bundle: Any, y: np.ndarray, p: np.ndarray, sources: List[str], threshold: float,
            cases: List[Dict[str, Any]], out: Optional[PathLike], n_boot: int, seed: int) -> EvalReport:
    overall = binary_metrics(y, p, threshold, n_boot=n_boot, seed=seed)
    per_source = {}
    for s in sorted(set(sources)):
        m = np.asarray([x == s for x in sources])
        per_source[s] = binary_metrics(y[m], p[m], threshold, n_boot=n_boot, seed=seed)
    rep = EvalReport(kind=kind, bundle={"name": bundle.name, "version": bundle.version, "path": str(bundle.root)},
                     overall=overall, per_source=per_source, cases=cases)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        curves = {"all": (*roc_curve(y, p)[:2], overall["auc"])} if len(set(y.tolist())) == 2 else {}
        for s, m in per_source.items():
            sel = np.asarray([x == s for x in sources])
            if len(set(y[sel].tolist())) == 2 and len(per_source) > 1:
                curves[s] = (*roc_curve(y[sel], p[sel])[:2], m["auc"])
        if curves:
            rep.files["roc_png"] = str(plot_roc(curves, out / f"roc_{kind}.png", title=f"{bundle.name} {bundle.version}: {kind}"))
        rep.files["report_json"] = str(out / f"evaluation_{kind}.json")
    return rep


#: below this many positive or negative cases a bootstrap CI says little (a resample often holds
#: one class only, or the same few cases): the report warns instead of letting "[1.000, 1.000]" pass
MIN_CASES_PER_CLASS = 5


def few_cases_warning(y: np.ndarray, what: str) -> List[str]:
    """A warning when ``y`` holds fewer than :data:`MIN_CASES_PER_CLASS` cases of either class."""
    n_pos = int(np.sum(y == 1))
    n_neg = int(np.sum(y == 0))
    if min(n_pos, n_neg) >= MIN_CASES_PER_CLASS:
        return []
    return [f"{what}-level metrics rest on {n_pos} positive and {n_neg} negative {what}: with fewer than "
            f"{MIN_CASES_PER_CLASS} of a class the AUC, sensitivity, specificity and their bootstrap CIs are not "
            f"informative (the slice-level tables, if any, carry more cases but are correlated within a {what})"]


# --- evaluation runs ---------------------------------------------------------------------------
def check_bootstrap(n_boot: Any, seed: Any) -> None:
    """ConfigError unless ``n_boot`` is a whole number from 0 to :data:`sdk.metrics.MAX_BOOTSTRAP`
    and ``seed`` one >= 0 - checked before any series is triaged (a negative seed failed in NumPy
    after all the work; 10**9 resamples ran for hours after it)."""
    whole_number("n_boot", n_boot, minimum=0, maximum=MAX_BOOTSTRAP, allow_none=False,
                 what="bootstrap resamples; ctsdk evaluate --n-bootstrap")
    whole_number("seed", seed, minimum=0, allow_none=False)


def evaluate_images(
    csv_path: PathLike,
    bundle: Any = None,
    *,
    split: Optional[str] = None,
    data_root: Optional[PathLike] = None,
    out: Optional[PathLike] = None,
    batch: int = 32,
    threads: Optional[int] = None,
    precision: str = "fp32",
    n_boot: int = 2000,
    seed: int = 0,
    progress: bool = True,
    render: str = "auto",
) -> EvalReport:
    """Slice-level evaluation of the bundle's lung U-Net + classifier (ORT CPU, ``precision``'s
    ONNX file) on labelled 8-bit images.

    ``render``: how an 8-bit image becomes the classifier input - ``"8bit"`` (letterbox of the grey
    values, :func:`eval_image_input`), ``"hu"`` (grey->HU estimated from the image's anatomy and
    re-rendered through the runtime's window, :func:`hu_image_input`; images whose map cannot be
    estimated are listed in ``excluded``), or ``"auto"`` (the bundle manifest's
    ``image_render``, default ``"8bit"``)."""
    check_bootstrap(n_boot, seed)
    from tqdm import tqdm

    from .bundle import Bundle, load_bundle
    from .lungs.unet2d import open_session as open_lungs

    t0 = time.perf_counter()
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    rows = read_images_csv(csv_path, split, data_root)
    from .runtime.ort import OrtSession

    files = b.classifier_paths()
    if precision not in files:
        raise ConfigError(f"bundle {b.root} has no {precision} classifier (has {sorted(files)})")
    classifier = OrtSession(files[precision], device="cpu", threads=threads, precision=precision)
    lungs = open_lungs(b.lungs_path, threads)
    size = b.input_size
    pos_idx = b.classes.index(b.positive_class)
    from .train.data import load_grey

    if render == "auto":
        render = str(b.manifest.get("image_render", "8bit"))
    if render not in ("8bit", "hu"):
        raise ConfigError(f"render must be '8bit', 'hu' or 'auto', not {render!r}")
    scores = np.full(len(rows), np.nan)
    fractions = np.full((len(rows), 2), np.nan)     # ground glass, consolidation (HU render only)
    model = b.slice_score_model if render == "hu" else None
    excluded: List[Dict[str, Any]] = []
    for i in tqdm(range(0, len(rows), batch), desc="evaluate images", unit="batch", disable=not progress):
        chunk = rows[i : i + batch]
        x, at = [], []
        for j, r in enumerate(chunk):
            grey = load_grey(r["abspath"])
            mask = image_lung_mask(grey, lungs)
            if render == "hu":
                op: Dict[str, float] = {}
                xi, reason = hu_image_input(grey, mask, size, b.window, opacity=op if model is not None else None)
                if xi is None:
                    excluded.append({"path": r["path"], "label": r["label"], "reason": f"grey->HU not estimable: {reason}"})
                    continue
                if op:
                    fractions[i + j] = (op["ggo"], op["cons"])
            else:
                xi = eval_image_input(grey, mask, size)
            x.append(xi)
            at.append(i + j)
        if x:
            scores[at] = np.asarray(classifier.infer({"image": np.stack(x)})["probs"])[:, pos_idx]
    keep = np.isfinite(scores)
    rows = [r for r, k in zip(rows, keep) if k]
    scores = scores[keep]
    fractions = fractions[keep]
    y = np.asarray([is_positive(r["label"]) for r in rows], dtype=np.int64)
    sources = [r.get("source", "") or "(none)" for r in rows]
    cases = [{"path": r["path"], "label": r["label"], "source": s, "p_covid": float(p)} for r, s, p in zip(rows, sources, scores)]
    rep = _report("images", b, y, scores, sources, b.slice_threshold, cases, out, n_boot, seed)
    if model is not None:
        fused = np.asarray(model.score(scores, fractions[:, 0], fractions[:, 1]), dtype=np.float64).reshape(-1)
        for c, (g, k), f in zip(cases, fractions, fused):
            c.update({"ggo_fraction": g, "consolidation_fraction": k, "slice_score": float(f)})
        named = _named_scores(scores, fractions[:, 0], fractions[:, 1], fused, model.missing_fraction)
        rep.slice_scores = {"pooled": _auc_table(y, named, n_boot, seed),
                            "per_source": {src: _auc_table(y[m], {k: v[m] for k, v in named.items()}, n_boot, seed)
                                           for src in sorted(set(sources))
                                           for m in [np.asarray([x == src for x in sources])]},
                            "model": model.to_manifest(), "note": SCORES_NOTE}
        if out is not None:
            rep.files["roc_scores_png"] = str(_plot_scores(y, named, rep.slice_scores["pooled"], Path(out) / "roc_images_scores.png",
                                                           f"{b.name} {b.version}: images ({split or 'all'})"))
    rep.excluded = excluded
    rep.source = {"csv": str(csv_path), "split": split, "data_root": None if data_root is None else str(data_root),
                  "n": len(rows) + len(excluded), "render": render, "runtime": classifier.info.to_dict()}
    rep.wall_s = time.perf_counter() - t0
    _write(rep)
    return rep


def evaluate_series(
    csv_path: PathLike,
    bundle: Any = None,
    *,
    out: Optional[PathLike] = None,
    device: str = "cpu",
    precision: str = "fp32",
    n_boot: int = 2000,
    seed: int = 0,
    progress: bool = True,
) -> EvalReport:
    """Series-level evaluation through :class:`sdk.Triage` (aggregator P(covid) at the series threshold)."""
    check_bootstrap(n_boot, seed)
    from tqdm import tqdm

    from .triage import Triage

    t0 = time.perf_counter()
    items = read_series_rows(csv_path)
    triage = Triage(bundle, device=device, precision=precision, heatmaps=False)
    b = triage.bundle
    per_row: Dict[str, Any] = {}

    def triage_for(row_bundle: Optional[Path]) -> Any:
        if row_bundle is None:
            return triage
        key = str(Path(row_bundle).resolve())
        if key not in per_row:
            per_row[key] = Triage(row_bundle, device=device, precision=precision, heatmaps=False)
        return per_row[key]

    ys, ps, sources, cases, excluded = [], [], [], [], []
    sl_p: List[float] = []
    sl_g: List[float] = []
    sl_c: List[float] = []
    sl_f: List[float] = []
    sl_z: List[float] = []
    sl_y: List[int] = []
    sl_in_pos_series: List[bool] = []
    sl_case: List[int] = []
    for item in tqdm(items, desc="evaluate series", unit="series", disable=not progress):
        path, label, labels = item["path"], item["label"], item["slice_labels"]
        tri = triage_for(item.get("bundle"))
        try:
            res = tri.run(path)
        except CtsdkError as exc:
            excluded.append({"path": str(path), "label": label, "error": f"{type(exc).__name__}: {exc}"})
            continue
        if not res.eligible:
            excluded.append({"path": str(path), "label": label, "reasons": res.reasons})
            continue
        p = res.probabilities[b.positive_class]
        y = is_positive(label)
        ys.append(y)
        ps.append(p)
        sources.append(label)
        slice_p = np.array([s.probabilities[b.positive_class] for s in res.slice_scores])
        case = {"path": str(path), "label": label, "predicted": res.label, "p_covid": float(p),
                "bundle": f"{tri.bundle.name} {tri.bundle.version} ({tri.bundle.root})",
                "mean_slice_p_covid": float(slice_p.mean()), "n_slices": len(res.slice_scores),
                "lung_volume_ml": res.lung_volume_ml, "total_ms": res.timings_ms.get("total")}
        # slice level: every slice of a negative series is negative; a positive series needs labels
        idx = np.array([s.index for s in res.slice_scores])
        if y == 0:
            slice_y = np.zeros(idx.size, np.int64)
        elif labels is not None:
            n_z = int(res.shape[0]) if res.shape else int(idx.max()) + 1
            slice_y = align_slice_labels(labels, n_z, item.get("slice_labels_order", "z"))[idx]
        else:
            slice_y = None
        if slice_y is not None:
            sl_p.extend(slice_p.tolist())
            sl_g.extend(np.nan if sc.ggo_fraction is None else sc.ggo_fraction for sc in res.slice_scores)
            sl_c.extend(np.nan if sc.consolidation_fraction is None else sc.consolidation_fraction for sc in res.slice_scores)
            sl_f.extend(np.nan if sc.slice_score is None else sc.slice_score for sc in res.slice_scores)
            sl_z.extend(np.nan if sc.z_context_score is None else sc.z_context_score for sc in res.slice_scores)
            sl_y.extend(int(v) for v in slice_y)
            sl_in_pos_series.extend([bool(y)] * idx.size)
            sl_case.extend([len(cases)] * idx.size)
            case["slices_labelled_positive"] = int(slice_y.sum())
            case["slices"] = [{"index": int(sc.index), "y": int(v), "p_covid": float(pp), "ggo_fraction": sc.ggo_fraction,
                               "consolidation_fraction": sc.consolidation_fraction, "slice_score": sc.slice_score,
                               "z_context_score": sc.z_context_score}
                              for sc, v, pp in zip(res.slice_scores, slice_y, slice_p)]
            if 0 < slice_y.sum() < slice_y.size:
                case["slice_auc_within_series"] = auc(slice_y, slice_p)
        cases.append(case)
    if not ys:
        raise ConfigError(f"{csv_path}: no eligible series to evaluate ({len(excluded)} excluded)")
    rep = _report("series", b, np.asarray(ys), np.asarray(ps), sources, b.threshold, cases, out, n_boot, seed)
    # rep.per_source holds one entry per label word of the CSV (written as "per_label")
    rep.warnings += few_cases_warning(np.asarray(ys), "series")
    rep.excluded = excluded
    rep.source = {"csv": str(csv_path), "n": len(items), "runtime": triage.runtime,
                  "per_row_bundles": sorted(per_row)}
    rep.slice_level = _slice_level(np.asarray(sl_y), np.asarray(sl_p), np.asarray(sl_in_pos_series, bool),
                                   b.slice_threshold, n_boot, seed)
    if rep.slice_level:
        rep.slice_level["per_series"] = _slice_per_series(cases, np.asarray(sl_y), np.asarray(sl_p), np.asarray(sl_case),
                                                          b.slice_threshold, n_boot, seed)
        if out is not None and "labelled_positive_vs_all_other" in rep.slice_level:
            m = rep.slice_level["labelled_positive_vs_all_other"]
            rep.files["roc_slices_png"] = str(plot_roc({"slices": (*roc_curve(np.asarray(sl_y), np.asarray(sl_p))[:2], m["auc"])},
                                                       Path(out) / "roc_series_slices.png",
                                                       title=f"{b.name} {b.version}: slices of the series"))
    if sl_y:
        model = b.slice_score_model
        named = _named_scores(np.asarray(sl_p), np.asarray(sl_g), np.asarray(sl_c), np.asarray(sl_f),
                              model.missing_fraction if model is not None else 0.0, np.asarray(sl_z, np.float64))
        rep.slice_scores = _series_score_tables(cases, np.asarray(sl_y), named, np.asarray(sl_in_pos_series, bool),
                                                np.asarray(sl_case), np.asarray(sl_g), n_boot, seed)
        rep.slice_scores["model"] = None if model is None else model.to_manifest()
        if out is not None and "pooled" in rep.slice_scores:
            rep.files["roc_slice_scores_png"] = str(_plot_scores(
                np.asarray(sl_y), named, rep.slice_scores["pooled"], Path(out) / "roc_series_slice_scores.png",
                f"{b.name} {b.version}: real slices, pooled"))
    rep.wall_s = time.perf_counter() - t0
    _write(rep)
    return rep


# --- per-slice score comparison (CNN, HU fractions, fused) ---------------------------------------
SCORE_NAMES = ("cnn", "cnn_z", "ggo", "consolidation", "slice_score")
SCORES_NOTE = ("AUC of each per-slice score alone: cnn = the classifier's P(covid); ggo / consolidation = the slice's "
               "fraction of analysed lung (HU rules, sdk.opacity; a slice without analysed lung counts as the "
               "model's missing_fraction, 0); slice_score = the bundle manifest's fused score (sdk.slice_score); "
               "cnn_z = the CNN's logits averaged over the selected slices within +-5 mm in z (sdk.slice_score.z_context, "
               "window fixed a priori). "
               "95% percentile bootstrap CIs over slices (correlated within a series: optimistic).")


def _named_scores(p: np.ndarray, ggo: np.ndarray, cons: np.ndarray, fused: np.ndarray, missing: float,
                  zctx: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """The per-slice scores (NaN fractions -> ``missing``; a score that is all NaN is left out)."""
    out = {"cnn": np.asarray(p, np.float64),
           "ggo": np.where(np.isfinite(ggo), ggo, missing).astype(np.float64),
           "consolidation": np.where(np.isfinite(cons), cons, missing).astype(np.float64)}
    if np.isfinite(fused).any():
        out["slice_score"] = np.asarray(fused, np.float64)
    if zctx is not None and np.isfinite(zctx).all() and np.asarray(zctx).size:
        out["cnn_z"] = np.asarray(zctx, np.float64)
    return out


def _auc_table(y: np.ndarray, named: Dict[str, np.ndarray], n_boot: int, seed: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {k: auc_with_ci(y, v, n_boot, seed) for k, v in named.items()}
    if "slice_score" in named:
        out["slice_score_minus_cnn"] = paired_auc_difference(y, named["slice_score"], named["cnn"], n_boot, seed)
    if "cnn_z" in named:
        out["cnn_z_minus_cnn"] = paired_auc_difference(y, named["cnn_z"], named["cnn"], n_boot, seed)
    return out


def _series_score_tables(cases: List[Dict[str, Any]], y: np.ndarray, named: Dict[str, np.ndarray], in_pos: np.ndarray,
                         case_of: np.ndarray, raw_ggo: np.ndarray, n_boot: int, seed: int) -> Dict[str, Any]:
    """Real-slice AUCs of every score: pooled, positive slices vs the negative series' slices, and
    per series (a series with both labels: within it; a negative series: the positive series'
    infected slices vs its slices), plus the explicit leave-one-series-out statement."""
    out: Dict[str, Any] = {}
    if y.size == 0:
        return out
    pos = (y == 1) & in_pos
    if y.min() == 0 and y.max() == 1:
        out["pooled"] = _auc_table(y, named, n_boot, seed)
    if pos.any() and (~in_pos).any():
        m = pos | ~in_pos
        out["positive_vs_negative_series_slices"] = _auc_table(y[m], {k: v[m] for k, v in named.items()}, n_boot, seed)
    per: Dict[str, Any] = {}
    for i, c in enumerate(cases):
        sel = case_of == i
        if not sel.any():
            continue
        name = Path(c["path"]).name
        d: Dict[str, Any] = {"n": int(sel.sum()), "n_pos": int(y[sel].sum()),
                             "slices_without_fractions": int((~np.isfinite(raw_ggo[sel])).sum())}
        if 0 < y[sel].sum() < sel.sum():
            d["comparison"] = "within series (labelled infected vs clear slices)"
            d["auc"] = _auc_table(y[sel], {k: v[sel] for k, v in named.items()}, n_boot, seed)
        elif y[sel].sum() == 0 and pos.any():
            m = pos | sel
            d["comparison"] = "infected slices of the positive series vs this series' slices"
            d["auc"] = _auc_table(y[m], {k: v[m] for k, v in named.items()}, n_boot, seed)
        per[name] = d
    out["per_series"] = per
    out["leave_one_series_out"] = {
        "fitted_on_real_series": False,
        "note": "No coefficient, threshold or transform of any score here was fitted or chosen on these real series "
                "(the fused score's coefficients come from the bundle manifest), so leaving a series out changes "
                "nothing: every pooled and per-series number above is already out-of-sample, i.e. equal to its "
                "leave-one-series-out value.",
    }
    out["note"] = SCORES_NOTE
    return out


def _plot_scores(y: np.ndarray, named: Dict[str, np.ndarray], table: Dict[str, Any], path: Path, title: str) -> Path:
    names = {"slice_score": "fused slice_score", "cnn_z": "cnn, ±5 mm z context"}
    curves = {names.get(k, k): (*roc_curve(y, v)[:2], table[k]["auc"])
              for k, v in named.items() if k in table}
    return plot_roc(curves, path, title=title)


def _slice_level(y: np.ndarray, p: np.ndarray, in_pos: np.ndarray, threshold: float, n_boot: int, seed: int) -> Dict[str, Any]:
    """Selected-slice metrics of series evaluation (slices resampled as cases; they are correlated
    within a series, so these CIs are optimistic)."""
    out: Dict[str, Any] = {}
    if y.size == 0:
        return out
    if y.min() == 0 and y.max() == 1:
        out["labelled_positive_vs_all_other"] = binary_metrics(y, p, threshold, n_boot=n_boot, seed=seed)
    neg_series = ~in_pos
    pos = (y == 1) & in_pos
    if pos.any() and neg_series.any():
        m = pos | neg_series
        out["positive_vs_negative_series_slices"] = binary_metrics(y[m], p[m], threshold, n_boot=n_boot, seed=seed)
    if pos.any() and (in_pos & (y == 0)).any():
        m = in_pos
        out["within_positive_series"] = binary_metrics(y[m], p[m], threshold, n_boot=n_boot, seed=seed)
    out["note"] = "selected slices only; positives = labelled-infected slices of covid series; slices are correlated, CIs optimistic"
    return out


def _slice_per_series(cases: List[Dict[str, Any]], y: np.ndarray, p: np.ndarray, case_of: np.ndarray, threshold: float,
                      n_boot: int, seed: int) -> Dict[str, Any]:
    """Per series: its slices' mean P(covid), share above the slice threshold, and - when it has
    both labels - the within-series slice AUC with its bootstrap CI."""
    out: Dict[str, Any] = {}
    for i, c in enumerate(cases):
        sel = case_of == i
        if not sel.any():
            continue
        d: Dict[str, Any] = {"n": int(sel.sum()), "n_pos": int(y[sel].sum()), "mean_p_covid": float(p[sel].mean()),
                             "share_at_or_above_threshold": float((p[sel] >= threshold).mean())}
        if 0 < y[sel].sum() < sel.sum():
            d["within_series"] = binary_metrics(y[sel], p[sel], threshold, n_boot=n_boot, seed=seed)
        out[Path(c["path"]).name] = d
    return out


def _write(rep: EvalReport) -> None:
    target = rep.files.get("report_json")
    if target:
        Path(target).write_text(json.dumps(rep.to_dict(), indent=2))
