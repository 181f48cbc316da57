"""HU opacity and the series decision on the real COVID-CT-MD series (the numbers in docs/triage.md).

    .venv/bin/python examples/opacity_report.py [--data ../shared/data] [--out runs/opacity/report.json]

For each of covid-P001, cap-cap001, normal-normal001: ``sdk.Triage`` (CPU, FP32 and the default
precision) -> label, reasons, the aggregator's P(covid), the XGBoost contributions (TreeSHAP,
summed per class column; the 5 groups that push most), every HU term, and the opacity block.
Then, for the two series with slice labels, the per-slice ground-glass fraction against the
labels, with the label array read in both orders (ascending slice location as stored, and reversed
= InstanceNumber order), as the AUC of labelled-infected vs other slices of that series.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sdk.paths import shared_data_root

SERIES = (("covid-P001", "covid", 0), ("cap-cap001", "cap", 55), ("normal-normal001", "normal", None))


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC, ties counted one half."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if not pos.size or not neg.size:
        return float("nan")
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size))


def slice_ggo(op, labels: np.ndarray) -> tuple:
    """Per-slice ground-glass fraction of the analysed working-grid lung, and the lung size per slice."""
    from sdk.opacity import GGO

    s = op.grid["stride"][1]
    y0, x0 = op.origin
    rows, cols = op.label_map.shape[1:]
    lung = (labels[:, y0::s, x0::s][:, :rows, :cols] > 0).sum(axis=(1, 2)).astype(float)
    ggo = (op.label_map == GGO).sum(axis=(1, 2))
    return ggo / np.maximum(lung, 1.0), lung


def main() -> None:
    import sdk
    from sdk import lungs
    from sdk.io import load_series
    from sdk.opacity import measure_opacity

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(shared_data_root()))
    ap.add_argument("--out", default="runs/opacity/report.json")
    args = ap.parse_args()
    root = Path(args.data) / "dicom" / "covid-ct-md"
    slice_labels = np.load(root / "labels" / "Slice-level-labels-updated-1.npy")
    engines = {"fp32": sdk.Triage(device="cpu", precision="fp32", heatmaps=False),
               "auto": sdk.Triage(device="cpu", heatmaps=False)}
    report = {}
    for name, truth, row in SERIES:
        vol = load_series(root / name)
        entry = {"truth": truth}
        for prec, engine in engines.items():
            r = engine.run(vol)
            dec = r.lung_opacity["decision"]
            agg = engine._aggregator
            sp = np.array([[s.probabilities[c] for c in engine.classes] for s in r.slice_scores])
            contrib = agg.contributions(sp)[:-1].reshape(agg.n_groups, len(engine.classes))
            top = sorted(((abs(v), g, c, float(v)) for g, rowc in enumerate(contrib) for c, v in zip(engine.classes, rowc)), reverse=True)[:5]
            entry[prec] = {"label": r.label, "reasons": r.reasons, "p_final": r.probabilities["covid"], "p_cnn": dec["p_cnn"],
                           "logit_cnn": dec["logit_cnn"], "hu_terms": dec["hu_terms"], "cnn_contributions": dec["cnn_contributions"],
                           "top_groups": [{"group": g, "class": c, "logit": v} for _, g, c, v in top],
                           "runtime": r.runtime.get("precision"), "opacity_ms": r.timings_ms.get("opacity")}
            entry["opacity"] = {k: v for k, v in r.lung_opacity.items() if k != "decision"}
            entry["lung_volume_ml"] = r.lung_volume_ml
        if row is not None:
            seg = lungs.segment(vol)
            op = measure_opacity(vol.hu, seg.labels, vol.spacing)
            g, lung = slice_ggo(op, seg.labels)
            y = slice_labels[row, : vol.shape[0]]
            big = lung >= 0.25 * lung.max()
            entry["slice_labels"] = {
                "n_infected": int(y.sum()), "n_slices": int(vol.shape[0]),
                "auc_ggo_as_stored": auc(g[big & (y == 1)], g[big & (y == 0)]),
                "auc_ggo_reversed": auc(g[big & (y[::-1] == 1)], g[big & (y[::-1] == 0)]),
                "median_ggo_infected_reversed": float(np.median(g[big & (y[::-1] == 1)])),
                "median_ggo_other_reversed": float(np.median(g[big & (y[::-1] == 0)])),
                "slices_used": int(big.sum()),
            }
        report[name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if k != "opacity"}, default=float), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float))
    print("written", out)


if __name__ == "__main__":
    main()
