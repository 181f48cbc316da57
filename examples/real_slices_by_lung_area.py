"""Real-slice CNN scores by lung area: is a series' bias a small-lung effect? (issue 14, exploratory)

    .venv/bin/ctsdk evaluate --series runs/zctx/series_all.csv --out runs/zctx/eval --json > runs/zctx/eval.json
    .venv/bin/python examples/real_slices_by_lung_area.py runs/zctx/eval.json      # ~30 s

For every evaluated series with slice scores, the hybrid segmenter's lung area of each selected
slice is taken relative to that series' largest, and slices are binned (< 0.25, 0.25-0.5, >= 0.5);
per bin and series kind: slices, labelled-positive slices, mean P(covid), and the pooled AUC of
labelled-positive slices against all others within the bin. Nothing is fitted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Tuple

import numpy as np

BANDS = ((0.0, 0.25), (0.25, 0.5), (0.5, 1.01))


def slice_rows(report: dict) -> List[Tuple[str, int, float, float]]:
    """(series label, y, P(covid), relative lung area) of every scored slice."""
    from sdk.io import load_series
    from sdk.lungs import segment

    rows = []
    for case in report["cases"]:
        if not case.get("slices"):
            continue
        seg = segment(load_series(case["path"]), "hybrid")
        area = (seg.labels > 0).reshape(seg.labels.shape[0], -1).sum(1).astype(float)
        rel = area / max(area.max(), 1.0)
        for s in case["slices"]:
            rows.append((case["label"], int(s.get("y") == 1 and case["label"] == "covid"), float(s["p_covid"]), float(rel[s["index"]])))
    return rows


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("report", type=Path, help="the JSON `ctsdk evaluate --series ... --json` printed")
    args = ap.parse_args(argv)
    from sdk.metrics import auc

    rows = slice_rows(json.loads(args.report.read_text()))
    kind = np.array([r[0] for r in rows])
    y, p, a = (np.array([r[i] for r in rows]) for i in (1, 2, 3))
    print(f"{len(rows)} slices, {int(y.sum())} labelled positive; pooled AUC {auc(y, p):.3f}")
    for lo, hi in BANDS:
        band = (a >= lo) & (a < hi)
        parts = [f"{k} n={int((band & (kind == k)).sum())} pos={int(y[band & (kind == k)].sum())} "
                 f"mean p={p[band & (kind == k)].mean():.3f}" for k in sorted(set(kind)) if (band & (kind == k)).any()]
        print(f"area [{lo:.2f}, {min(hi, 1.0):.2f}]: " + "; ".join(parts) + f"; AUC {auc(y[band], p[band]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
