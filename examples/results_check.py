"""Speed work must not change results: record Triage outputs on the shared real series, compare later.

    # before a change (on the old code, same bundle)
    .venv/bin/python examples/results_check.py --record runs/results_before.json
    # after it
    .venv/bin/python examples/results_check.py --compare runs/results_before.json
    # or record the old code without checking it out: --record ... --base /tmp/base (sdk_base copy)

For every CT series under ``../shared/data/dicom`` that Triage accepts (covid-ct-md,
covid19-ny-sbu, lung-pet-ct-dx, cip-ct64, totalseg-j2k, dcm-qa-ct-ge-tilt), the CPU product
(``sdk.Triage(device="cpu")``, default precision) writes label, series probabilities, selected
slice indices with their probabilities, and the lung volume. ``--compare`` fails (exit 1) when a
label differs or any series probability moves by more than ``--tol`` (1e-3); slice-level and
lung-volume differences are reported, not judged (the brief's bar is labels and series |dp|).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

from sdk.paths import shared_data_root

REPO = Path(__file__).resolve().parents[1]
DICOM = shared_data_root() / "dicom"
SERIES = [
    "covid-ct-md/covid-P001", "covid-ct-md/cap-cap001", "covid-ct-md/normal-normal001",
    "covid19-ny-sbu/A002304", "covid19-ny-sbu/A067967", "covid19-ny-sbu/A072894",
    "lung-pet-ct-dx/A0002-s2-8mm-B70f", "cip-ct64", "totalseg-j2k", "dcm-qa-ct-ge-tilt",
]


def _series_dirs(root: Path) -> List[Path]:
    """The configured series that exist; a folder may hold the DICOM files one level down."""
    return [root / s for s in SERIES if (root / s).exists()]


def run_all(root: Path, precision: str, base: Path | None = None, lungs_precision: str = "auto") -> Dict[str, Any]:
    """Triage every series; ``base``: use the old package copied there as ``sdk_base`` instead."""
    import importlib

    if base is not None:
        sys.path.insert(0, str(base))
    sdk = importlib.import_module("sdk_base" if base is not None else "sdk")
    SeriesError = importlib.import_module(sdk.__name__ + ".errors").SeriesError

    kwargs = {} if lungs_precision == "auto" else {"lungs_precision": lungs_precision}
    tri = sdk.Triage(device="cpu", precision=precision, heatmaps=False, **kwargs)
    out: Dict[str, Any] = {"runtime": tri.runtime, "series": {}}
    for d in _series_dirs(root):
        key = str(d.relative_to(root))
        try:
            r = tri.run(d)
        except SeriesError as exc:
            out["series"][key] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        out["series"][key] = {
            "label": r.label, "probabilities": r.probabilities, "eligible": r.eligible,
            "lung_opacity": getattr(r, "lung_opacity", None),
            "slices": [s.index for s in r.slice_scores],
            "slice_probs": [s.probabilities.get(tri.positive, 0.0) for s in r.slice_scores],
            "lung_volume_ml": r.lung_volume_ml, "total_ms": r.timings_ms.get("total"),
        }
    return out


def compare(before: Dict[str, Any], after: Dict[str, Any], tol: float) -> List[str]:
    """Failures (label / series probability); prints every difference."""
    fails: List[str] = []
    for key, b in before["series"].items():
        a = after["series"].get(key)
        if a is None:
            fails.append(f"{key}: missing after")
            continue
        if "error" in b or "error" in a:
            if ("error" in b) != ("error" in a):
                fails.append(f"{key}: error before={b.get('error')} after={a.get('error')}")
            continue
        dp = max((abs(b["probabilities"][c] - a["probabilities"].get(c, float("nan"))) for c in b["probabilities"]), default=0.0)
        same_slices = b["slices"] == a["slices"]
        dsl = max((abs(x - y) for x, y in zip(b["slice_probs"], a["slice_probs"])), default=0.0) if same_slices else float("nan")
        dv = (a["lung_volume_ml"] or 0) - (b["lung_volume_ml"] or 0)
        same_opacity = json.dumps(a.get("lung_opacity"), sort_keys=True) == json.dumps(b.get("lung_opacity"), sort_keys=True)
        ok = a["label"] == b["label"] and dp <= tol
        print(f"{'ok  ' if ok else 'FAIL'} {key:40s} {b['label']:>12s} -> {a['label']:<12s} max|dp|={dp:.2e} "
              f"slices {'same' if same_slices else 'DIFFER'} max|dp_slice|={dsl:.2e} dlung={dv:+.1f} ml "
              f"opacity {'same' if same_opacity else 'DIFFER'} "
              f"total {b.get('total_ms') or 0:.0f} -> {a.get('total_ms') or 0:.0f} ms")
        if not ok:
            fails.append(f"{key}: label {b['label']} -> {a['label']}, max|dp| {dp:.3g}")
    return fails


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--record", type=Path, help="write this run's results here")
    g.add_argument("--compare", type=Path, help="compare this run with a recorded file")
    ap.add_argument("--data", type=Path, default=DICOM)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--lungs-precision", default="auto", help="the 2D lung U-Net's precision (Triage(lungs_precision=))")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--base", type=Path, default=None,
                    help="run an old copy of the package (folder holding sdk_base/, see examples/side_by_side.py)")
    a = ap.parse_args(argv)
    res = run_all(a.data, a.precision, a.base, a.lungs_precision)
    if a.record:
        a.record.parent.mkdir(parents=True, exist_ok=True)
        a.record.write_text(json.dumps(res, indent=1))
        for k, v in res["series"].items():
            print(k, v.get("label", v.get("error")), v.get("probabilities", ""))
        return 0
    fails = compare(json.loads(a.compare.read_text()), res, a.tol)
    print("PASS" if not fails else "FAIL:\n  " + "\n  ".join(fails))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
