"""Dice report: classical vs learned lung segmentation on every reference mask ctsdk has.

    python -m sdk.lungs.evaluate [--data ../shared/data] [--onnx runs/seg/unet2d_lung.onnx]

1. seg2d held-out test block (numbers >= 1320, 74 diseased slices, 8-bit min-max + CLAHE
   images): the learned U-Net (:func:`sdk.lungs.segment_slices_2d`) vs the honest 2D classical
   variant (:func:`sdk.lungs.classical.segment_classical_2d`: Otsu + border-air removal + the
   same morphology; no HU exists for these images).
2. cip-ct64 DICOM (79 x 64 x 64, 4.2 mm pixels) vs ``volumes/cip-copd-ct64/wholeLung-64.nrrd``:
   :func:`sdk.lungs.segment` with both methods (3D Dice at the native grid).

Results are merged into ``metrics.json`` under ``"evaluation"`` and printed as JSON.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from ..paths import shared_data_root

REPO = Path(__file__).resolve().parents[2]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean arrays (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else float(2.0 * np.logical_and(a, b).sum() / s)


def _stats(values: List[float]) -> Dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min()), "p10": float(np.percentile(v, 10)), "n": int(v.size)}


def load_dicom_volume(folder: str) -> Any:
    """Load a DICOM series as a Volume: sdk.io.load_series when available, else plain pydicom."""
    try:
        from ..io import load_series  # type: ignore[attr-defined]

        return load_series(folder)
    except ImportError:
        pass
    import pydicom

    from ..volume.core import Volume

    ds = [pydicom.dcmread(f) for f in sorted(glob.glob(os.path.join(folder, "*"))) if os.path.isfile(f)]
    ds = [d for d in ds if "PixelData" in d]
    ori = np.array(ds[0].ImageOrientationPatient, float)
    nrm = np.cross(ori[:3], ori[3:])
    ds.sort(key=lambda d: float(np.dot(nrm, np.array(d.ImagePositionPatient, float))))
    z = np.array([float(np.dot(nrm, np.array(d.ImagePositionPatient, float))) for d in ds])
    hu = np.stack([d.pixel_array.astype(np.float32) * float(getattr(d, "RescaleSlope", 1)) + float(getattr(d, "RescaleIntercept", 0)) for d in ds])
    return Volume(hu=hu.astype(np.int16), z_mm=z, pixel_spacing_mm=tuple(float(v) for v in ds[0].PixelSpacing))


def evaluate_seg2d(data_dir: Path, session: Any, test_block=(1320, 10000)) -> Dict[str, Any]:
    """Per-slice Dice on the held-out seg2d block for both methods, with timings."""
    from .data import load_seg2d, split_blocks
    from .classical import segment_classical_2d
    from .unet2d import segment_slices_2d

    nums, imgs, masks = load_seg2d(str(data_dir / "seg2d"))
    idx = split_blocks(nums, (0, 0), test_block)["test"]
    grey = imgs[idx].astype(np.float32) / 255.0
    ref = masks[idx].astype(bool)
    t0 = time.perf_counter()
    learned = segment_slices_2d(grey, session)
    t1 = time.perf_counter()
    classical = segment_classical_2d(grey)
    t2 = time.perf_counter()
    return {
        "block": f"numbers {test_block[0]}..{int(nums[idx].max())} ({len(idx)} slices, all with COVID-19 lesions)",
        "unet2d": {"dice": _stats([dice(p, r) for p, r in zip(learned, ref)]), "ms_per_slice": (t1 - t0) * 1e3 / len(idx)},
        "classical_2d_otsu": {"dice": _stats([dice(p, r) for p, r in zip(classical, ref)]), "ms_per_slice": (t2 - t1) * 1e3 / len(idx)},
    }


def evaluate_cip(data_dir: Path, session: Any) -> Dict[str, Any]:
    """3D Dice of both methods on cip-ct64 against wholeLung-64.nrrd."""
    from . import segment
    from .nrrd import read_nrrd

    vol = load_dicom_volume(str(data_dir / "dicom" / "cip-ct64"))
    ref = read_nrrd(data_dir / "volumes" / "cip-copd-ct64" / "wholeLung-64.nrrd").data > 0
    if ref.shape != vol.hu.shape:
        raise ValueError(f"reference mask shape {ref.shape} != volume shape {vol.hu.shape}")
    out: Dict[str, Any] = {"shape": list(vol.hu.shape), "reference_ml": float(ref.sum() * np.prod(vol.spacing) / 1000)}
    for method in ("classical", "unet2d", "hybrid"):
        segment(vol, method, session=session)  # warm-up
        seg = segment(vol, method, session=session)
        out[method] = {"dice": dice(seg.mask, ref), "lung_volume_ml": seg.lung_volume_ml, "timings_ms": seg.timings_ms}
    return out


def bench_volume(folder: Path, session: Any, repeats: int = 5) -> Dict[str, Any]:
    """Median wall time (and per-step medians) of segment() per method on one DICOM series, with
    the machine's 1-minute load average before and after (the box is shared)."""
    from . import segment

    vol = load_dicom_volume(str(folder))
    out: Dict[str, Any] = {"series": folder.name, "shape": list(vol.hu.shape), "load_avg_before": os.getloadavg()[0]}
    for method in ("classical", "unet2d", "hybrid"):
        segment(vol, method, session=session)
        runs, cpu = [], []
        for _ in range(repeats):
            c0 = time.process_time()
            runs.append(segment(vol, method, session=session))
            cpu.append((time.process_time() - c0) * 1e3)
        keys = runs[0].timings_ms.keys()
        out[method] = {
            "median_process_cpu_ms": float(np.median(cpu)),
            "median_ms": {k: float(np.median([r.timings_ms[k] for r in runs])) for k in keys},
            "lung_volume_ml": runs[0].lung_volume_ml,
            "net_slices": runs[0].info.get("net_slices"),
        }
    out["load_avg_after"] = os.getloadavg()[0]
    return out


def main(argv: List[str] | None = None) -> Dict[str, Any]:
    from .unet2d import DEFAULT_ONNX, open_session

    ap = argparse.ArgumentParser(description="Dice report of the lung segmenters")
    ap.add_argument("--data", default=str(shared_data_root()))
    ap.add_argument("--onnx", default=str(DEFAULT_ONNX))
    ap.add_argument("--metrics", default=str(REPO / "runs" / "seg" / "metrics.json"))
    a = ap.parse_args(argv)
    data = Path(a.data)
    sess = open_session(a.onnx, threads=2)
    report = {
        "seg2d_test": evaluate_seg2d(data, sess),
        "cip_ct64": evaluate_cip(data, sess),
        "bench_covid_p001": bench_volume(data / "dicom" / "covid-ct-md" / "covid-P001", sess),
    }
    mp = Path(a.metrics)
    metrics = json.loads(mp.read_text()) if mp.is_file() else {}
    metrics["evaluation"] = report
    mp.write_text(json.dumps(metrics, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
