"""The aggregator trainer's ``predictions.csv`` from a bundle's classifier, rendered as that bundle
is evaluated (``sdk.evaluate.evaluate_images``: ``render="auto"`` follows the manifest's
``image_render``; for the 0.2.0 bundle that is the grey->HU re-rendering, and images whose map
cannot be estimated are dropped, as in the model card).

    python -m sdk.agg_predictions --bundle sdk/bundles/default --images docs/data/splits.csv \
        --data-root ../shared/data --out runs/agg/predictions.csv

Writes ``path,label,source,split,patient,p_covid`` (the format of ``sdk.train.classifier``'s
``write_predictions``; split and patient copied from the images CSV) and, beside it,
``predictions_excluded.json`` (the images that could not be rendered, with the reason).

``--compare NAME=AGGREGATOR.json@THRESHOLD ...`` instead scores aggregators on the trainer's own
val/test bags of ``--predictions`` (:func:`sdk.train.aggregator.compare_aggregators`).
(A top-level module because it uses ``sdk.evaluate``, which itself imports ``sdk.train``.)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .labels import read_images_csv

__all__ = ["write_agg_predictions", "join_cases"]


def join_cases(rows: Sequence[Dict[str, str]], cases: Sequence[Dict[str, Any]]) -> List[Dict[str, str]]:
    """Rows of predictions.csv: each evaluated case with split / patient / source from its CSV row."""
    by_path = {r["path"]: r for r in rows}
    out = []
    for c in cases:
        r = by_path[c["path"]]
        out.append({"path": r["path"], "label": r["label"], "source": r.get("source", ""), "split": r.get("split", ""),
                    "patient": r.get("patient", ""), "p_covid": f"{float(c['p_covid']):.6f}"})
    return out


def write_agg_predictions(images: str, out: str, bundle: Optional[str] = None, data_root: Optional[str] = None,
                          render: str = "auto", threads: Optional[int] = None, precision: str = "fp32") -> Dict[str, Any]:
    """Score every image of ``images`` (all splits) with ``bundle`` and write predictions.csv."""
    import csv

    from .evaluate import evaluate_images

    rep = evaluate_images(images, bundle, split=None, data_root=data_root, out=None, threads=threads,
                          precision=precision, n_boot=0, render=render, progress=True)
    rows = read_images_csv(images, None, data_root)
    pred = join_cases(rows, rep.cases)
    outp = Path(out)
    outp.parent.mkdir(parents=True, exist_ok=True)
    with outp.open("w", newline="") as fh:   # the format of sdk.train.classifier.write_predictions
        w = csv.DictWriter(fh, fieldnames=["path", "label", "source", "split", "patient", "p_covid"])
        w.writeheader()
        w.writerows(pred)
    (outp.parent / "predictions_excluded.json").write_text(json.dumps(rep.excluded, indent=2))
    counts: Dict[str, int] = {}
    for r in pred:
        counts[r["split"]] = counts.get(r["split"], 0) + 1
    return {"out": str(outp), "n": len(pred), "excluded": len(rep.excluded), "per_split": counts,
            "bundle": rep.bundle, "render": rep.source.get("render"), "wall_s": round(rep.wall_s, 1)}


def main(argv: Sequence[str] = None) -> int:  # type: ignore[assignment]
    ap = argparse.ArgumentParser(prog="python -m sdk.agg_predictions", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--images", default="docs/data/splits.csv")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--out", default=None, help="default runs/agg/predictions.csv (with --compare: runs/agg/compare_bags.json)")
    ap.add_argument("--render", default="auto", choices=["auto", "hu", "8bit"])
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compare", nargs="+", default=None, metavar="NAME=AGGREGATOR.json@THRESHOLD",
                    help="instead of scoring images: score the trainer's val/test bags of --predictions with each "
                         "aggregator (the first is the reference of the paired AUC differences)")
    ap.add_argument("--predictions", default="runs/agg/predictions.csv", help="with --compare")
    ap.add_argument("--train-config", default=None, help="with --compare: the run's config.json (default: trainer defaults)")
    a = ap.parse_args(argv)
    if a.compare:
        aggs, thrs = {}, {}
        for item in a.compare:
            name, rest = item.split("=", 1)
            path, thr = rest.rsplit("@", 1)
            aggs[name], thrs[name] = path, float(thr)
        cfg = json.loads(Path(a.train_config).read_text()) if a.train_config else None
        from .train.aggregator import compare_aggregators

        res = compare_aggregators(a.predictions, aggs, thrs, cfg, a.out or "runs/agg/compare_bags.json")
        print(json.dumps(res, indent=2))
        return 0
    info = write_agg_predictions(a.images, a.out or "runs/agg/predictions.csv", a.bundle, a.data_root, a.render, a.threads, a.precision)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
