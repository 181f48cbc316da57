"""Header scan: the fast scan (sdk.io.header) vs pydicom's dcmread, side by side in one process.

    .venv/bin/python examples/header_scan_bench.py [--source DIR] [--rounds 11]

Alternates the two settings of ``sdk.io.reader.FAST_HEADERS`` round by round (same page cache,
same load) and prints the median ms of the reader's scan alone and of ``load_series`` with its
own split (``timings=``: scan / decode / hu / geometry).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from sdk.paths import shared_data_root

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default=str(shared_data_root() / "dicom" / "covid-ct-md" / "covid-P001"))
    ap.add_argument("--rounds", type=int, default=11)
    a = ap.parse_args()
    from sdk.io import load_series
    from sdk.io import reader as R

    res = {True: {"scan": [], "load": [], "parts": []}, False: {"scan": [], "load": [], "parts": []}}
    for r in range(a.rounds + 1):           # round 0 warms the page cache and the imports
        for fast in (True, False):
            R.FAST_HEADERS = fast
            t0 = time.perf_counter()
            R._scan(a.source)
            t1 = time.perf_counter()
            parts: dict = {}
            load_series(a.source, timings=parts)
            t2 = time.perf_counter()
            if r:
                res[fast]["scan"].append((t1 - t0) * 1e3)
                res[fast]["load"].append((t2 - t1) * 1e3)
                res[fast]["parts"].append(parts)
    for fast in (True, False):
        d = res[fast]
        split = {k: round(statistics.median(p[k] for p in d["parts"]), 1) for k in d["parts"][0]}
        print(f"{'fast scan' if fast else 'pydicom  '}: scan {statistics.median(d['scan']):6.1f} ms   "
              f"load_series {statistics.median(d['load']):6.1f} ms   split {split}")


if __name__ == "__main__":
    main()
