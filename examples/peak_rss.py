"""Peak RSS of a fresh process: import, Triage(), then N triage calls of one series from its files.

    .venv/bin/python examples/peak_rss.py [--runs 3] [--base /tmp/base]   # --base: the old package as sdk_base

Prints VmHWM (peak resident set, MiB) and VmRSS after each step, read from /proc/self/status, and
the result (label, P(positive)) so that the before / after runs can be checked to agree. Run each
version in its own process: the peak of a process cannot be reset.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Dict

from sdk.paths import shared_data_root

SERIES = shared_data_root() / "dicom" / "covid-ct-md" / "covid-P001"


def mem() -> Dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM", "VmRSS")):
                out[line.split(":")[0]] = int(line.split()[1]) // 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--base", type=Path, default=None)
    ap.add_argument("--series", type=Path, default=SERIES)
    a = ap.parse_args()
    if a.base:
        sys.path.insert(0, str(a.base))
    sdk = importlib.import_module("sdk_base" if a.base else "sdk")
    print("import", mem())
    tri = sdk.Triage(device="cpu", heatmaps=False)
    print("Triage()", mem())
    for i in range(a.runs):
        r = tri.run(a.series)
        print(f"run {i + 1}", mem(), r.label, round(r.probabilities[tri.positive], 6))


if __name__ == "__main__":
    main()
