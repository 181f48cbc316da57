"""``ctsdk evaluate``: AUC, sensitivity/specificity with bootstrap CIs, confusion matrix, ROC PNG."""
from __future__ import annotations

from typing import Any, Dict, Optional

import click

from ._common import THREADS, check_output_dir, emit, handle_errors, json_option

EXAMPLES = """\b
Examples:
  ctsdk evaluate --images docs/data/splits.csv --split test --data-root ../shared/data
  ctsdk evaluate --images docs/data/splits.csv --split test --data-root ../shared/data --out /tmp/ctsdk-eval --json
  ctsdk evaluate --series SERIES_CSV --images docs/data/splits.csv --split test --data-root ../shared/data
  (SERIES_CSV: path,label rows of series folders; optional columns below)

\b
Series CSV columns (paths relative to the CSV's folder):
  path, label               the series folder; label covid (or covid-19, covid19) = positive,
                            non-covid, normal or cap = negative; any other word is refused
  slice_labels, slice_labels_row
                            a .npy of per-slice 0/1 labels (rows = cases) and this series' row:
                            adds slice-level metrics
  slice_labels_order        z (default: the row runs in ascending slice location) or reversed
                            (head to feet, as COVID-CT-MD's label files run)
  bundle                    a bundle folder that scores this row (a leave-one-series-out fold)
With fewer than 5 positive or 5 negative series the report warns that the series-level metrics
are not informative.

\b
Exit codes: 0 the report was printed; 2 bad arguments, unreadable CSV or an --out folder that
cannot be written (one line on stderr)."""


def _fmt(m: Dict[str, Any]) -> str:
    ci = m.get("ci95", {})

    def num(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    def one(k: str) -> str:
        lo, hi = ci.get(k) or [None, None]
        return f"{k} {num(m[k])} [{num(lo)}, {num(hi)}]"

    c = m["confusion"]
    return (f"n={m['n']} (pos {m['n_pos']}, neg {m['n_neg']}) @ {m['threshold']:.3f}: {one('auc')}, "
            f"{one('sensitivity')}, {one('specificity')}; TP {c['tp']} FN {c['fn']} FP {c['fp']} TN {c['tn']}")


def _human(d: Dict[str, Any]) -> str:
    lines = [f"{d['kind']} evaluation of bundle {d['bundle']['name']} {d['bundle']['version']}",
             "overall: " + _fmt(d["overall"])]
    for s, m in d.get("per_source", d.get("per_label", {})).items():
        lines.append(f"  {s}: " + _fmt(m))
    for c in d.get("cases", []) if d["kind"] == "series" else []:
        lines.append(f"  series {c['path']}: truth {c['label']}, decision {c['predicted']} (P(covid) {c['p_covid']:.3f})")
    for k, m in d.get("slice_level", {}).items():
        if isinstance(m, dict) and "confusion" in m:
            lines.append(f"slice level, {k}: " + _fmt(m))
    for name, m in d.get("slice_level", {}).get("per_series", {}).items():
        within = m.get("within_series")
        extra = f"; within-series {_fmt(within)}" if within else ""
        lines.append(f"  slices of {name}: n={m['n']} (pos {m['n_pos']}), mean P(covid) {m['mean_p_covid']:.3f}{extra}")
    sc = d.get("slice_scores", {})

    def aucs(t: Dict[str, Any]) -> str:
        def one(k: str, m: Dict[str, Any]) -> str:
            lo, hi = m.get("ci95") or [None, None]
            a = "n/a" if m.get("auc") is None else f"{m['auc']:.3f}"
            return f"{k} {a}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")
        parts = [one(k, m) for k, m in t.items() if "auc" in m]
        dd = t.get("slice_score_minus_cnn")
        if dd and dd.get("ci95"):
            parts.append(f"slice_score - cnn {dd['diff']:+.3f} [{dd['ci95'][0]:+.3f}, {dd['ci95'][1]:+.3f}]")
        return ", ".join(parts)

    for k in ("pooled", "positive_vs_negative_series_slices"):
        if k in sc:
            lines.append(f"slice scores, {k}: " + aucs(sc[k]))
    for name, m in sc.get("per_series", {}).items():
        if "auc" in m:
            lines.append(f"  slice scores of {name} ({m['comparison']}): " + aucs(m["auc"]))
    if "leave_one_series_out" in sc:
        lines.append("leave-one-series-out: " + sc["leave_one_series_out"]["note"])
    for w in d.get("warnings", []):
        lines.append(f"warning: {w}")
    excluded = d.get("excluded", [])
    for e in excluded[:5]:
        lines.append(f"excluded: {e}")
    if len(excluded) > 5:
        lines.append(f"... {len(excluded) - 5} more excluded (see --json / --out)")
    for k, v in d.get("files", {}).items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


@click.command("evaluate", epilog=EXAMPLES)
@click.option("--images", "images_csv", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Images CSV (images_index.csv format: path,label,source,split,patient).")
@click.option("--split", default=None, help="With --images: only rows of this split (e.g. test).")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False), default=None,
              help="With --images: folder the CSV paths are relative to (default: the CSV's folder).")
@click.option("--series", "series_csv", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Series CSV: path,label[,slice_labels,slice_labels_row,slice_labels_order,bundle] (paths "
                   "relative to the CSV's folder; label covid = positive, non-covid / normal / cap = negative; "
                   "optional .npy slice labels add slice-level metrics; columns below).")
@click.option("--bundle", "bundle_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="Model bundle folder (default: the bundle shipped in the package).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write the ROC PNG and the full JSON report (with per-case scores) here.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="Which of the bundle's classifier files to evaluate (ONNX Runtime CPU).")
@click.option("--render", type=click.Choice(["auto", "8bit", "hu"]), default="auto", show_default=True,
              help="With --images: '8bit' letterbox of the grey values, 'hu' = grey->HU estimate re-rendered through the "
                   "runtime's window (images it cannot estimate are excluded and listed), 'auto' = the bundle's choice.")
@click.option("--n-bootstrap", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Bootstrap resamples for the 95 % confidence intervals, 1 to 100000 (more runs for hours "
                   "and gains nothing; checked before any series is read).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed of the bootstrap (same seed, same CIs).")
@click.option("--threads", type=THREADS, default=None, help="ONNX Runtime threads (images mode).")
@click.option("--cases/--no-cases", default=False, show_default=True, help="Include per-case scores in the printed JSON.")
@json_option
@handle_errors
def evaluate(images_csv: Optional[str], split: Optional[str], data_root: Optional[str], series_csv: Optional[str],
             bundle_path: Optional[str], out_dir: Optional[str], precision: str, render: str, n_bootstrap: int, seed: int,
             threads: Optional[int],
             cases: bool, as_json: bool) -> None:
    """Evaluate a bundle on labelled images (slice level), series (patient + slice level), or both.

    A series CSV may name a bundle per row (column ``bundle``): use it to score every series with
    the leave-one-series-out model that never saw it."""
    from ..errors import ConfigError
    from ..evaluate import evaluate_images, evaluate_series

    if images_csv is None and series_csv is None:
        raise ConfigError("give --images CSV, --series CSV, or both (the series report beside the image split)")
    check_output_dir(out_dir, "--out")  # before any model runs: the ROC and report must be savable
    reports = {}
    if series_csv is not None:
        rep = evaluate_series(series_csv, bundle_path, out=out_dir, device="cpu", precision=precision,
                              n_boot=n_bootstrap, seed=seed, progress=not as_json)
        # series decisions are always printed: 3-10 rows, the point of a series evaluation
        reports["series"] = rep.to_dict(with_cases=True)
    if images_csv is not None:
        rep = evaluate_images(images_csv, bundle_path, split=split, data_root=data_root, out=out_dir,
                              threads=threads, precision=precision, n_boot=n_bootstrap, seed=seed, progress=not as_json,
                              render=render)
        reports["images"] = rep.to_dict(with_cases=cases)
    if len(reports) == 1:
        emit(next(iter(reports.values())), as_json, _human)
    else:
        emit({"kind": "series+images", **reports}, as_json, lambda d: _human(d["series"]) + "\n\n" + _human(d["images"]))
