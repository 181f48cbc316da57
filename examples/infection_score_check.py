"""Does a lesion U-Net trained on seg2d's infection masks score real HU slices? (issue 14)

A 2D U-Net (the lung U-Net's architecture and input preparation: segmenter window, per-slice
min-max, CLAHE) trained on the 404 seg2d COVID-19 slices with their manual *infection* masks
(``python -m sdk.train.seg --target infection --out runs/infection``; val/test = the number blocks the
lung U-Net uses) is run on every selected slice of the labelled COVID-CT-MD series. Its per-slice
scores, fixed before looking at these series:

- ``infection_mean``: the mean lesion probability over the slice's lung mask (the product's mask);
- ``infection_frac``: the fraction of that lung mask with lesion probability > 0.5.

None of the three series was seen in training (seg2d comes from another collection), so every AUC
here is out-of-sample. Compared on the same slices with the product's own scores (CNN P(covid), its
z context, the HU ground-glass fraction), same comparisons and values as ``ctsdk evaluate --series``.

    python examples/infection_score_check.py --model runs/infection/unet2d_infection.onnx --out runs/infection/real
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdk.paths import shared_data_root  # noqa: E402

DATA = shared_data_root() / "dicom" / "covid-ct-md"
LABELS = DATA / "labels" / "Slice-level-labels-updated-1.npy"
SERIES = [("covid-P001", "covid", 0), ("cap-cap001", "cap", None), ("normal-normal001", "normal", None)]


def lesion_probs(hu: np.ndarray, session: Any) -> np.ndarray:
    """(N, H, W) HU slices -> (N, S, S) lesion probabilities (the lung U-Net's preparation)."""
    from sdk.lungs.unet2d import predict_logits, prepare_slices
    from sdk.preprocessing import SEGMENTER_WINDOW
    from sdk.volume.resample import window_hu

    logits = predict_logits(prepare_slices(window_hu(hu, SEGMENTER_WINDOW)), session)
    return 1.0 / (1.0 + np.exp(-logits))


def lung_at(mask: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return np.stack([cv2.resize(m.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) > 0.5 for m in mask])


def score_series(path: Path, label: str, row: Any, session: Any, triage: Any) -> Dict[str, Any]:
    from sdk.labels import align_slice_labels

    res = triage.run(path)
    heat = res._heat
    idx = np.array([s.index for s in res.slice_scores])
    probs = lesion_probs(heat.hu[idx], session)
    lung = lung_at(heat.mask[idx], probs.shape[-1])
    area = np.maximum(lung.sum(axis=(1, 2)), 1)
    mean = (probs * lung).sum(axis=(1, 2)) / area
    frac = ((probs > 0.5) & lung).sum(axis=(1, 2)) / area
    if label != "covid":  # every slice of a negative series is negative (as in `ctsdk evaluate --series`)
        y = np.zeros(idx.size, np.int64)
    else:
        y = align_slice_labels(np.load(LABELS)[row], int(res.shape[0]), "reversed")[idx]
    pos_cls = triage.bundle.positive_class
    model = triage.bundle.slice_score_model  # a slice without analysed lung counts as its missing_fraction
    missing = model.missing_fraction if model is not None else 0.0
    return {
        "name": path.name, "label": label, "predicted": res.label, "y": y,
        "cnn": np.array([s.probabilities[pos_cls] for s in res.slice_scores]),
        "cnn_z": np.array([np.nan if s.z_context_score is None else s.z_context_score for s in res.slice_scores]),
        "ggo": np.array([missing if s.ggo_fraction is None else s.ggo_fraction for s in res.slice_scores]),
        "infection_mean": mean, "infection_frac": frac,
    }


def tables(cases: List[Dict[str, Any]], names: List[str], n_boot: int) -> Dict[str, Any]:
    from sdk.metrics import auc_with_ci

    y = np.concatenate([c["y"] for c in cases])
    case = np.concatenate([[i] * c["y"].size for i, c in enumerate(cases)])
    s = {k: np.concatenate([c[k] for c in cases]) for k in names}
    pos = (y == 1) & (case == 0)
    comps = {
        "pooled: P001 infected vs all other selected slices": np.ones(y.size, bool),
        "within P001 (infected vs clear)": case == 0,
        "P001 infected vs cap001": pos | (case == 1),
        "P001 infected vs normal001": pos | (case == 2),
    }
    out: Dict[str, Any] = {}
    for title, m in comps.items():
        out[title] = {"n": int(m.sum()), "n_pos": int(y[m].sum()),
                      **{k: auc_with_ci(y[m], s[k][m], n_boot, 0) for k in names}}
    return out


def main(argv: List[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/infection/unet2d_infection.onnx")
    p.add_argument("--out", default="runs/infection/real")
    p.add_argument("--n-boot", type=int, default=2000)
    a = p.parse_args(argv)
    from sdk import Triage
    from sdk.lungs.unet2d import open_session

    session = open_session(a.model)
    triage = Triage(device="cpu", heatmaps=True)
    cases = [score_series(DATA / name, label, row, session, triage) for name, label, row in SERIES]
    names = ["cnn", "cnn_z", "ggo", "infection_mean", "infection_frac"]
    result = {"model": a.model, "tables": tables(cases, names, a.n_boot),
              "per_series_mean": {c["name"]: {k: float(np.mean(c[k])) for k in names} for c in cases}}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "infection_scores.json").write_text(json.dumps(result, indent=2))
    np.savez(out / "slices.npz", **{f"{c['name']}__{k}": c[k] for c in cases for k in ["y"] + names})
    for title, t in result["tables"].items():
        print(f"{title} (n {t['n']}, pos {t['n_pos']})")
        for k in names:
            print(f"   {k:15s} {t[k]['auc']:.3f} [{t[k]['ci95'][0]:.3f}, {t[k]['ci95'][1]:.3f}]")
    print(json.dumps(result["per_series_mean"], indent=1))


if __name__ == "__main__":
    main()
