"""Lung U-Net cost, FP32 vs INT8: process CPU ms for 75 slices, 1 thread, batch 8, median of 5 alternating.

    .venv/bin/python examples/lungs_net_cpu.py   # the default bundle's lungs_fp32.onnx / lungs_int8.onnx
                                                 # (lungs_int8.onnx: python -m sdk.calibration.lungs)
"""
import argparse
import time

import numpy as np


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    from sdk.lungs.unet2d import DEFAULT_ONNX
    from sdk.runtime.ort import OrtSession

    x = np.random.default_rng(0).random((75, 1, 128, 128), dtype=np.float32)
    sessions = {"fp32": OrtSession(DEFAULT_ONNX, threads=1, precision="fp32"),
                "int8": OrtSession(DEFAULT_ONNX.with_name("lungs_int8.onnx"), threads=1, precision="int8")}
    for s in sessions.values():
        s.infer_batched(x, batch=8)
    cpu_ms = {k: [] for k in sessions}
    for _ in range(5):
        for k, s in sessions.items():
            c = time.process_time()
            s.infer_batched(x, batch=8, prefetch=False)
            cpu_ms[k].append((time.process_time() - c) * 1e3)
    print({k: round(float(np.median(v))) for k, v in cpu_ms.items()}, "ms CPU, 75 slices, 1 thread")


if __name__ == "__main__":
    main()
