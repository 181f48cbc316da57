"""CPU timings: the kernels' arithmetic through the g++ harness (one thread, loops in place of the
thread grid) vs the NumPy references, on product-sized inputs.

    python -m sdk.kernels.bench [--repeat 3] [--json]

Prints a Markdown table (median seconds) and the max abs difference of each pair. This measures the
CPU harness, not a GPU; the GPU kernels (CuPy and pycuda backends) against NumPy and torch are timed
by ``python -m sdk.bench.gpu_report`` (docs/benchmarks/gpu.md).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable, Dict, List

import numpy as np

from ..pooling import mask_weights, masked_gap
from ..preprocessing import SEGMENTER_WINDOW
from ..volume.resample import classifier_inputs, resample_volume
from .harness import CpuHarness


def _median_s(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(repeat: int = 3) -> List[Dict[str, object]]:
    rng = np.random.default_rng(0)
    h = CpuHarness()
    hu = rng.integers(-1024, 2000, size=(150, 512, 512), dtype=np.int16)
    z = np.arange(150) * 2.0
    lung = rng.random(hu.shape) > 0.5
    idx = np.arange(0, 150, 150 / 64).astype(int)[:64]
    x = classifier_inputs(hu, lung, idx, 224)
    f = rng.normal(size=(64, 1280, 7, 7)).astype(np.float32)
    w = mask_weights(x[:, 1:2])
    seg = SEGMENTER_WINDOW
    cases = [
        ("resample 150x512x512 -> 128^3 linear, windowed",
         lambda: resample_volume(hu, z, mode="linear", window=seg), lambda: h.resample(hu, z, mode="linear", window=seg)),
        ("resample 150x512x512 -> 128^3 area, windowed",
         lambda: resample_volume(hu, z, mode="area", window=seg), lambda: h.resample(hu, z, mode="area", window=seg)),
        ("classifier_inputs 64 x 512^2 -> 64x3x224^2",
         lambda: classifier_inputs(hu, lung, idx, 224), lambda: h.classifier_inputs(hu, lung, idx, 224)),
        ("mask_weights 64x1x224^2 -> 7x7",
         lambda: mask_weights(x[:, 1:2]), lambda: h.mask_weights(x, (7, 7), channel=1)),
        ("masked_gap 64x1280x7x7 fp32", lambda: masked_gap(f, w), lambda: h.masked_gap(f, w)),
        ("masked_gap 64x1280x7x7 fp16", lambda: masked_gap(f.astype(np.float16), w),
         lambda: h.masked_gap(f.astype(np.float16), w)),
    ]
    rows = []
    for name, ref, ker in cases:
        diff = float(np.abs(np.asarray(ref(), np.float64) - np.asarray(ker(), np.float64)).max())
        rows.append({"case": name, "numpy_s": _median_s(ref, repeat), "harness_s": _median_s(ker, repeat),
                     "max_abs_diff": diff})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m sdk.kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    rows = run(a.repeat)
    if a.json:
        print(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}))
        return 0
    print("| case | NumPy reference (s) | CPU harness, g++ (s) | max abs diff |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['numpy_s']:.3f} | {r['harness_s']:.3f} | {r['max_abs_diff']:.2e} |")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
