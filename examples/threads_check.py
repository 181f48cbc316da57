"""Thread oversubscription check: ORT intra-op threads x OpenCV threads, side by side in one process.

    .venv/bin/python examples/threads_check.py [--rounds 3]

Configurations (each a Triage on the CPU, the same bundle) run covid-P001 from a decoded Volume in
alternating order; reported: median wall ms and median process CPU ms (all threads: ORT's spinning
workers and OpenCV's pool show up here as CPU spent without wall-time gain), per configuration.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from sdk.paths import shared_data_root

DATA = shared_data_root() / "dicom"


def main() -> None:
    import cv2

    import sdk
    from sdk.io import load_series

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    vol = load_series(DATA / "covid-ct-md" / "covid-P001")
    cores = len(os.sched_getaffinity(0))
    cv_default = cv2.getNumThreads()
    configs = {f"ort{t}_cv{c}": (t, c) for t in sorted({1, cores}) for c in sorted({1, cv_default})}
    tri = {t: sdk.Triage(device="cpu", heatmaps=False, threads=t) for t in sorted({1, cores})}
    for t in tri.values():
        t.run(vol)
    wall = {k: [] for k in configs}
    cpu = {k: [] for k in configs}
    for r in range(a.rounds):
        for k in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
            t, c = configs[k]
            cv2.setNumThreads(c)
            c0, t0 = time.process_time(), time.perf_counter()
            tri[t].run(vol)
            wall[k].append((time.perf_counter() - t0) * 1e3)
            cpu[k].append((time.process_time() - c0) * 1e3)
    cv2.setNumThreads(cv_default)
    print(f"cores {cores}, OpenCV default threads {cv_default}, load avg {os.getloadavg()[0]:.1f}")
    print(f"{'config':12s} {'wall ms':>8s} {'cpu ms':>8s}")
    for k in configs:
        print(f"{k:12s} {np.median(wall[k]):8.0f} {np.median(cpu[k]):8.0f}")


if __name__ == "__main__":
    main()
