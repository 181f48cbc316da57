"""CPU time of sdk.opacity.measure_opacity on the three COVID-CT-MD series (docs/triage.md).

    OMP_NUM_THREADS=1 OPENCV_NUM_THREADS=1 taskset -c 1 .venv/bin/python examples/opacity_bench.py [DATA]

Loads and segments each series once (not timed), then 7 timed calls: median / min of
``time.process_time`` (CPU of this process) and of the wall clock, with the load average.
"""
import argparse
import os
import time
from pathlib import Path

import numpy as np

from sdk import lungs
from sdk.io import load_series
from sdk.opacity import measure_opacity
from sdk.paths import shared_data_root

DATA = shared_data_root()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", type=Path, default=DATA, help="the shared data folder (default: %(default)s)")
    root = ap.parse_args().data
    for n in ["covid-P001", "cap-cap001", "normal-normal001"]:
        vol = load_series(root / "dicom" / "covid-ct-md" / n)
        lab = lungs.segment(vol).labels
        hu, sp = vol.hu, vol.spacing
        measure_opacity(hu, lab, sp)
        cpu, wall = [], []
        for _ in range(7):
            c, w = time.process_time(), time.perf_counter()
            measure_opacity(hu, lab, sp)
            cpu.append((time.process_time() - c) * 1000)
            wall.append((time.perf_counter() - w) * 1000)
        print(f"{n} {hu.shape}: cpu median {np.median(cpu):.0f} ms (min {min(cpu):.0f}), "
              f"wall median {np.median(wall):.0f} ms (min {min(wall):.0f}); load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
