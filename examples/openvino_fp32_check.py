"""Is another FP32 CPU engine faster than ONNX Runtime for ctsdk's two networks? (issue 15)

Times the default bundle's FP32 classifier and 2D lung U-Net on ONNX Runtime (one intra-op thread,
no spinning: one CPU lane as ``sdk.Triage`` runs it) and on OpenVINO's CPU plugin (one thread,
latency hint) with f32 and bf16 inference precision, on the same random inputs, interleaved,
and prints the median ms per call and the largest output difference against ONNX Runtime.

    pip install openvino            # not a ctsdk dependency; this is a measurement
    python examples/openvino_fp32_check.py [--threads 1] [--rounds 15]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np

BUNDLE = Path(__file__).resolve().parents[1] / "sdk" / "bundles" / "default"
CASES: List[Tuple[str, Tuple[int, ...]]] = [
    ("classifier_fp32.onnx", (4, 3, 224, 224)),   # the CPU lane's classifier batch
    ("lungs_fp32.onnx", (8, 1, 128, 128)),
]


def _median_ms(call: Callable[[], object], rounds: int) -> float:
    call()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    import onnxruntime as ort
    import openvino as ov

    core = ov.Core()
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, openvino {ov.__version__}, {args.threads} thread(s)")
    for name, shape in CASES:
        path = str(BUNDLE / name)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        compiled = {hint: core.compile_model(core.read_model(path), "CPU", {
            "INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": hint,
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}) for hint in ("f32", "bf16")}
        x = rng.standard_normal(shape).astype(np.float32)
        ref = sess.run(None, {"image": x})[0]
        row = [f"{name} batch {shape[0]}: ort {_median_ms(lambda: sess.run(None, {'image': x}), args.rounds):.1f} ms"]
        for hint, c in compiled.items():
            out = c({"image": x})[c.output(0)]
            ms = _median_ms(lambda c=c: c({"image": x}), args.rounds)
            row.append(f"openvino-{hint} {ms:.1f} ms (max |diff| {np.abs(out - ref).max():.1e})")
        print(", ".join(row), flush=True)


if __name__ == "__main__":
    main()
