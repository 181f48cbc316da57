"""Does a long-lived ``sdk.Triage`` grow? Triage series back to back, print the resident set.

    python examples/long_run_memory.py --runs 121        # ~5.5 min on 2 cores (docs/triage.md)

Alternates covid-P001 and normal-normal001 (from files, so the reader runs every time); every
``--every`` runs: ``gc.collect()``, then VmRSS from /proc/self/status (Linux). At the end the
process peak (``ru_maxrss``). A leak shows as RSS that keeps rising after the first few runs.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdk.paths import shared_data_root  # noqa: E402

SERIES = [shared_data_root() / "dicom" / "covid-ct-md" / n for n in ("covid-P001", "normal-normal001")]


def rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=121)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--no-heatmaps", action="store_true", help="Triage(heatmaps=False): results keep no image data")
    a = p.parse_args()
    from sdk import Triage

    tri = Triage(device="cpu", heatmaps=not a.no_heatmaps)
    t0 = time.time()
    for i in range(a.runs):
        r = tri.run(SERIES[i % 2])
        if i % a.every == 0 or i == a.runs - 1:
            gc.collect()
            print(f"run {i:4d}  rss {rss_mib():7.1f} MiB  {time.time() - t0:7.1f} s  {r.label}", flush=True)
    print(f"peak (ru_maxrss) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
