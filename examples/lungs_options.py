"""Lung-segmentation speed options, side by side in one process: time, Dice, and the effect on triage.

    .venv/bin/python examples/lungs_options.py [--rounds 3] [--out runs/lungs_options.json]

Variants of :func:`sdk.lungs.segment` (hybrid method):

- ``base``       today's default: FP32 U-Net every ~4 mm, classical work grid 128
- ``int8``       the same with an INT8 (QDQ, static, per-channel) U-Net calibrated on seg2d *train* slices
                 (the bundle's ``lungs_int8.onnx``; ``build_int8`` below was the first experiment's builder)
- ``step6`` / ``step8``  the U-Net every ~6 / ~8 mm, logits z-interpolated in between
- ``work96``     classical work grid 96 instead of 128
- combinations of the above

For each: the median wall time of ``segment`` on covid-P001 (variants alternate round by round,
so machine load hits them alike), 3D Dice against the manual cip-ct64 mask (``wholeLung-64.nrrd``),
per-slice Dice on the held-out seg2d block (U-Net variants), and the triage result on the three
covid-ct-md series when the variant's mask replaces today's (label and max |dp| against ``base``).
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
TRIAGE_SERIES = ["covid-ct-md/covid-P001", "covid-ct-md/cap-cap001", "covid-ct-md/normal-normal001"]


def build_int8(fp32: Path, out: Path, n_calib: int = 96) -> Path:
    """Static QDQ INT8 of the lung U-Net, calibrated on prepared seg2d train slices (never val/test)."""
    from onnxruntime import quantization as q

    from sdk.lungs.unet2d import prepare_slices
    from sdk.train.seg import SegTrainConfig, load_seg2d, split_blocks

    cfg = SegTrainConfig()
    nums, imgs, _ = load_seg2d(str(DATA / "seg2d"))
    train = split_blocks(nums, cfg.val_block, cfg.test_block)["train"]
    pick = np.random.default_rng(0).choice(train, size=min(n_calib, train.size), replace=False)
    x = prepare_slices(imgs[pick].astype(np.float32) / 255.0)

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"image": x[i : i + 8]} for i in range(0, len(x), 8)])

        def get_next(self) -> Any:
            return next(self.it, None)

    prepped = out.with_suffix(".prep.onnx")
    q.quant_pre_process(str(fp32), str(prepped))
    q.quantize_static(str(prepped), str(out), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                      calibrate_method=q.CalibrationMethod.MinMax)
    prepped.unlink()
    return out


def main(argv: List[str] | None = None) -> Dict[str, Any]:
    import sdk
    from sdk.io import load_series
    from sdk.lungs import ClassicalConfig, segment
    from sdk.lungs.evaluate import dice
    from sdk.lungs.nrrd import read_nrrd
    from sdk.lungs.unet2d import DEFAULT_ONNX, segment_slices_2d
    from sdk.runtime.ort import OrtSession
    from sdk.train.seg import SegTrainConfig, load_seg2d, split_blocks

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "lungs_options.json")
    ap.add_argument("--int8", type=Path, default=REPO / "sdk" / "bundles" / "default" / "lungs_int8.onnx",
                    help="INT8 U-Net (default: the bundle's, from `python -m sdk.calibration.lungs`; built here if missing)")
    a = ap.parse_args(argv)
    if not a.int8.is_file():
        a.int8.parent.mkdir(parents=True, exist_ok=True)
        build_int8(DEFAULT_ONNX, a.int8)
    nets = {"fp32": OrtSession(DEFAULT_ONNX, device="cpu", threads=a.threads, precision="fp32"),
            "int8": OrtSession(a.int8, device="cpu", threads=a.threads, precision="int8")}
    variants = {
        "base": dict(net="fp32", step=4.0, work=128),
        "int8": dict(net="int8", step=4.0, work=128),
        "step6": dict(net="fp32", step=6.0, work=128),
        "step8": dict(net="fp32", step=8.0, work=128),
        "work96": dict(net="fp32", step=4.0, work=96),
        "int8_step6": dict(net="int8", step=6.0, work=128),
        "int8_step8": dict(net="int8", step=8.0, work=128),
        "int8_step8_work96": dict(net="int8", step=8.0, work=96),
    }

    def seg(vol: Any, v: Dict[str, Any]) -> Any:
        return segment(vol, "hybrid", session=nets[v["net"]], config=ClassicalConfig(work_size=v["work"]), net_z_step_mm=v["step"])

    report: Dict[str, Any] = {"variants": variants, "threads": a.threads}
    # 1. time on covid-P001, alternating
    p001 = load_series(DATA / "dicom" / "covid-ct-md" / "covid-P001")
    times: Dict[str, List[float]] = {k: [] for k in variants}
    steps: Dict[str, Any] = {}
    for v in variants.values():
        seg(p001, v)
    for r in range(a.rounds):
        for k, v in (list(variants.items()) if r % 2 == 0 else list(variants.items())[::-1]):
            t0 = time.perf_counter()
            s = seg(p001, v)
            times[k].append((time.perf_counter() - t0) * 1e3)
            steps[k] = {n: round(x, 1) for n, x in s.timings_ms.items()}
    report["p001_ms"] = {k: {"median": float(np.median(t)), "runs": [round(x) for x in t], "steps": steps[k]} for k, t in times.items()}
    # 2. Dice on cip-ct64 (3D, manual mask)
    cip = load_series(DATA / "dicom" / "cip-ct64")
    ref = read_nrrd(DATA / "volumes" / "cip-copd-ct64" / "wholeLung-64.nrrd").data > 0
    report["cip_dice"] = {k: dice(seg(cip, v).mask, ref) for k, v in variants.items()}
    # 3. seg2d held-out Dice, per net
    cfg = SegTrainConfig()
    nums, imgs, masks = load_seg2d(str(DATA / "seg2d"))
    idx = split_blocks(nums, cfg.val_block, cfg.test_block)["test"]
    grey, refm = imgs[idx].astype(np.float32) / 255.0, masks[idx].astype(bool)
    report["seg2d_dice_mean"] = {n: float(np.mean([dice(p, r) for p, r in zip(segment_slices_2d(grey, s), refm)])) for n, s in nets.items()}
    # 4. triage with each variant's mask (classifier and aggregator of the default bundle, default precision)
    tri = sdk.Triage(device="cpu", heatmaps=False)
    out: Dict[str, Any] = {}
    for series in TRIAGE_SERIES:
        vol = load_series(DATA / "dicom" / series)
        per: Dict[str, Any] = {}
        base_mask = None
        for k, v in variants.items():
            s = seg(vol, v)
            tri._segment = lambda volume, s=s: s  # noqa: E731 - experiment only: inject this variant's mask
            r = tri.run(vol)
            base_mask = s.mask if k == "base" else base_mask
            per[k] = {"label": r.label, "probabilities": r.probabilities, "mask_dice_vs_base": dice(s.mask, base_mask),
                      "lung_ml": s.lung_volume_ml}
        for k in per:
            per[k]["max_abs_dp_vs_base"] = max(abs(per[k]["probabilities"][c] - per["base"]["probabilities"][c]) for c in per[k]["probabilities"])
        out[series] = per
    report["triage"] = out
    a.out.write_text(json.dumps(report, indent=1))
    print(f"{'variant':20s} {'P001 ms':>8s} {'cip Dice':>9s} " + " ".join(f"{s.split('/')[-1][:12]:>24s}" for s in TRIAGE_SERIES))
    for k in variants:
        cells = [f"{out[s][k]['label'][:9]:>9s} dp={out[s][k]['max_abs_dp_vs_base']:.1e} D={out[s][k]['mask_dice_vs_base']:.4f}" for s in TRIAGE_SERIES]
        print(f"{k:20s} {report['p001_ms'][k]['median']:8.0f} {report['cip_dice'][k]:9.4f} " + " ".join(cells))
    print("seg2d held-out mean Dice:", report["seg2d_dice_mean"])
    return report


if __name__ == "__main__":
    main()
