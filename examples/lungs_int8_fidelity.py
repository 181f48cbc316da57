"""How close can an INT8 lung U-Net keep the FP32 product's results? (issue 15, session 7)

    .venv/bin/python examples/lungs_int8_fidelity.py --out runs/lq   # ~15 min on 2 cores

The FP32 default misses 1.5 s by ~0.1-0.2 s and the INT8 lung U-Net would save ~0.19 s, but under
the FP32 classifier it moves covid-P001's P(covid) by 2.65e-3 (bar 1e-3). This script builds INT8
variants of ``lungs_fp32.onnx`` (calibration method, calibration size, which convolutions stay
FP32), all calibrated on the seg2d train block only (:mod:`sdk.calibration.lungs`), and for each:

1. the hybrid segmenter's labels on the three COVID-CT-MD series against the FP32 U-Net's
   (voxels that differ, slices touched, lung volume change) and the U-Net's time;
2. the product (FP32 classifier, ``lungs_precision="int8"``, a copy of the default bundle with that
   file) against ``--before`` (``examples/results_check.py --record`` on the FP32 default): label,
   series |dp|, largest slice |dp|.

Only a PREFIX of convolutions is really FP32 (sdk.calibration.quantize: an excluded convolution
between quantised ones is re-quantised per-tensor by ORT at load); the U-Net sessions here disable
ORT's ``WeightBiasQuantization`` so the tail variants are what they say; the product's session
does not, which only matters for the tail variants.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from sdk.paths import shared_data_root

REPO = Path(__file__).resolve().parents[1]
DATA = shared_data_root()
SERIES = ["covid-P001", "cap-cap001", "normal-normal001"]


def _session(path: Path, keep_fp32_weights: bool) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 2, 1, 3
    kw = {"disabled_optimizers": ["WeightBiasQuantization"]} if keep_fp32_weights else {}
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], **kw)


def segment_all(path: Path, vols: Dict[str, Any], keep_fp32_weights: bool = True) -> Dict[str, Tuple[np.ndarray, float, float]]:
    """(labels, lung ml, best-of-3 U-Net ms) per series with the hybrid segmenter on ``path``."""
    from sdk.lungs import segment

    s = _session(path, keep_fp32_weights)
    out = {}
    for k, v in vols.items():
        seg, best = segment(v, "hybrid", session=s), float("inf")
        for _ in range(3):
            seg = segment(v, "hybrid", session=s)
            best = min(best, seg.timings_ms.get("net_ms", float("nan")))
        out[k] = (seg.labels.copy(), float(seg.lung_volume_ml), best)
    return out


def mask_report(ref: Dict[str, Any], got: Dict[str, Any]) -> Dict[str, Any]:
    r = {}
    for k in ref:
        a, b = ref[k][0], got[k][0]
        diff = a != b
        r[k] = {"diff_voxels": int(diff.sum()), "diff_of_lung": round(float(diff.sum()) / max(int((a > 0).sum()), 1), 6),
                "slices_touched": int(diff.reshape(a.shape[0], -1).any(1).sum()),
                "dlung_ml": round(got[k][1] - ref[k][1], 2), "net_ms": round(got[k][2], 1)}
    return r


def product_report(variant: Path, before: Dict[str, Any], work: Path) -> Dict[str, Any]:
    """The FP32 classifier with this INT8 U-Net (a bundle copy) against the recorded FP32 default."""
    import sdk
    from sdk.bundle import load_bundle
    from sdk.calibration.lungs import add_to_bundle

    dst = work / f"bundle_{variant.stem}"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(REPO / "sdk" / "bundles" / "default", dst)
    add_to_bundle(dst, variant, dict(load_bundle(dst).manifest["lungs_int8"]))
    tri = sdk.Triage(bundle=str(dst), device="cpu", heatmaps=False, lungs_precision="int8")
    out = {}
    for s in SERIES:
        key = f"covid-ct-md/{s}"
        r, b = tri.run(DATA / "dicom" / key), before["series"][key]
        sp = [x.probabilities.get(tri.positive, 0.0) for x in r.slice_scores]
        same = [x.index for x in r.slice_scores] == b["slices"]
        out[s] = {"label": f"{b['label']} -> {r.label}", "dp": abs(r.probabilities["covid"] - b["probabilities"]["covid"])}
        if same:  # how single slices move under the mask change
            d = np.abs(np.subtract(sp, b["slice_probs"]))
            out[s].update(slice_dp_max=float(d.max()), slice_dp_median=float(np.median(d)), slices_over_0_01=int((d > 0.01).sum()),
                          n_slices=int(d.size), worst_slices=[int(b["slices"][i]) for i in np.argsort(-d)[:4]])
        else:
            out[s].update(slice_dp_max=None, selected_slices="differ")
    shutil.rmtree(dst)
    return out


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/lq"))
    ap.add_argument("--before", type=Path, default=Path("runs/results_before_fp32.json"))
    a = ap.parse_args(argv)
    import importlib

    Q = importlib.import_module("sdk.calibration.quantize")  # the module (the package exports a function of that name)
    from sdk.calibration.lungs import calibration_slices
    from sdk.io import load_series

    import onnx

    work = a.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    fp32 = REPO / "sdk" / "bundles" / "default" / "lungs_fp32.onnx"
    vols = {s: load_series(DATA / "dicom" / "covid-ct-md" / s) for s in SERIES}
    ref = segment_all(fp32, vols, False)
    before = json.loads(a.before.read_text())
    prepped, _ = Q.prepare(fp32, work / "prepped.onnx")
    convs = [n.name for n in onnx.load(str(prepped)).graph.node if n.op_type in ("Conv", "ConvTranspose")]
    x96, _ = calibration_slices(DATA / "seg2d")
    xall, _ = calibration_slices(DATA / "seg2d", n=10_000)
    ranges = {tag: Q.calibrate_ranges(prepped, x, m, work / f"ranges_{tag}.json")
              for tag, m, x in [("minmax96", "minmax", x96), ("minmax_all", "minmax", xall),
                                ("percentile96", "percentile", x96), ("entropy96", "entropy", x96)]}
    variants = [  # name, method, ranges, FP32 convolutions
        ("minmax96 (shipped)", "minmax", "minmax96", []),
        ("minmax, all 265 train slices", "minmax", "minmax_all", []),
        ("percentile 99.999", "percentile", "percentile96", []),
        ("entropy", "entropy", "entropy96", []),
        ("minmax96, first conv FP32", "minmax", "minmax96", convs[:1]),
        ("minmax96, first 2 convs FP32", "minmax", "minmax96", convs[:2]),
        ("minmax96, first 3 convs FP32", "minmax", "minmax96", convs[:3]),
        ("percentile, first conv FP32", "percentile", "percentile96", convs[:1]),
        ("percentile, first 2 convs FP32", "percentile", "percentile96", convs[:2]),
        ("minmax96, last 2 convs FP32", "minmax", "minmax96", convs[-2:]),
        ("minmax96, last 4 convs FP32", "minmax", "minmax96", convs[-4:]),
    ]
    results: Dict[str, Any] = {"fp32_net_ms": {k: round(v[2], 1) for k, v in ref.items()}, "variants": {}}
    for i, (name, method, tag, fp32_convs) in enumerate(variants):
        t0 = time.perf_counter()
        path = Q.quantize(prepped, work / f"v{i}.onnx", method, fp32_convs, ranges[tag])
        row = {"masks": mask_report(ref, segment_all(path, vols))}
        if not fp32_convs or fp32_convs[0] == convs[0]:  # prefix variants only: what the product's session runs
            row["product"] = product_report(path, before, work)
        results["variants"][name] = row
        print(f"[{i + 1}/{len(variants)}] {name} ({time.perf_counter() - t0:.0f} s): {json.dumps(row)}", flush=True)
    (a.out / "lungs_int8_fidelity.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {a.out / 'lungs_int8_fidelity.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
