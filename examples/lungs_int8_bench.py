"""Issue 15: the lungs stage with the FP32 vs the INT8 lung U-Net, and INT8 speed options.

    nice -n 5 .venv/bin/python examples/lungs_int8_bench.py [--rounds 3] [--out runs/lungs_int8_bench.json]

One ``sdk.Triage(device="cpu", precision="fp32")`` (the classifier held at FP32, so only the lung
mask changes) runs each series once per variant per round (variants alternate, order reversed
every other round, after one warm-up round). The variant decides the lung segmenter call
(``Triage._segment``): which bundle U-Net (``lungs_fp32.onnx`` / ``lungs_int8.onnx``), ORT
intra-op threads, slices per U-Net call, and the U-Net's z step (``net_z_step_mm``).
Reported per series and variant: ``timings_ms["lungs"]`` (median of the rounds), the whole
segmenter (lungs + the resample part split off by Triage) in wall and process-CPU ms, label, P(covid), the mask's Dice
against the ``fp32`` variant; plus 3D Dice against the manual cip-ct64 mask.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from sdk.paths import shared_data_root

REPO = Path(__file__).resolve().parents[1]
DATA = shared_data_root()
SERIES = ["covid-P001", "cap-cap001", "normal-normal001"]

VARIANTS: Dict[str, Dict[str, Any]] = {
    "fp32": dict(net="fp32", threads=2, batch=8, step=4.0),          # today
    "int8": dict(net="int8", threads=2, batch=8, step=4.0),          # what ships
    "int8_b16": dict(net="int8", threads=2, batch=16, step=4.0),
    "int8_b64": dict(net="int8", threads=2, batch=64, step=4.0),
    "int8_t1": dict(net="int8", threads=1, batch=8, step=4.0),
    "int8_step6": dict(net="int8", threads=2, batch=8, step=6.0),
    "int8_step6_b16": dict(net="int8", threads=2, batch=16, step=6.0),
}


class _Batch:
    """A Session whose ``infer_batched`` uses a fixed batch (everything else passes through)."""

    def __init__(self, session: Any, batch: int) -> None:
        self._s, self._b = session, batch

    def infer_batched(self, *args: Any, **kw: Any) -> Any:
        kw["batch"] = self._b
        return self._s.infer_batched(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s, name)


def main(argv: List[str] | None = None) -> Dict[str, Any]:
    import sdk
    from sdk import lungs
    from sdk.io import load_series
    from sdk.lungs.evaluate import dice
    from sdk.lungs.nrrd import read_nrrd
    from sdk.runtime.ort import OrtSession

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "lungs_int8_bench.json")
    a = ap.parse_args(argv)
    names = a.variants.split(",")
    tri = sdk.Triage(device="cpu", precision="fp32", heatmaps=False, lungs_precision="fp32")
    paths = tri.bundle.lungs_paths()
    sess: Dict[tuple, Any] = {}
    for k in names:
        v = VARIANTS[k]
        key = (v["net"], v["threads"])
        if key not in sess:
            sess[key] = OrtSession(paths[v["net"]], device="cpu", threads=v["threads"], precision=v["net"])

    def segmenter(k: str) -> Any:
        v = VARIANTS[k]
        s = _Batch(sess[(v["net"], v["threads"])], v["batch"])
        return lambda volume: lungs.segment(volume, "hybrid", session=s, preprocessing=tri.preprocessing, net_z_step_mm=v["step"])

    report: Dict[str, Any] = {"variants": {k: VARIANTS[k] for k in names}, "rounds": a.rounds, "classifier": tri.runtime}
    cip = load_series(DATA / "dicom" / "cip-ct64")
    ref = read_nrrd(DATA / "volumes" / "cip-copd-ct64" / "wholeLung-64.nrrd").data > 0
    report["cip_dice"] = {k: round(dice(segmenter(k)(cip).mask, ref), 5) for k in names}
    vols = {s: load_series(DATA / "dicom" / "covid-ct-md" / s) for s in SERIES}
    runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {s: {k: [] for k in names} for s in SERIES}
    masks: Dict[str, Dict[str, np.ndarray]] = {s: {} for s in SERIES}
    for r in range(a.rounds + 1):  # round 0 warms up
        order = names if r % 2 == 0 else names[::-1]
        for s in SERIES:
            for k in order:
                seg_fn = segmenter(k)
                kept: Dict[str, Any] = {}

                def _seg(volume: Any, seg_fn: Any = seg_fn, kept: Dict[str, Any] = kept) -> Any:
                    c0 = time.process_time()
                    kept["seg"] = seg_fn(volume)
                    kept["cpu_ms"] = (time.process_time() - c0) * 1e3  # all threads of the process
                    return kept["seg"]

                tri._segment = _seg
                res = tri.run(vols[s])
                masks[s][k] = kept["seg"].mask
                if r > 0:
                    t = res.timings_ms
                    runs[s][k].append({"lungs": t["lungs"], "segmenter": t["lungs"] + t.get("resample", 0.0),
                                       "net": kept["seg"].timings_ms.get("net_ms", 0.0), "total": t["total"],
                                       "segmenter_cpu": kept["cpu_ms"],
                                       "label": res.label, "p_covid": res.probabilities.get("covid")})
    table: Dict[str, Any] = {}
    for s in SERIES:
        table[s] = {}
        for k in names:
            rs = runs[s][k]
            table[s][k] = {"lungs_ms": round(float(np.median([x["lungs"] for x in rs])), 1),
                           "segmenter_ms": round(float(np.median([x["segmenter"] for x in rs])), 1),
                           "net_ms": round(float(np.median([x["net"] for x in rs])), 1),
                           "segmenter_cpu_ms": round(float(np.median([x["segmenter_cpu"] for x in rs])), 1),
                           "total_ms": round(float(np.median([x["total"] for x in rs])), 1),
                           "label": rs[-1]["label"], "p_covid": round(float(rs[-1]["p_covid"]), 4),
                           "mask_dice_vs_fp32": round(dice(masks[s][k], masks[s]["fp32"]), 5) if "fp32" in masks[s] else None}
    report["series"] = table
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    print(f"{'variant':16s} {'cip':>7s} " + " ".join(f"{s[:14]:>46s}" for s in SERIES))
    for k in names:
        cells = [f"{table[s][k]['lungs_ms']:6.0f}/{table[s][k]['segmenter_ms']:5.0f}ms cpu{table[s][k]['segmenter_cpu_ms']:5.0f} "
                 f"{table[s][k]['label'][:9]:>9s} p={table[s][k]['p_covid']:.4f} D={table[s][k]['mask_dice_vs_fp32']}" for s in SERIES]
        print(f"{k:16s} {report['cip_dice'][k]:7.4f} " + " ".join(cells))
    return report


if __name__ == "__main__":
    main()
