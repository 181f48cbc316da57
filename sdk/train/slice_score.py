"""Fit the per-slice evidence score (:mod:`sdk.slice_score`) on the 2D image splits - never on the
real COVID-CT-MD series, which are the evaluation set.

    python -m sdk.train.slice_score features    # runs/slice_score/image_features.csv
    python -m sdk.train.slice_score fit         # runs/slice_score/fit.json (coefficients + AUCs)
    python -m sdk.train.slice_score manifest --bundle sdk/bundles/default   # the fitted block (option a)
    python -m sdk.train.slice_score apriori --bundle sdk/bundles/default    # the a-priori block (option b, shipped)

**features**: for every image of ``docs/data/splits.csv``: the bundle's 2D U-Net lung mask at the
native size, the grey->HU map estimated from the anatomy (:mod:`sdk.train.hu_estimate`; images
it cannot estimate are dropped, as in training), then

- ``p_cnn``: the bundle's FP32 classifier on the HU re-rendering (what ``ctsdk evaluate --images
  --render hu`` scores);
- ``ggo`` / ``cons``: :func:`sdk.opacity.measure_opacity` on the estimated-HU image at its native
  size (one slice, the U-Net mask). A 2D image has no pixel spacing: the longer side is taken to
  span ``ASSUMED_FOV_MM`` (340 mm, a typical adult chest display field of view), which sets the
  working grid and the 4 mm airway / 7 mm vessel widths in pixels.

**fit**: a logistic regression (IRLS, a small L2 penalty ``ridge`` on the weights, not on the
intercept) of the label on ``[logit(p_cnn), g(ggo), g(cons)]``, g = sqrt, on the rows of
``--fit-split``. Reports the AUC (with bootstrap CIs) of each feature alone and of the fused score
on the val and test splits.

**apriori**: the fixed rule the default bundle ships (:func:`apriori_block`), because the option-a
check failed: on the estimated-HU images the ground-glass fraction separates covid / non-covid
barely (val AUC 0.57) and the fitted HU weights are negligible (docs/model_card.md).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..paths import shared_data_root

__all__ = ["ASSUMED_FOV_MM", "image_opacity", "fit_logistic", "extract_features", "fit", "main"]

_REPO = Path(__file__).resolve().parents[2]
ASSUMED_FOV_MM = 340.0
FEATURES = ("cnn_logit", "ggo", "consolidation")


def image_opacity(hu: np.ndarray, mask: np.ndarray, fov_mm: float = ASSUMED_FOV_MM) -> Dict[str, float]:
    """Ground glass / consolidation fractions of one estimated-HU 2D image (its lung mask, the
    assumed field of view): ``{"ggo", "cons", "lung_px"}`` (NaN fractions when no lung is analysed)."""
    from ..errors import ConfigError
    from ..opacity import measure_opacity

    px = float(fov_mm) / float(max(hu.shape))
    try:
        op = measure_opacity(np.asarray(hu, np.float32)[None], (np.asarray(mask) > 0)[None], (px, px, px), keep_map=False)
    except ConfigError:
        return {"ggo": float("nan"), "cons": float("nan"), "lung_px": 0}
    g, c = op.slice_fractions(0)
    return {"ggo": g, "cons": c, "lung_px": int(op.slice_lung_voxels[0])}


def fit_logistic(X: np.ndarray, y: np.ndarray, ridge: float = 1e-3, iters: int = 50) -> np.ndarray:
    """Logistic regression by IRLS: returns ``[intercept, w_1..w_k]`` (L2 ``ridge`` on the weights)."""
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    A = np.c_[np.ones(len(X)), X]
    w = np.zeros(A.shape[1])
    pen = np.full(A.shape[1], float(ridge) * len(X))
    pen[0] = 0.0
    for _ in range(iters):
        z = A @ w
        p = 0.5 * (1.0 + np.tanh(0.5 * z))
        W = np.clip(p * (1 - p), 1e-9, None)
        grad = A.T @ (y - p) - pen * w
        H = (A * W[:, None]).T @ A + np.diag(pen)
        step = np.linalg.solve(H, grad)
        w = w + step
        if np.max(np.abs(step)) < 1e-9:
            break
    return w


def extract_features(splits_csv: Path, data_root: Path, bundle: Optional[str], out: Path, *, limit: int = 0,
                     batch: int = 32, threads: Optional[int] = None) -> Path:
    """Write ``out`` (CSV: path,label,source,split,y,p_cnn,ggo,cons,lung_px,status)."""
    from tqdm import tqdm

    from ..bundle import load_bundle
    from ..labels import is_positive, read_images_csv
    from ..lungs import segment_slices_2d
    from ..runtime.ort import OrtSession
    from ..lungs.unet2d import open_session as open_lungs
    from .data import load_grey
    from .hu_estimate import estimate_hu_map, grey_to_hu, render_hu_image
    from .real_slices import render_inputs

    b = load_bundle(bundle)
    rows = read_images_csv(splits_csv, None, data_root)
    if limit:
        rows = rows[:limit]
    clf = OrtSession(b.classifier_paths()["fp32"], device="cpu", threads=threads, precision="fp32")
    lungs = open_lungs(b.lungs_path, threads)
    pos = b.classes.index(b.positive_class)
    out.parent.mkdir(parents=True, exist_ok=True)
    recs: List[Dict[str, Any]] = []
    for i in tqdm(range(0, len(rows), batch), desc="slice-score features", unit="batch"):
        xs, at = [], []
        for r in rows[i:i + batch]:
            grey = load_grey(r["abspath"])
            mask = np.asarray(segment_slices_2d(grey[None], lungs)[0], dtype=np.uint8)
            est = estimate_hu_map(grey, mask)
            rec = {"path": r["path"], "label": r["label"], "source": r.get("source", ""), "split": r.get("split", ""),
                   "y": is_positive(r["label"]), "p_cnn": float("nan"), "ggo": float("nan"), "cons": float("nan"),
                   "lung_px": 0, "status": "ok"}
            if not est.ok:
                rec["status"] = f"not estimable: {est.reason}"
            else:
                rec.update(image_opacity(grey_to_hu(grey, est), mask))
                hu, m = render_hu_image(grey, mask, est, b.input_size)
                xs.append(render_inputs(hu[None], m[None], b.window)[0])
                at.append(len(recs))
            recs.append(rec)
        if xs:
            probs = np.asarray(clf.infer({"image": np.stack(xs).astype(np.float32)})["probs"])[:, pos]
            for j, p in zip(at, probs):
                recs[j]["p_cnn"] = float(p)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(recs[0]))
        w.writeheader()
        w.writerows(recs)
    return out


def _read(features_csv: Path) -> List[Dict[str, Any]]:
    with open(features_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("p_cnn", "ggo", "cons"):
            r[k] = float(r[k]) if r[k] not in ("", "nan") else float("nan")
        r["y"] = int(r["y"])
    return [r for r in rows if r["status"] == "ok"]


def _design(rows: Sequence[Dict[str, Any]], transform: str, p_clip: float, missing: float) -> np.ndarray:
    from ..slice_score import transform as g

    p = np.clip(np.array([r["p_cnn"] for r in rows]), p_clip, 1 - p_clip)
    ggo = np.array([r["ggo"] for r in rows])
    cons = np.array([r["cons"] for r in rows])
    ggo = np.where(np.isfinite(ggo), ggo, missing)
    cons = np.where(np.isfinite(cons), cons, missing)
    return np.c_[np.log(p / (1 - p)), g(ggo, transform), g(cons, transform)]


def fit(features_csv: Path, out: Path, *, fit_split: str = "train", transform: str = "sqrt", ridge: float = 1e-3,
        p_clip: float = 1e-4, n_boot: int = 1000, seed: int = 0, command: str = "") -> Dict[str, Any]:
    """Fit ``[a, b, c, d]`` on ``fit_split``; AUCs of each term and of the fused score per split."""
    from ..metrics import auc, bootstrap_ci
    from ..slice_score import SliceScoreModel

    rows = _read(features_csv)
    tr = [r for r in rows if r["split"] == fit_split]
    if not tr:
        raise SystemExit(f"{features_csv}: no rows of split {fit_split!r}")
    X = _design(tr, transform, p_clip, 0.0)
    y = np.array([r["y"] for r in tr])
    w = fit_logistic(X, y, ridge)
    model = SliceScoreModel(intercept=float(w[0]), w_cnn=float(w[1]), w_ggo=float(w[2]), w_consolidation=float(w[3]),
                            transform=transform, p_clip=p_clip, missing_fraction=0.0,
                            source=f"logistic regression (IRLS, L2 {ridge} on the weights) on the {fit_split} split of "
                                   f"docs/data/splits.csv ({len(tr)} 2D images, HU re-rendered by the grey->HU estimate; "
                                   "opacity fractions on the estimated HU at native size, U-Net lung mask); "
                                   "no real COVID-CT-MD slice used",
                            command=command)
    report: Dict[str, Any] = {"fit_split": fit_split, "n_fit": len(tr), "n_fit_pos": int(y.sum()),
                              "coefficients": model.to_manifest()["coefficients"], "transform": transform,
                              "ridge": ridge, "splits": {}}
    # standardised view of the weights (per SD of each term on the fit split)
    report["weight_x_sd"] = {k: float(w[i + 1] * X[:, i].std()) for i, k in enumerate(FEATURES)}
    for split in sorted({r["split"] for r in rows}):
        sel = [r for r in rows if r["split"] == split]
        ys = np.array([r["y"] for r in sel])
        if ys.min() == ys.max():
            continue
        Xs = _design(sel, transform, p_clip, 0.0)
        scores = {"cnn": Xs[:, 0], "ggo": Xs[:, 1], "consolidation": Xs[:, 2],
                  "fused": model.score(np.array([r["p_cnn"] for r in sel]), np.array([r["ggo"] for r in sel]),
                                       np.array([r["cons"] for r in sel]))}
        d: Dict[str, Any] = {"n": len(sel), "n_pos": int(ys.sum()),
                             "ggo_nan": int(np.sum(~np.isfinite([r["ggo"] for r in sel])))}
        for name, s in scores.items():
            d[name] = {"auc": auc(ys, s), "ci95": bootstrap_ci(ys, s, 0.5, n_boot=n_boot, seed=seed)["auc"]}
        per_source = {}
        for src in sorted({r["source"] for r in sel}):
            m = np.array([r["source"] == src for r in sel])
            if ys[m].min() != ys[m].max():
                per_source[src] = {name: auc(ys[m], s[m]) for name, s in scores.items()}
        d["per_source_auc"] = per_source
        report["splits"][split] = d
    report["model"] = model.to_manifest()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


#: the a-priori rule (option b of issue 14), written down before any real-slice number of the
#: fused score or of the per-slice fractions was computed:
#:   - every term on a natural log-odds-like scale with weight 1 ("equal weights");
#:   - g(x) = log1p(x / 0.01): 0 at no opacity, one unit per e-fold of (1 + x / 1 %) - 1 % of a
#:     slice's lung is the order of the ground-glass-range density that partial volume, vessels'
#:     edges and dependent lung give a normal slice; an involved COVID slice holds 5-50 %
#:     (g = 1.8 ... 3.9), the span of the CNN's logit on real slices (about -3 ... +3);
#:   - the intercept puts a slice at decision.py's no-opacity bar (0.5 % ground glass and 0.5 %
#:     consolidation) at the CNN's own logit: a = -2 * log1p(0.5);
#:   - a slice without analysed lung (the basal / apical ends the opacity rules leave out) reads as
#:     that reference (missing_fraction 0.005): its score is the CNN's.
APRIORI_SCALE = 0.01
APRIORI_REFERENCE = 0.005


def apriori_block(fit_report: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The manifest block of the a-priori rule; ``fit_report`` (the option-a fit on the image train
    split, :func:`fit`) is summarised in it as the reason the fitted weights were not used."""
    from ..slice_score import transform as g

    ref = float(g(APRIORI_REFERENCE, "log1p", APRIORI_SCALE))
    block: Dict[str, Any] = {
        "form": "logistic", "transform": "log1p", "scale": APRIORI_SCALE, "p_clip": 1e-4,
        "missing_fraction": APRIORI_REFERENCE,
        "coefficients": {"intercept": -2.0 * ref, "cnn_logit": 1.0, "ggo": 1.0, "consolidation": 1.0},
        "formula": "sigmoid(intercept + cnn_logit*logit(clip(p_cnn)) + ggo*log1p(ggo_fraction/scale) "
                   "+ consolidation*log1p(consolidation_fraction/scale))",
        "source": "a-priori rule (issue 14 option b), not fitted: equal weights of the CNN logit and the two HU terms, "
                  "scale 1 % of the slice's lung, intercept = the no-opacity bar of sdk.decision (0.5 %) at the CNN's "
                  "logit; set before any real-slice value of the fractions or of this score was computed. Not fitted on "
                  "COVID-CT-MD (the evaluation set). The ground-glass feature itself was chosen knowing the issue's "
                  "earlier finding (ground-glass fraction alone AUC ~0.96 within P001).",
        "command": "python -m sdk.train.slice_score apriori --bundle sdk/bundles/default (hand-set constants in "
                   "sdk/train/slice_score.py; the option-a check: python -m sdk.train.slice_score features && "
                   "python -m sdk.train.slice_score fit)",
        "not_a_probability": "the score ranks slices; it is not calibrated to any prevalence",
    }
    if fit_report is not None:
        sp = fit_report.get("splits", {})
        block["option_a_check"] = {
            "what": "logistic fit of [logit p_cnn, sqrt ggo, sqrt cons] on the 2D image train split (estimated HU), "
                    "not used: the ground-glass fraction barely separates the image classes and the fit gives the HU "
                    "terms no weight",
            "coefficients": fit_report.get("coefficients"),
            "weight_x_sd": fit_report.get("weight_x_sd"),
            "ggo_auc_val": sp.get("val", {}).get("ggo"),
            "ggo_auc_test": sp.get("test", {}).get("ggo"),
            "cnn_auc_train": sp.get("train", {}).get("cnn", {}).get("auc"),
        }
    return block


def write_manifest(bundle_dir: Path, block: Dict[str, Any]) -> Path:
    """Write ``block`` as the manifest's ``slice_score`` (the manifest itself is not hashed)."""
    from ..slice_score import SliceScoreModel

    SliceScoreModel.from_manifest(block)      # refuse a block the runtime cannot read
    path = Path(bundle_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["slice_score"] = block
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdk.train.slice_score", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("features")
    f.add_argument("--splits", default=str(_REPO / "docs/data/splits.csv"))
    f.add_argument("--data-root", default=str(shared_data_root()))
    f.add_argument("--bundle", default=None)
    f.add_argument("--out", default="runs/slice_score/image_features.csv")
    f.add_argument("--limit", type=int, default=0)
    f.add_argument("--threads", type=int, default=None)
    t = sub.add_parser("fit")
    t.add_argument("--features", default="runs/slice_score/image_features.csv")
    t.add_argument("--out", default="runs/slice_score/fit.json")
    t.add_argument("--fit-split", default="train")
    t.add_argument("--transform", default="sqrt")
    t.add_argument("--ridge", type=float, default=1e-3)
    m = sub.add_parser("manifest")
    m.add_argument("--fit", default="runs/slice_score/fit.json")
    m.add_argument("--bundle", default=str(_REPO / "sdk/bundles/default"))
    ap_ = sub.add_parser("apriori")
    ap_.add_argument("--fit", default="runs/slice_score/fit.json", help="option-a report to summarise (if present)")
    ap_.add_argument("--bundle", default=str(_REPO / "sdk/bundles/default"))
    a = ap.parse_args(argv)
    t0 = time.time()
    if a.cmd == "features":
        print(extract_features(Path(a.splits), Path(a.data_root), a.bundle, Path(a.out), limit=a.limit, threads=a.threads))
    elif a.cmd == "fit":
        cmd = f"python -m sdk.train.slice_score fit --fit-split {a.fit_split} --transform {a.transform} --ridge {a.ridge}"
        rep = fit(Path(a.features), Path(a.out), fit_split=a.fit_split, transform=a.transform, ridge=a.ridge, command=cmd)
        print(json.dumps({k: rep[k] for k in ("coefficients", "weight_x_sd", "n_fit")}, indent=2))
        for s, d in rep["splits"].items():
            print(s, {k: (round(v["auc"], 3), [round(x, 3) for x in v["ci95"]]) for k, v in d.items() if isinstance(v, dict) and "auc" in v})
    elif a.cmd == "apriori":
        rep = json.loads(Path(a.fit).read_text()) if Path(a.fit).is_file() else None
        print(write_manifest(Path(a.bundle), apriori_block(rep)))
    elif a.cmd == "manifest":
        rep = json.loads(Path(a.fit).read_text())
        print(write_manifest(Path(a.bundle), rep["model"]))
    print(f"{time.time() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
