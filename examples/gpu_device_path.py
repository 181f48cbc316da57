"""Measure the device-resident path (sdk.device_path) on a GPU machine; writes one JSON report.

    python examples/gpu_device_path.py --out gpu_device_path.json [--repeats 5] [--series DIR]

Per configuration (precision x pooling): per-stage p50/p95 with device synchronisation at stage
boundaries (``sync_timings=True``), end-to-end p50/p95 without it (asynchronous launches, what a
caller sees) from a decoded Volume and from the DICOM files, the host <-> device copies of one run,
peak CuPy pool bytes, and agreement with the CPU path (ORT CPU FP32, host kernels) on the same
series. Nothing here is asserted: tests/test_device_path_gpu.py holds the checks.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from sdk.paths import shared_data_root

DEFAULT_SERIES = shared_data_root() / "dicom" / "covid-ct-md" / "covid-P001"


def _pct(xs: List[float]) -> Dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p95": round(float(np.percentile(a, 95)), 3), "n": int(a.size)}


def _env() -> Dict[str, Any]:
    import cupy
    import onnxruntime as ort

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return {"gpu": name, "driver": cupy.cuda.runtime.driverGetVersion(), "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cupy": cupy.__version__, "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "python": platform.python_version()}


def _config(series: Path, volume: Any, precision: str, pooling: str, repeats: int, ref: Any, batch: int,
            lungs: str) -> Dict[str, Any]:
    import cupy

    import sdk

    pool = cupy.get_default_memory_pool()
    out: Dict[str, Any] = {"precision": precision, "pooling": pooling, "classifier_batch": batch, "lung_method": lungs}
    t0 = time.perf_counter()
    eng_sync = sdk.Triage(device="cuda", precision=precision, pooling=pooling, sync_timings=True, classifier_batch=batch,
                          lung_method=lungs)
    out["init_s"] = round(time.perf_counter() - t0, 2)
    out["runtime"] = eng_sync.runtime
    out["runtime_reasons"] = eng_sync.runtime_reasons
    stages: Dict[str, List[float]] = {}
    for i in range(repeats + 2):
        r = eng_sync.run(volume)
        if i >= 2:
            for k, v in r.timings_ms.items():
                stages.setdefault(k, []).append(v)
    out["stages_ms_synced"] = {k: _pct(v) for k, v in stages.items()}
    eng = sdk.Triage(device="cuda", precision=precision, pooling=pooling, classifier_batch=batch, lung_method=lungs)
    for _ in range(2):
        eng.run(volume)
    pool_before = pool.total_bytes()
    lat: List[float] = []
    for _ in range(repeats):
        t = time.perf_counter()
        r = eng.run(volume)
        lat.append((time.perf_counter() - t) * 1000.0)
    out["from_volume_ms"] = _pct(lat)
    lat = []
    for _ in range(max(2, repeats // 3)):
        t = time.perf_counter()
        rf = eng.run(series)
        lat.append((time.perf_counter() - t) * 1000.0)
    out["from_files_ms"] = _pct(lat)
    out["from_files_stages_ms"] = {k: round(v, 2) for k, v in rf.timings_ms.items()}
    out["cupy_pool_total_bytes"] = int(pool.total_bytes())
    out["cupy_pool_growth_bytes_during_runs"] = int(pool.total_bytes() - pool_before)
    out["transfers"] = r.transfers
    out["label"] = r.label
    out["probabilities"] = r.probabilities
    out["agreement_with_cpu"] = {
        "cpu_label": ref.label, "same_label": r.label == ref.label,
        "max_abs_dp_series": max(abs(r.probabilities[c] - ref.probabilities[c]) for c in r.probabilities),
        "same_slices": [s.index for s in r.slice_scores] == [s.index for s in ref.slice_scores],
    }
    if out["agreement_with_cpu"]["same_slices"]:
        a = np.array([[s.probabilities[c] for c in sorted(r.probabilities)] for s in r.slice_scores])
        b = np.array([[s.probabilities[c] for c in sorted(ref.probabilities)] for s in ref.slice_scores])
        out["agreement_with_cpu"]["max_abs_dp_slices"] = float(np.abs(a - b).max())
    return out


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--series", default=str(DEFAULT_SERIES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--configs",
                    default="fp16:kernel,fp16:graph,fp16:kernel:hybrid,fp32:kernel:hybrid,fp16:kernel:b128,fp16:kernel:cudagraph",
                    help="precision:pooling[:cudagraph][:bN][:hybrid] (cudagraph sets CTSDK_CUDA_GRAPH=1 for that config; "
                         "bN = classifier_batch N, default 32; hybrid = lung_method='hybrid' (host lungs), "
                         "default: the 3D U-Net on the device when the bundle has one)")
    args = ap.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        print("gpu_device_path: CuPy is not installed; this report runs on a GPU machine (cupy + onnxruntime-gpu)",
              file=sys.stderr)
        return 2
    import sdk
    from sdk.io import load_series

    series = Path(args.series)
    volume = load_series(series)
    report: Dict[str, Any] = {"command": " ".join([sys.executable, *sys.argv]), "series": str(series),
                              "shape": list(volume.hu.shape), "dtype": str(volume.hu.dtype), "env": _env()}
    t = time.perf_counter()
    ref = sdk.Triage(device="cpu", precision="fp32", kernels="numpy").run(volume)
    report["cpu_reference"] = {"label": ref.label, "probabilities": ref.probabilities,
                               "ms": round((time.perf_counter() - t) * 1000.0, 1)}
    report["configs"] = []
    cache: Dict[str, Any] = {}

    def ref3d() -> Any:  # the CPU reference with the same 3D U-Net (kernel path, g++ kernels, ORT CPU)
        if "r" not in cache:
            cache["r"] = sdk.Triage(device="cpu", precision="fp32", kernels="cpu-harness", lung_method="unet3d").run(volume)
            report["cpu_reference_unet3d"] = {"label": cache["r"].label, "probabilities": cache["r"].probabilities}
        return cache["r"]

    import os

    for spec in args.configs.split(","):
        prec, pooling, *extra = spec.split(":")
        os.environ["CTSDK_CUDA_GRAPH"] = "1" if "cudagraph" in extra else "0"
        try:
            batch = int(next((e[1:] for e in extra if e.startswith("b") and e[1:].isdigit()), "32"))
            lungs = "hybrid" if "hybrid" in extra else "auto"
            report["configs"].append(_config(series, volume, prec, pooling, args.repeats,
                                             ref if lungs == "hybrid" else ref3d(), batch, lungs))
            report["configs"][-1]["cuda_graph"] = "cudagraph" in extra
        except Exception as exc:  # noqa: BLE001 - a report script: record the failure, run the next config
            import traceback

            report["configs"].append({"precision": prec, "pooling": pooling, "error": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc()[-3000:]})
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
